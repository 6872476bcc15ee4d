"""Records under faults, in-process: divergence at the end, checkpoints verified and bounded, resumes that would
change a record, a dead store, claims. A full disk, SIGKILLed trials and racing claims need real processes:
tests/e2e/test_record_processes.py."""

import contextlib
import io
import os
import shutil
import signal
import socket
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
from tests.conftest import TINY, compose_config, final_weights, run_in_process


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


# --- 5. checkpoints: verified, bounded, fsynced, cleaned ------------------------------------------------------


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


def test_ctrl_c_inside_a_checkpoint_write_is_an_interruption_with_latest_intact(tmp_path, monkeypatch):
    """A real SIGINT landing while torch.save writes the training state (torch turns the KeyboardInterrupt raised
    in its write callback into an 'unexpected pos' RuntimeError, which ended the run FAILED): it stays Ctrl-C,
    the partial checkpoint is removed and `latest` still names the one before."""
    model = torch.nn.Linear(4, 4)
    checkpoint.begin(tmp_path, 1)
    checkpoint.commit(tmp_path, 1, model, {"run_id": "r"}, is_best=True)
    writes = []

    class SignalledFile(io.FileIO):
        def write(self, data):
            writes.append(len(data))
            if len(writes) == 3:  # past the archive's first record: torch's writer is under way
                os.kill(os.getpid(), signal.SIGINT)  # handled at the next bytecode, in this write
            return super().write(data)

    monkeypatch.setattr(checkpoint, "open", lambda path, mode: SignalledFile(path, mode), raising=False)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        checkpoint.begin(tmp_path, 2)
        with pytest.raises(KeyboardInterrupt):
            checkpoint.commit(tmp_path, 2, model, {"run_id": "r", "state": torch.zeros(1000)}, is_best=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert len(writes) >= 3 and sorted(p.name for p in tmp_path.iterdir()) == ["best", "latest", "step_000001"]
    assert checkpoint.resolve(tmp_path).name == "step_000001"


def test_a_resume_after_ctrl_c_between_the_latest_and_best_pointers_matches_the_uninterrupted_trial(
    tmp_path, monkeypatch, tracking_uri
):
    """A real SIGINT while the first checkpoint's `best` pointer is written leaves `latest` without a `best`; the
    resumed trial crashed at its next checkpoint that was not best. Its weights and `best` are the uninterrupted
    trial's (in this config the second period is not best)."""
    longer = [*TINY, "trainer.max_steps=11", "trainer.checkpoint_interval=5", "model.d_model=64"]
    run_in_process(*longer, f"hydra.run.dir={tmp_path / 'whole'}", cwd=tmp_path, env_uri=tracking_uri)
    point = checkpoint._point
    signalled = []

    def point_or_sigint(pointer: Path, target: str) -> None:
        if pointer.name == "best" and not signalled:
            signalled.append(target)
            os.kill(os.getpid(), signal.SIGINT)  # handled here, before the pointer is written
        point(pointer, target)

    monkeypatch.setattr(checkpoint, "_point", point_or_sigint)
    cut_dir = tmp_path / "cut"
    cut = run_in_process(*longer, f"hydra.run.dir={cut_dir}", cwd=tmp_path, env_uri=tracking_uri, check=False)
    assert cut.returncode == 130 and "stopped: interrupted (Ctrl-C)" in cut.stderr, cut.stderr
    assert signalled == ["step_000001"] and sorted(p.name for p in (cut_dir / "checkpoints").iterdir()) == [
        "latest",
        "step_000001",
    ]
    monkeypatch.setattr(checkpoint, "_point", point)
    run_in_process(f"resume={cut_dir}", cwd=tmp_path, env_uri=tracking_uri)
    whole, resumed = tmp_path / "whole" / "checkpoints", cut_dir / "checkpoints"
    assert [p["is_best"] for p in torch.load(whole / "step_000011" / checkpoint.STATE_FILE)["periods"][:2]] == [
        True,
        False,
    ]
    assert checkpoint.resolve(resumed, "best").name == checkpoint.resolve(whole, "best").name
    assert checkpoint.find(cut_dir).name == "step_000011"
    expected, got = final_weights(tmp_path / "whole"), final_weights(cut_dir)
    assert all((expected[name] == got[name]).all() for name in expected)
