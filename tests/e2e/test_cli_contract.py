"""The command line's contract in a real `python -m harness` process: one-line refusals with exit status 2 that
leave nothing behind and never load torch or MLflow, `list` and `--help` without them. One process answers every
command in turn (its own folder and store each), so each command is checked against all that is loaded so far:
a command that loaded torch fails its own test and those after it."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import TINY, run_in_process
from tests.unit.config.test_checks import SMOKE

# Each command's main() in one interpreter; after each, what it printed, its exit status and the top-level
# packages loaded by then.
ONE_PROCESS = """
import contextlib, io, json, os, sys
from harness.__main__ import main

answers = {}
for name, folder, arguments in json.loads(sys.argv[1]):
    os.chdir(folder)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder}/mlflow.db"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(arguments)
            status = 0
        except SystemExit as exit_:
            status = exit_.code if isinstance(exit_.code, int) else 1
    if "hydra" in sys.modules:  # not imported here before a command needs it
        from hydra.core.global_hydra import GlobalHydra

        GlobalHydra.instance().clear()
    answers[name] = {"returncode": status, "stdout": out.getvalue(), "stderr": err.getvalue(),
                     "imported": sorted({module.split(".")[0] for module in sys.modules})}
print(json.dumps(answers))
"""

REFUSALS = {
    "range": (
        ["optim.weight_decay=-1"],
        ["error: optim.weight_decay=-1.0: must be a finite number ≥ 0 (0 = no decay)"],
    ),
    "misspelt key with +": (
        ["+optim.lrr=1"],
        [
            "error: optim.lrr=1: no such config key; did you mean optim.lr? (optim has: lr, weight_decay, "
            "beta1, beta2, eps, grad_clip, schedule, warmup_fraction, warmup_start_factor, final_lr_ratio, "
            "decay_fraction)"
        ],
    ),
    "device and range": (
        ["trainer.device=cuda", "data.test_offset=-1000"],
        [
            "error: data.test_offset=-1000: must be a whole number ≥ 0",
            "error: trainer.device=cuda: must be a device this machine has, and it has no CUDA device (torch ",
        ],
    ),
    "data size": (
        ["data.test_offset=100000000"],
        ["error: data.test_tokens=2048: the test window, tokens 100,000,000 … "],
    ),
}
# In this order: `list` first, before anything has loaded Hydra.
COMMANDS = {
    "list": ["list"],
    "--help": ["--help"],
    **{name: [*SMOKE, *overrides] for name, (overrides, _) in REFUSALS.items()},
    "two ranks": [*TINY, "trainer.nproc_per_node=2", "data.test_offset=100000000"],
    "value sweep": ["-m", *SMOKE, "optim.lr=2e-3,-1", "trainer.sample_top_k=5,-5"],
    "study": ["+sweep=quick", "hydra.sweeper.seeds=[1,-1]"],
}


@pytest.fixture(scope="module")
def answers(tmp_path_factory) -> dict:
    """Each command's answer, and its folder (which must stay empty)."""
    folders = {name: tmp_path_factory.mktemp("command") for name in COMMANDS}
    env = {**os.environ}
    env.pop("HYDRA_FULL_ERROR", None)
    plan = [[name, str(folders[name]), arguments] for name, arguments in COMMANDS.items()]
    result = subprocess.run(
        [sys.executable, "-c", ONE_PROCESS, json.dumps(plan)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.splitlines()[-1])
    return {name: (found[name], folders[name]) for name in COMMANDS}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_the_command_refuses_in_one_line_each_leaving_nothing_and_never_loading_torch(name, answers):
    result, folder = answers[name]
    expected = REFUSALS[name][1]
    assert result["returncode"] == 2, result["stderr"][-3000:]
    lines = result["stderr"].splitlines()
    assert len(lines) == len(expected) and all(line.startswith(start) for line, start in zip(lines, expected)), lines
    assert "Traceback" not in result["stderr"] and result["stdout"] == ""
    assert list(folder.iterdir()) == []  # no outputs/ directory, no MLflow store: nothing ran
    assert not {"torch", "mlflow"} & set(result["imported"])


def test_a_config_error_under_two_ranks_is_reported_by_the_parent_before_spawning(answers):
    result, folder = answers["two ranks"]
    assert result["returncode"] == 2
    assert result["stderr"].splitlines() == [
        "error: data.test_tokens=256: the test window, tokens 100,000,000 … 100,000,256 "
        "(data.test_offset=100000000), needs 100,000,257 tokens but the held-out split holds 45,120"
    ]
    assert "torch" not in result["imported"]  # no rank was ever spawned
    assert list(folder.iterdir()) == []


def test_hydra_full_error_shows_the_traceback_for_debugging(tmp_path):
    result = run_in_process(
        "optim.lr=-1",
        cwd=tmp_path,
        env_uri=f"sqlite:///{tmp_path}/mlflow.db",
        env={"HYDRA_FULL_ERROR": "1"},
        check=False,
    )
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "harness.config.checks.ConfigError: optim.lr=-1.0: must be" in result.stderr


@pytest.mark.parametrize("command", ["list", "--help"])
def test_list_and_help_answer_without_torch_or_mlflow_and_list_without_hydra(command, answers):
    result, _ = answers[command]
    assert result["returncode"] == 0 and "stacked_best" in result["stdout"]
    assert not {"torch", "mlflow"} & set(result["imported"])
    if command == "list":
        assert "hydra" not in result["imported"]
    else:
        assert "optim.beta1                      a number in [0, 1)" in result["stdout"]


def test_a_value_sweep_checks_every_job_before_running_any(answers):
    result, folder = answers["value sweep"]
    assert result["returncode"] == 2
    assert result["stderr"].splitlines() == [
        "error: job 1 (optim.lr=0.002 trainer.sample_top_k=-5): trainer.sample_top_k=-5: must be a whole number ≥ 0 "
        "(0 = sample from every token)",
        "error: job 2 (optim.lr=-1 trainer.sample_top_k=5): optim.lr=-1.0: must be a finite number > 0",
        "error: job 3 (optim.lr=-1 trainer.sample_top_k=-5): optim.lr=-1.0: must be a finite number > 0",
        "error: job 3 (optim.lr=-1 trainer.sample_top_k=-5): trainer.sample_top_k=-5: must be a whole number ≥ 0 "
        "(0 = sample from every token)",
    ]
    assert list(folder.iterdir()) == [] and "torch" not in result["imported"]


def test_a_study_checks_every_trial_before_it_starts(answers):
    result, folder = answers["study"]
    assert result["returncode"] == 1  # a study's errors are Hydra's (CompactHydraException): the message alone
    assert "study quick, trial baseline-s-1: seed=-1: must be a whole number in [0, 4294967295]" in result["stderr"]
    assert "Traceback" not in result["stderr"] and list(folder.iterdir()) == []
