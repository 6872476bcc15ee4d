"""Records under faults that need real processes: a full disk (a size-limited tmpfs in a private mount namespace),
a SIGKILLed trial listed stale and marked KILLED, two processes racing to claim one trial."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from harness.tracking import liveness
from harness.trial import checkpoint
from tests.conftest import TINY, new_store, run_in_process, start_harness
from tests.unit.trial.test_records import all_runs

FAST_BEAT = ["tracking.heartbeat_interval=1"]  # a dead trial is stale after 4 s


# --- 5. a full disk ------------------------------------------------------------------------------------------

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
    uri = new_store(tmp_path / "mlflow.db")
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


# --- 3. orphans -----------------------------------------------------------------------------------------------


def test_a_sigkilled_trial_is_listed_stale_and_marked_killed_with_the_reason(tmp_path):
    uri = new_store(tmp_path / "mlflow.db")
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
    uri = new_store(tmp_path / "mlflow.db")
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
