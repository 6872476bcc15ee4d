"""A study trial continues an unfinished run from the newest checkpoint that verifies, whatever `latest` says."""

import shutil

import mlflow

from tests.e2e.test_study_processes import run_sweep_in_process, runs

ONE_TRIAL = [
    "hydra.sweeper.arms=[baseline]",
    "hydra.sweeper.seeds=[1]",
    "trainer.max_steps=4",
    "trainer.keep_checkpoints=null",
]


def test_a_checkpoint_newer_than_latest_is_where_the_study_resumes_and_what_it_says(tmp_path, tracking_uri):
    """A writer killed after renaming step_000003 into place and before moving `latest` leaves `latest` at
    step_000001: the study resumes from step_000003, as it prints, and the run records it."""
    first = run_sweep_in_process(*ONE_TRIAL, sweep_dir=tmp_path / "first", uri=tracking_uri)
    assert first.returncode == 0, first.stdout + first.stderr
    [run] = runs(tracking_uri)
    checkpoints = tmp_path / "first" / "0" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_000001", "step_000003", "step_000004"]
    shutil.rmtree(checkpoints / "step_000004")
    (checkpoints / "latest").write_text("step_000001\n")
    (checkpoints / "best").write_text("step_000003\n")
    mlflow.MlflowClient(tracking_uri).set_terminated(run.info.run_id, "KILLED")

    second = run_sweep_in_process(*ONE_TRIAL, sweep_dir=tmp_path / "second", uri=tracking_uri)
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"continuing run {run.info.run_id} (KILLED) from {checkpoints / 'step_000003'}" in second.stdout
    after = mlflow.MlflowClient(tracking_uri).get_run(run.info.run_id)
    assert after.info.status == "FINISHED" and after.data.tags["resumed_from"] == "step_000003", after.data.tags
