"""Records under faults, for real: divergence at the end, checkpoints verified and bounded, a full disk
(a size-limited tmpfs), resumes that would change a record, SIGKILLed trials, a dead store, racing claims."""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
import torch
from safetensors.torch import load_file

from harness.commands.evaluate import main as evaluate_main
from harness.commands.export import main as export_main
from harness.tracking import liveness
from harness.trial import checkpoint
from harness.trial.trainer import DivergenceError, Trial
from harness.trial.weights import build_model
from tests.conftest import TINY, compose_config, run_in_process, start_harness

FAST_BEAT = ["tracking.heartbeat_interval=1"]  # a dead trial is stale after 4 s


def all_runs(uri: str) -> list:
    client = mlflow.MlflowClient(uri)
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def step_dirs(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(("step_", ".step_")))


# --- 1. no false success ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "lr, steps, message, latest",
    [
        (
            "30",
            20,
            "diverged at step 20: non-finite training loss at the end of the last period, so no final "
            "checkpoint was saved; `latest` names the last finite checkpoint",
            "step_000011",
        ),
        (
            "1e6",
            20,
            "diverged at step 11: the training loss was non-finite for the last 10 steps (2–11); `latest` "
            "names the last finite checkpoint",
            "step_000001",
        ),  # whose sample stops at non-finite logits
    ],
)
def test_a_trial_that_ends_non_finite_is_failed_with_a_true_message(tmp_path, tracking_uri, lr, steps, message, latest):
    """The issue's lr=30 run ended FINISHED (test_loss 3.2e12); lr=1e6 claimed a checkpoint that did not exist.
    (lr=inf, which ended FINISHED with a NaN test loss, is now refused before anything runs.)"""
    cfg = compose_config(
        *TINY,
        f"optim.lr={lr}",
        f"trainer.max_steps={steps}",
        "trainer.checkpoint_interval=5",
        "tracking.log_interval=1",
    )
    with pytest.raises(DivergenceError) as error:
        Trial(cfg, tmp_path / "run").run()
    assert message in str(error.value)
    [run] = all_runs(tracking_uri)
    assert run.info.status == "FAILED" and message in run.data.tags["failure_reason"]
    assert "test_loss" not in run.data.metrics
    if latest is None:
        assert not (tmp_path / "run" / "checkpoints" / "latest").exists()
    else:
        found = checkpoint.find(tmp_path / "run")
        assert found.name == latest and str(found) in str(error.value)
        best = checkpoint.resolve(tmp_path / "run" / "checkpoints", "best").name
        assert step_dirs(tmp_path / "run") == sorted({latest, best})  # the default keeps latest and best only
        assert all(torch.isfinite(t).all() for t in load_file(str(found / checkpoint.MODEL_FILE)).values())


def test_a_non_finite_test_loss_is_failed_with_the_final_checkpoint_kept(tmp_path, tracking_uri, monkeypatch):
    monkeypatch.setattr(Trial, "test_losses", lambda self: {"test_loss": float("nan"), "test_loss_amp": 3.0})
    with pytest.raises(DivergenceError, match="the final weights score non-finite: test_loss nan"):
        Trial(compose_config(*TINY), tmp_path / "run").run()
    [run] = all_runs(tracking_uri)
    assert run.info.status == "FAILED" and checkpoint.find(tmp_path / "run").name == "step_000004"


# --- 5. checkpoints: verified, bounded, fsynced, cleaned, a full disk -----------------------------------------


@pytest.fixture(scope="module")
def finished(store, tmp_path_factory):
    """A FINISHED TINY trial every checkpoint of which is kept (steps 1, 3 and 4)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    result = Trial(compose_config(*TINY, "trainer.keep_checkpoints=null"), run_dir).run()
    return run_dir, result


@contextlib.contextmanager
def interrupted(store: str, run_id: str):
    """The finished trial's run as if it had been killed (so it can be resumed), FINISHED again afterwards."""
    client = mlflow.MlflowClient(store)
    client.set_terminated(run_id, "KILLED")
    try:
        yield
    finally:
        client.set_terminated(run_id, "FINISHED")


def flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_flipped_bit_is_refused_by_resume_evaluate_and_export_naming_the_file(finished, store, tmp_path, capsys):
    run_dir, _ = finished
    copy = shutil.copytree(run_dir, tmp_path / "run")
    target = copy / "checkpoints" / "step_000003" / checkpoint.MODEL_FILE
    flip_a_bit(target)
    (copy / "checkpoints" / "latest").write_text("step_000003\n")  # as if killed after step 3
    with pytest.raises(checkpoint.CheckpointError, match=f"{target} does not match the sha256"):
        checkpoint.load(target.parent, build_model(compose_config(*TINY)))

    assert evaluate_main([str(copy)]) == 2
    assert f"{target} does not match the sha256 in" in capsys.readouterr().err
    assert export_main([str(copy), f"out={tmp_path / 'hf'}"]) == 2
    assert f"{target} does not match the sha256 in" in capsys.readouterr().err

    rng = copy / "checkpoints" / "step_000004" / "rng_rank0.pt"
    flip_a_bit(rng)
    (copy / "checkpoints" / "latest").write_text("step_000004\n")
    with interrupted(store, finished[1]["run_id"]):
        resumed = run_in_process(
            f"resume={copy}", f"hydra.run.dir={tmp_path / 'log'}", cwd=tmp_path, env_uri=store, check=False
        )
        status = mlflow.MlflowClient(store).get_run(finished[1]["run_id"]).info.status
    assert resumed.returncode != 0 and f"{rng} does not match the sha256" in resumed.stderr
    assert status == "KILLED"  # refused before the run was touched


def test_manifest_records_every_file_and_its_run(finished):
    run_dir, result = finished
    latest = checkpoint.find(run_dir)
    manifest = checkpoint.verify(latest)
    assert manifest["run_id"] == result["run_id"] and manifest["step"] == 4 and manifest["world_size"] == 1
    assert set(manifest["files"]) == {checkpoint.MODEL_FILE, checkpoint.STATE_FILE, "rng_rank0.pt"}
    assert step_dirs(run_dir) == ["step_000001", "step_000003", "step_000004"]  # keep_checkpoints=null keeps every one
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == checkpoint.sha256(latest / name)


def test_keep_checkpoints_keeps_latest_best_and_every_kth(tmp_path, tracking_uri):
    """Checkpoints after steps 1, 3, 5, 7, 9 and 10: keep_checkpoints=2 keeps every second (1, 5, 9) besides
    latest and best; the default (0) and null (all) are the other tests' trials."""
    run_dir = tmp_path / "run"
    Trial(compose_config(*TINY, "trainer.max_steps=10", "trainer.keep_checkpoints=2"), run_dir).run()
    best = checkpoint.resolve(run_dir / "checkpoints", "best").name
    assert step_dirs(run_dir) == sorted({"step_000001", "step_000005", "step_000009", "step_000010", best})
    assert checkpoint.resolve(run_dir / "checkpoints", "latest").name == "step_000010"


def test_best_survives_when_latest_moves_on(tmp_path):
    directory = tmp_path / "checkpoints"
    model = torch.nn.Linear(2, 2)
    for step, best in ((2, True), (4, False), (6, False)):
        checkpoint.begin(directory, step)
        checkpoint.commit(directory, step, model, {"run_id": "r"}, best)
        checkpoint.prune(directory, 0, 2)
    assert sorted(p.name for p in directory.glob("step_*")) == ["step_000002", "step_000006"]


def test_a_trial_whose_checkpoints_cannot_fit_is_refused_before_its_first_step(tmp_path, tracking_uri, caplog):
    cfg = compose_config(
        *TINY,
        "trainer.max_steps=1000000",
        "trainer.checkpoint_interval=1",
        "trainer.keep_checkpoints=null",
        "data.max_epochs=1e9",
    )  # a million 40 MB checkpoints
    trial = Trial(cfg, tmp_path / "run")
    with pytest.raises(
        checkpoint.CheckpointError,
        match="not enough disk for this trial's checkpoints: checkpoints: "
        r"~39.8 MB each; keeping every checkpoint \(trainer.keep_checkpoints\), up to 1000000 on disk",
    ):
        trial.run()
    assert trial.history["step"] == []
    assert all_runs(tracking_uri)[0].info.status == "FAILED"


def test_staging_left_by_a_killed_writer_is_removed_on_resume(finished, store, tmp_path):
    run_dir, _ = finished
    copy = shutil.copytree(run_dir, tmp_path / "run")
    (copy / "checkpoints" / "latest").write_text("step_000003\n")
    stale = checkpoint.staging_dir(copy / "checkpoints", 4)
    stale.mkdir()
    (stale / checkpoint.MODEL_FILE).write_bytes(b"half a file")
    with interrupted(store, finished[1]["run_id"]):
        Trial(compose_config(*TINY, "trainer.keep_checkpoints=null", f"resume={copy}"), copy).run()
    assert not stale.exists() and checkpoint.resolve(copy / "checkpoints").name == "step_000004"


FILL_THE_DISK = """
import json, os, signal, subprocess, sys, time
from pathlib import Path
from harness.trial import checkpoint

run_dir, size, args = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
checkpoints = run_dir / "checkpoints"
checkpoints.mkdir(parents=True)
subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(checkpoints)], check=True)
trial = subprocess.Popen([sys.executable, "-m", "harness", *args, f"hydra.run.dir={run_dir}"],
                         stderr=subprocess.PIPE, text=True)
while not (checkpoints / "latest").exists():
    assert trial.poll() is None, trial.stderr.read()
    time.sleep(0.005)
trial.send_signal(signal.SIGSTOP)  # another process fills the disk before the next checkpoint
with open(checkpoints / "filler", "wb") as filler:
    filler.write(b"x" * (os.statvfs(checkpoints).f_bavail * os.statvfs(checkpoints).f_frsize - 20_000_000))
trial.send_signal(signal.SIGCONT)
stderr = trial.stderr.read()
latest = checkpoint.resolve(checkpoints, "latest")
checkpoint.verify(latest)
print(json.dumps({"returncode": trial.wait(), "stderr": stderr[-3000:], "latest": latest.name,
                  "entries": sorted(p.name for p in checkpoints.iterdir())}))
"""


def private_mount_namespace() -> list[str]:
    """The command prefix that runs a process in its own mount namespace, where it may mount a tmpfs."""
    for prefix in (["unshare", "-m"], ["unshare", "-Urm"]):
        probe = subprocess.run([*prefix, "mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", "/mnt"], capture_output=True)
        if probe.returncode == 0:
            return prefix
    pytest.skip("needs root or unprivileged user namespaces to mount a size-limited tmpfs")


def test_a_full_disk_at_a_checkpoint_fails_the_trial_with_latest_intact_and_no_staging_left(tmp_path):
    """A real 130 MB tmpfs (each TINY checkpoint is ~39 MB; the trial needs 3 of them free at its start),
    filled by another writer after the first checkpoint."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    trial = [*TINY, "trainer.max_steps=20", "trainer.checkpoint_interval=10"]
    result = subprocess.run(
        [*private_mount_namespace(), sys.executable, "-c", FILL_THE_DISK, str(tmp_path / "run"), "130m", *trial],
        env={**os.environ, "MLFLOW_TRACKING_URI": uri, "HYDRA_FULL_ERROR": "0"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    outcome = json.loads(result.stdout.splitlines()[-1])
    assert outcome["returncode"] != 0
    assert (
        "no space left on the device writing" in outcome["stderr"]
        and "of checkpoint step 11" in outcome["stderr"]
        and "`latest` still names step_000001; the partial checkpoint is removed" in outcome["stderr"]
    )
    assert outcome["latest"] == "step_000001"  # and it verified against its manifest
    assert outcome["entries"] == ["best", "filler", "latest", "step_000001"]  # no .step_000011.tmp
    [run] = all_runs(uri)
    assert (
        run.info.status == "FAILED"
        and "CheckpointError: no space left on the device" in run.data.tags["failure_reason"]
    )


# --- 6. resume ----------------------------------------------------------------------------------------------


def test_resuming_a_finished_trial_changes_nothing_and_says_so(finished, store, tmp_path):
    run_dir, result = finished
    before = mlflow.MlflowClient(store).get_run(result["run_id"])
    files = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    out = run_in_process(f"resume={run_dir}", f"hydra.run.dir={tmp_path / 'log'}", cwd=tmp_path, env_uri=store)
    assert (
        f"resume={run_dir}: the trial's run {result['run_id']} in {store} already FINISHED (test_loss "
        f"{result['test_loss']:.6f}): nothing to resume; nothing was changed"
    ) in out.stdout
    after = mlflow.MlflowClient(store).get_run(result["run_id"])
    assert (after.info.status, after.info.end_time, after.data.metrics) == (
        before.info.status,
        before.info.end_time,
        before.data.metrics,
    )
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == files


@pytest.mark.parametrize("how", ["override", "environment"])
def test_resuming_into_another_store_is_refused_naming_both(finished, store, tmp_path, how):
    run_dir, _ = finished
    other = f"sqlite:///{tmp_path / 'other.db'}"
    args = [f"resume={run_dir}", f"hydra.run.dir={tmp_path / 'log'}"]
    if how == "override":
        result = run_in_process(*args, f"tracking.uri={other}", cwd=tmp_path, env_uri=store, check=False)
        source = "tracking.uri"
    else:
        result = run_in_process(*args, cwd=tmp_path, env_uri=other, check=False)
        source = "MLFLOW_TRACKING_URI"
    assert result.returncode != 0
    assert f"the trial is recorded in {store}, but {source} names {other}" in result.stderr
    assert not (tmp_path / "other.db").exists()


# --- 3. orphans -----------------------------------------------------------------------------------------------


def test_a_sigkilled_trial_is_listed_stale_and_marked_killed_with_the_reason(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "run"
    proc = start_harness(*TINY, *FAST_BEAT, "trainer.max_steps=1000", f"hydra.run.dir={run_dir}", cwd=tmp_path, uri=uri)
    deadline = time.time() + 240
    while not (run_dir / "checkpoints" / "latest").exists():
        assert proc.poll() is None and time.time() < deadline, "the trial ended before its first checkpoint"
        time.sleep(0.05)
    [run] = all_runs(uri)
    assert liveness.is_live(run, time.time())  # alive: its heartbeat is fresh
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    leftover = checkpoint.staging_dir(run_dir / "checkpoints", 999)  # as if killed while writing one
    leftover.mkdir()
    time.sleep(5)

    listed = run_in_process("runs", env_uri=uri, cwd=tmp_path).stdout
    assert "1 RUNNING runs" in listed and "python -m harness runs --mark-stale" in listed
    [row] = [line for line in listed.splitlines() if line.startswith(run.info.run_id)]
    assert "s ago STALE" in row and str(run_dir) in row
    marked = run_in_process("runs", "--mark-stale", env_uri=uri, cwd=tmp_path)
    assert marked.returncode == 0 and f"marked {run.info.run_id} ({run.info.run_name}) KILLED" in marked.stdout
    [run] = all_runs(uri)
    assert (
        run.info.status == "KILLED"
        and "its process died or lost the store: no heartbeat since" in run.data.tags["failure_reason"]
    )
    assert run.info.end_time <= int(float(run.data.tags["heartbeat"]) * 1000) + 1
    assert not leftover.exists() and checkpoint.find(run_dir).is_dir()


# --- 4. a dead store at the start ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_dead_tracking_uri_fails_the_trial_in_seconds_before_anything_is_built(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = run_in_process(
        *TINY, f"tracking.uri={dead}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, env_uri=dead, check=False
    )
    elapsed = time.monotonic() - started
    assert result.returncode != 0 and f"the tracking store {dead} did not answer" in result.stderr
    assert "tracking.connect_timeout=10" in result.stderr and "parameters" not in result.stderr  # nothing built
    assert elapsed < 60, f"{elapsed:.0f} s (was 254 s before the first-contact limit)"
    assert not (tmp_path / "run" / "config.yaml").exists()


# --- 2. claims ----------------------------------------------------------------------------------------------

CLAIMANT = """
import sys, time
from pathlib import Path
from harness.tracking import liveness
from harness.tracking.tracker import Tracker

uri, name, folder, rounds = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
tracker = Tracker(uri, "harness", heartbeat_interval=1)
for round in range(rounds):
    (folder / f"{round}-{name}").touch()
    while len(list(folder.glob(f"{round}-*"))) < 2:  # both claimants start each round together
        time.sleep(0.001)
    claim = Tracker(uri, "harness", heartbeat_interval=1)
    claim.start(f"{name}-{round}", {"study": "race", "config_hash": f"h{round}", "claim_slots": "1"}, {})
    reason = liveness.claim_new_run(claim.client, claim.experiment_id, claim.run_id, "race", f"h{round}", 1)
    if reason:
        claim.discard()
        print(round, "lost", reason, flush=True)
    else:
        claim.end("FINISHED")
        print(round, "won", flush=True)
"""


def test_racing_claims_of_one_trial_leave_exactly_one_run(tmp_path):
    """Two processes claim the same computation at the same moment, three times over, on one sqlite store."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "ready").mkdir()
    claimants = [
        subprocess.Popen(
            [sys.executable, "-c", CLAIMANT, uri, name, str(tmp_path / "ready"), "3"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("a", "b")
    ]
    outputs = [c.communicate(timeout=300) for c in claimants]
    assert all(c.returncode == 0 for c in claimants), outputs
    results = [line.split(" ", 2) for out, _ in outputs for line in out.splitlines()]
    for round in range(3):
        assert sorted(r[1] for r in results if r[0] == str(round)) == ["lost", "won"]
    runs = all_runs(uri)
    assert sorted(r.data.tags["config_hash"] for r in runs) == [f"h{r}" for r in range(3)]
    assert all(r.info.status == "FINISHED" for r in runs)
    losers = [r[2] for r in results if r[1] == "lost"]
    assert all("study race already has this trial (config_hash h" in reason for reason in losers)


def test_a_trial_that_finds_an_earlier_claim_of_its_computation_withdraws_mid_run(tmp_path, tracking_uri):
    """Two claimants that raced past the settle time (here the rival's clock is a minute behind and it shows up
    after the first checkpoint): the later one stops at its next heartbeat, KILLED and tagged withdrawn."""
    cfg = compose_config(
        *TINY, "study=race", "trainer.max_steps=1000", "tracking.heartbeat_interval=0.5", "tracking.log_interval=1"
    )
    client, rival = mlflow.MlflowClient(tracking_uri), []

    def claim_from_a_slow_clock():
        while not (tmp_path / "run" / "checkpoints" / "latest").exists():
            time.sleep(0.02)
        [mine] = all_runs(tracking_uri)
        rival.append(
            client.create_run(
                mine.info.experiment_id,
                start_time=mine.info.start_time - 60_000,
                tags={
                    "study": "race",
                    "config_hash": mine.data.tags["config_hash"],
                    "claim_slots": "1",
                    "code_version": mine.data.tags["code_version"],
                    "heartbeat": f"{time.time() + 3600:.3f}",
                    "heartbeat_interval": "1",
                },
            ).info.run_id
        )

    thread = threading.Thread(target=claim_from_a_slow_clock, daemon=True)
    thread.start()
    with pytest.raises(liveness.ClaimedElsewhere, match="study race already has this trial"):
        Trial(cfg, tmp_path / "run").run()
    thread.join()
    mine = [r for r in all_runs(tracking_uri) if r.info.run_id != rival[0]][0]
    assert mine.info.status == "KILLED" and mine.data.tags["withdrawn"] == "true"
    assert mine.data.tags["failure_reason"].startswith("withdrawn: study race already has this trial")
    assert f"run {rival[0]} RUNNING" in mine.data.tags["failure_reason"]


def test_a_study_trial_already_finished_in_its_study_is_not_run_again(tmp_path, tracking_uri):
    first = Trial(compose_config(*TINY, "study=demo"), tmp_path / "a").run()
    with pytest.raises(liveness.ClaimedElsewhere, match=f"run {first['run_id']} FINISHED"):
        Trial(compose_config(*TINY, "study=demo"), tmp_path / "b").run()
    assert not (tmp_path / "b" / "config.yaml").exists()
    Trial(compose_config(*TINY, "study=demo", "rerun=true"), tmp_path / "c").run()
    assert sorted(r.info.status for r in all_runs(tracking_uri)) == ["FINISHED", "FINISHED"]  # the loser left none


def test_a_run_directory_holding_a_trial_is_never_reused(finished, store):
    run_dir, _ = finished
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    with pytest.raises(FileExistsError, match=f"{run_dir} already holds a trial"):
        Trial(compose_config(*TINY, "seed=3"), run_dir).run()
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before


def test_new_keys_are_validated_and_kept_out_of_the_config_hash():
    from harness.config.compose import config_hash

    base = config_hash(compose_config(*TINY))
    for key in (
        "trainer.keep_checkpoints=3",
        "tracking.heartbeat_interval=5",
        "tracking.flush_timeout=0",
        "tracking.connect_timeout=2",
        "tracking.claim_slots=3",
    ):
        assert config_hash(compose_config(*TINY, key)) == base, key
    assert config_hash(compose_config(*TINY), world_size=2) != base
    assert config_hash(compose_config(*TINY, "trainer.nproc_per_node=2")) == config_hash(
        compose_config(*TINY), world_size=2
    )  # spawned or torchrun: the same ranks, the same hash
    for bad, message in (
        ("trainer.keep_checkpoints=-1", "trainer.keep_checkpoints=-1: must be a whole number ≥ 0"),
        ("tracking.heartbeat_interval=0", "tracking.heartbeat_interval=0.0: must be a finite number > 0"),
        ("tracking.claim_slots=0", "tracking.claim_slots=0: must be a whole number ≥ 1"),
    ):
        with pytest.raises(Exception, match=message):
            compose_config(*TINY, bad)
