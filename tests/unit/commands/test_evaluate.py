"""`python -m harness evaluate`: a saved checkpoint's held-out test loss, logged into its trial's MLflow run
without touching the run's status."""

import os
import shutil

import mlflow
import pytest
from omegaconf import OmegaConf

from harness.commands.evaluate import main
from harness.config.checks import ConfigError
from harness.config.compose import compose
from harness.trial import checkpoint
from harness.trial.preflight import check_trial
from harness.trial.trainer import Trial
from tests.conftest import TINY, compose_config, rewrite_state, run_in_process


@pytest.fixture(scope="module")
def trained(store, tmp_path_factory):
    """A finished TINY trial (checkpoints at steps 1, 3 and 4, all kept) and its result."""
    run_dir = tmp_path_factory.mktemp("trial") / "run"
    return run_dir, Trial(compose_config(*TINY, "trainer.keep_checkpoints=null"), run_dir).run()


def checkpoint_losses(uri: str, run_id: str, metric: str = "checkpoint_test_loss") -> list[tuple[int, float]]:
    history = mlflow.MlflowClient(uri).get_metric_history(run_id, metric)
    return sorted((m.step, m.value) for m in history)


def test_command_reproduces_the_trials_test_loss_and_logs_it_at_the_checkpoint_step(trained, store):
    run_dir, result = trained
    before = mlflow.MlflowClient(store).get_run(result["run_id"]).info
    out = run_in_process("evaluate", str(run_dir), env_uri=store)
    assert out.stdout.startswith(
        f"checkpoint_test_loss {result['test_loss']:.6f}  checkpoint_test_loss_amp "
        f"{result['test_loss_amp']:.6f}  step 4  run {result['run_id']}"
    )
    assert checkpoint_losses(store, result["run_id"])[-1] == (4, result["test_loss"])  # the same fp32 evaluation
    assert checkpoint_losses(store, result["run_id"], "checkpoint_test_loss_amp")[-1] == (4, result["test_loss_amp"])
    after = mlflow.MlflowClient(store).get_run(result["run_id"]).info
    assert (after.status, after.end_time) == (before.status, before.end_time) == ("FINISHED", before.end_time)


def test_best_pointer_and_step_directories_are_evaluated_and_status_is_kept(trained, store, capsys):
    run_dir, result = trained
    client = mlflow.MlflowClient(store)
    client.set_terminated(result["run_id"], "KILLED")  # any previous status must survive the evaluation
    try:
        assert main([str(run_dir / "checkpoints" / "step_000001")]) == 0
        best_step = int(checkpoint.resolve(run_dir / "checkpoints", "best").name.removeprefix("step_"))
        assert main([str(run_dir), "best"]) == 0
        assert client.get_run(result["run_id"]).info.status == "KILLED"
    finally:
        client.set_terminated(result["run_id"], "FINISHED")
    losses = dict(checkpoint_losses(store, result["run_id"]))
    assert {1, best_step} <= set(losses) and losses[1] != result["test_loss"]
    printed = capsys.readouterr().out
    assert f"checkpoint_test_loss {losses[1]:.6f}  checkpoint_test_loss_amp" in printed and "  step 1  " in printed
    assert f"checkpoint_test_loss {losses[best_step]:.6f}  checkpoint_test_loss_amp" in printed


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["{tmp}/nothing"], "no `latest` checkpoint in {tmp}/nothing"),
        (["{run}", "newest"], "after PATH give at most one of: best, latest"),
        (["{run}/checkpoints/step_000004", "best"], "is one checkpoint; `best` picks a checkpoint of a run directory"),
    ],
)
def test_bad_arguments_are_explained(arguments, message, trained, tmp_path, capsys):
    run_dir, _ = trained
    fill = {"tmp": tmp_path, "run": run_dir}
    assert main([a.format(**fill) for a in arguments]) == 2
    assert message.format(**fill) in capsys.readouterr().err


def test_checkpoint_without_its_config_or_with_another_config_is_refused(trained, tmp_path, capsys):
    run_dir, _ = trained
    moved = shutil.copytree(run_dir / "checkpoints" / "step_000004", tmp_path / "loose" / "step_000004")
    assert main([str(moved)]) == 2
    assert f"{tmp_path}/config.yaml is missing" in capsys.readouterr().err
    edited = shutil.copytree(run_dir, tmp_path / "edited")
    config = OmegaConf.load(edited / "config.yaml")
    config.seed = 7
    OmegaConf.save(config, edited / "config.yaml")
    assert main([str(edited)]) == 2
    assert "was saved with config_hash" in capsys.readouterr().err


def test_a_store_without_the_run_is_refused_before_evaluating(trained, store, tmp_path, monkeypatch, capsys):
    run_dir, _ = trained
    foreign = shutil.copytree(run_dir, tmp_path / "foreign")
    rewrite_state(checkpoint.resolve(foreign / "checkpoints"), run_id="0" * 32)
    assert main([str(foreign)]) == 2
    assert f"the checkpoint's MLflow run {'0' * 32} is not in {store}" in capsys.readouterr().err
    missing = f"sqlite:///{tmp_path / 'missing.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", missing)
    assert main([str(run_dir)]) == 2  # the trial's own store is its config's; another one is refused, named
    assert f"the trial is recorded in {store}, but MLFLOW_TRACKING_URI names {missing}" in capsys.readouterr().err
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    config = OmegaConf.load(foreign / "config.yaml")
    config.tracking.uri = missing
    OmegaConf.save(config, foreign / "config.yaml")
    assert main([str(foreign)]) == 2
    assert f"no MLflow store at {missing}" in capsys.readouterr().err
    assert not (tmp_path / "missing.db").exists()


def test_truncated_checkpoint_files_are_named_by_evaluate_and_by_resume(trained, tmp_path, capsys):
    run_dir, _ = trained
    damaged = shutil.copytree(run_dir, tmp_path / "damaged")
    latest = checkpoint.resolve(damaged / "checkpoints")
    for name in (checkpoint.MODEL_FILE, checkpoint.STATE_FILE):
        with open(latest / name, "r+b") as f:
            f.truncate(f.seek(0, os.SEEK_END) - 100)
    assert main([str(damaged)]) == 2
    err = capsys.readouterr().err
    assert f"{latest / checkpoint.MODEL_FILE} is truncated or damaged: " in err
    assert f"{latest / checkpoint.STATE_FILE} is truncated or damaged (" in err

    with pytest.raises(ConfigError) as refused:  # resuming it: refused before anything runs
        check_trial(compose([f"resume={damaged}"]))
    model_line, state_line = refused.value.problems
    assert model_line.startswith(f"resume={damaged}: {latest / checkpoint.MODEL_FILE} is truncated or damaged")
    assert model_line.endswith(
        f"to resume from an earlier checkpoint, write one of step_000001, step_000003 into "
        f"{damaged / 'checkpoints' / 'latest'}"
    )


def test_hellaswag_that_cannot_be_scored_is_refused_before_anything_is_evaluated(trained, store, tmp_path, capsys):
    from tests.fixtures.hellaswag import write_fixture

    run_dir, result = trained
    write_fixture(tmp_path / "hellaswag.jsonl", count=24)  # some endings are longer than TINY's 32-token context
    before = checkpoint_losses(store, result["run_id"])
    assert main([str(run_dir), "hellaswag=true", f"hellaswag_path={tmp_path / 'hellaswag.jsonl'}"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: eval.hellaswag=true: HellaSwag example ind=") and "context_length=32" in error
    assert main([str(run_dir), "hellaswag=yes"]) == 2
    assert "hellaswag=yes: must be true or false" in capsys.readouterr().err
    assert checkpoint_losses(store, result["run_id"]) == before  # nothing was evaluated or logged
