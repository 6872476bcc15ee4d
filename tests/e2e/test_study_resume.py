"""A study SIGKILLed mid-trial continues that trial's run in its next execution, bit-identically to an
uninterrupted study; a diverged trial is a result that a later execution does not run again."""

import os
import signal
import time

import torch

from tests.conftest import final_weights, new_store, run_in_process
from tests.e2e.test_preemption import LONG, wait_for
from tests.e2e.test_study_processes import SWEEP_TINY, run_sweep, run_sweep_in_process, runs, start_sweep, table


def test_a_sigkilled_study_resumes_its_trial_in_the_same_run_bit_identically(tmp_path):
    """A study SIGKILLed mid-trial: the next execution continues that trial's run from its latest checkpoint; the
    study ends with one FINISHED run whose weights equal an uninterrupted study's."""
    uri = new_store(tmp_path / "mlflow.db")
    study = ["hydra.sweeper.arms=[baseline]", "hydra.sweeper.seeds=[1]", *LONG[2:]]
    steps = ["trainer.max_steps=20", "trainer.checkpoint_interval=10"]
    first = start_sweep(*study, *steps, sweep_dir=tmp_path / "first", uri=uri)
    wait_for(tmp_path / "first" / "0" / "checkpoints" / "step_000011", first)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    time.sleep(4.5)  # 4 heartbeat intervals: the killed execution's runs are stale

    plan = run_in_process("plan", "+sweep=quick", *SWEEP_TINY, *study, *steps, env_uri=uri)
    assert "resume: 1 trial continue an unfinished run:" in plan.stdout, plan.stdout + plan.stderr
    assert "baseline-s1: run " in plan.stdout and "from step_000011, 11 steps done" in plan.stdout
    second = run_sweep(*study, *steps, sweep_dir=tmp_path / "second", uri=uri)
    assert second.returncode == 0, second.stdout + second.stderr
    resumed = [r for r in runs(uri) if r.data.tags.get("resumed_from")]
    assert len(resumed) == 1, second.stdout + second.stderr
    [killed] = resumed
    assert f"baseline-s1 resumes run {killed.info.run_id} (KILLED) from step_000011" in second.stdout
    assert table(second.stdout) == {"baseline-s1": "FINISHED"}
    assert "resumed from step_000011" in second.stdout
    assert [r.info.status for r in runs(uri)] == ["FINISHED"]  # the same run, continued

    whole_uri = new_store(tmp_path / "whole.db")
    whole = run_sweep_in_process(*study, *steps, sweep_dir=tmp_path / "whole", uri=whole_uri)
    assert whole.returncode == 0, whole.stdout + whole.stderr
    cut_weights, whole_weights = final_weights(tmp_path / "first" / "0"), final_weights(tmp_path / "whole" / "0")
    assert all(torch.equal(cut_weights[k], whole_weights[k]) for k in whole_weights)


def test_a_diverged_trial_is_a_result_and_not_run_again(tmp_path):
    uri = new_store(tmp_path / "mlflow.db")
    study = [
        "hydra.sweeper.arms=[baseline]",
        "hydra.sweeper.seeds=[1]",
        "optim.lr=1e30",
        "trainer.divergence_patience=1",
    ]
    first = run_sweep_in_process(*study, sweep_dir=tmp_path / "first", uri=uri)
    assert first.returncode == 1 and table(first.stdout) == {"baseline-s1": "FAILED"}, first.stdout + first.stderr
    assert "baseline-s1 diverged (a result; rerun=true runs them again)" in first.stderr
    [diverged] = runs(uri)
    second = run_sweep_in_process(*study, sweep_dir=tmp_path / "second", uri=uri)
    assert f"baseline-s1 is not run again: its run {diverged.info.run_id} diverged" in second.stdout
    assert table(second.stdout) == {"baseline-s1": "FAILED"} and len(runs(uri)) == 1
