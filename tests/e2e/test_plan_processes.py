"""`python -m harness plan` in a fresh interpreter: it answers, and refuses bad input in one line each, without
importing torch or mlflow."""

import os
import subprocess
import sys


def harness(*args: str, cwd) -> subprocess.CompletedProcess:
    """The command with no store yet (a store that exists is read, which loads MLflow: not this test's case),
    whatever store the environment of the test session names."""
    return subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "harness", *args],
        cwd=cwd,
        env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'not-created.db'}"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def imported(result: subprocess.CompletedProcess) -> set[str]:
    return {
        line.split("|")[-1].strip().split(".")[0]
        for line in result.stderr.splitlines()
        if line.startswith("import time:")
    }


def test_the_command_answers_without_torch_and_refuses_bad_input_in_one_line_each(tmp_path):
    study = harness("plan", "+sweep=interventions", "scale=gpt2_small", cwd=tmp_path)
    assert study.returncode == 0, study.stderr[-2000:]
    assert "total: 24 trials; 78,246,051,840 tokens;" in study.stdout
    assert not {"torch", "mlflow"} & imported(study) and list(tmp_path.iterdir()) == []

    refused = harness(
        "plan", "gpus=0", "mfu=2", "price_per_gpu_hour=-1", "optim.lrr=1", "optim.lr=1e-3,2e-3", cwd=tmp_path
    )
    errors = [line for line in refused.stderr.splitlines() if not line.startswith("import time:")]
    assert (
        refused.returncode == 2
        and refused.stdout == ""
        and errors
        == [
            "error: gpus=0: must be a whole number ≥ 1",
            "error: mfu=2: must be a number in (0, 1]",
            "error: price_per_gpu_hour=-1: must be a finite number ≥ 0 (US$)",
            "error: optim.lrr=1: no such config key; did you mean optim.lr? (optim has: lr, weight_decay, beta1, beta2, "
            "eps, grad_clip, schedule, warmup_fraction, warmup_start_factor, final_lr_ratio, decay_fraction)",
            "error: optim.lr=1e-3,2e-3: a plan covers one trial, or a study with +sweep=NAME; plan each value on its own",
        ]
    )
    assert "torch" not in imported(refused)
