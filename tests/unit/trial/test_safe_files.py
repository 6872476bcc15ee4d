"""Other people's files and true records, in-process: crafted checkpoints that would run code, pointers and
checkpoints of another run, a resume's train_seconds, stale failure reasons, bookkeeping overrides on resume,
absurd models, one-line refusals, and the study's micro-batch loss min/max."""

import fcntl
import json
import os
import pickle
import random
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from harness.commands.evaluate import main as evaluate_main
from harness.commands.export import main as export_main
from harness.tracking import liveness
from harness.trial import checkpoint, convert
from harness.trial.trainer import Trial
from harness.trial.weights import build_model
from tests.conftest import TINY, compose_config, rewrite_state, run_in_process


@pytest.fixture(scope="module")
def finished(store, tmp_path_factory):
    """A FINISHED TINY trial every checkpoint of which is kept (steps 1, 3 and 4)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    result = Trial(compose_config(*TINY, "trainer.keep_checkpoints=null"), run_dir).run()
    return run_dir, result


def killed_copy(finished, store: str, destination: Path, step: int = 4) -> Path:
    """A copy of the finished trial's run directory, its run marked KILLED, `latest` at `step`."""
    run_dir, result = finished
    copy = shutil.copytree(run_dir, destination)
    (copy / "checkpoints" / "latest").write_text(f"step_{step:06d}\n")
    mlflow.MlflowClient(store).set_terminated(result["run_id"], "KILLED")
    return copy


def resign(step_dir: Path, *names: str) -> None:
    manifest = checkpoint.read_manifest(step_dir)
    for name in names:
        path = step_dir / name
        manifest["files"][name] = {"sha256": checkpoint.sha256(path), "bytes": path.stat().st_size}
    (step_dir / checkpoint.MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))


class CreatesMarker:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def one_line_error(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("name", [checkpoint.STATE_FILE, "rng_rank0.pt"])
def test_a_crafted_checkpoint_file_runs_no_code_in_evaluate_export_or_resume(finished, store, tmp_path, capsys, name):
    copy = killed_copy(finished, store, tmp_path / "run")
    step_dir = copy / "checkpoints" / "step_000004"
    marker = tmp_path / "marker"
    original = torch.load(step_dir / name, weights_only=True)
    torch.save({**original, "payload": CreatesMarker(marker)}, step_dir / name)
    resign(step_dir, name)
    pickle.loads(pickle.dumps(CreatesMarker(tmp_path / "proof")))  # the payload does run when unpickled
    assert (tmp_path / "proof").exists()

    assert evaluate_main([str(copy)]) == 2
    evaluated = capsys.readouterr().err.strip().splitlines()
    assert export_main([str(copy), f"out={tmp_path / 'hf'}"]) == 2
    exported = capsys.readouterr().err.strip().splitlines()
    resumed = run_in_process(f"resume={copy}", f"hydra.run.dir={tmp_path / 'log'}", cwd=tmp_path, check=False)

    assert not marker.exists()
    for lines in (evaluated, exported, [one_line_error(resumed)]):
        assert len(lines) == 1 and f"{step_dir / name} holds more than plain data" in lines[0], lines
    assert not (tmp_path / "hf").exists()
    assert mlflow.MlflowClient(store).get_run(finished[1]["run_id"]).info.status == "KILLED"


def legacy_rng() -> dict:
    """RNG state as checkpoints stored it before it was plain data: Python's tuple and numpy's legacy tuple."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def test_an_old_checkpoint_is_refused_with_the_conversion_and_converts_once_knowingly(finished, store, tmp_path):
    copy = killed_copy(finished, store, tmp_path / "run")
    step_dir = copy / "checkpoints" / "step_000004"
    random.seed(7)
    np.random.seed(8)
    torch.manual_seed(9)
    old = legacy_rng()
    torch.save(old, step_dir / "rng_rank0.pt")
    resign(step_dir, "rng_rank0.pt")
    with pytest.raises(checkpoint.CheckpointError, match=r"python -m harness\.trial\.convert .*step_000004"):
        checkpoint.check_plain(step_dir)

    assert convert.main([str(step_dir)]) == 0
    checkpoint.check_plain(step_dir)  # plain data now, its manifest re-signed
    state = checkpoint.load(step_dir, build_model(compose_config(*TINY)))
    checkpoint.set_rng_state(state["rng"])
    assert random.random() == (random.seed(7), random.random())[1]
    assert np.random.rand() == (np.random.seed(8), np.random.rand())[1]
    assert torch.rand(1).item() == (torch.manual_seed(9), torch.rand(1).item())[1]


def test_rng_state_round_trips_through_plain_data(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.save(checkpoint.rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    checkpoint.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_a_pointer_outside_its_run_and_a_checkpoint_of_another_run_are_refused(finished, store, tmp_path):
    copy = killed_copy(finished, store, tmp_path / "a")
    other = shutil.copytree(finished[0], tmp_path / "b")
    (copy / "checkpoints" / "latest").write_text("../../b/checkpoints/step_000004\n")
    escaped = run_in_process(f"resume={copy}", f"hydra.run.dir={tmp_path / 'log'}", cwd=tmp_path, check=False)
    assert "a pointer must name a step_NNNNNN checkpoint inside" in one_line_error(escaped)

    foreign = copy / "checkpoints" / "step_000005"
    shutil.copytree(other / "checkpoints" / "step_000004", foreign)
    rewrite_state(foreign, run_id="0123456789abcdef")  # a consistent checkpoint of another run
    (copy / "checkpoints" / "latest").write_text("step_000005\n")
    hijack = run_in_process(f"resume={copy}", f"hydra.run.dir={tmp_path / 'log'}", cwd=tmp_path, check=False)
    line = one_line_error(hijack)
    assert f"{foreign} belongs to MLflow run 0123456789abcdef" in line and finished[1]["run_id"] in line
    assert mlflow.MlflowClient(store).get_run(finished[1]["run_id"]).info.status == "KILLED"


def test_a_resume_of_a_directory_another_resume_holds_is_refused_before_its_checkpoints_are_read(
    finished, store, tmp_path
):
    """The running resume prunes checkpoints as it goes: a second resume reading one as it is deleted must still
    say who holds the directory, not that the checkpoint is incomplete."""
    copy = killed_copy(finished, store, tmp_path / "run")
    (copy / "checkpoints" / "step_000004" / "rng_rank0.pt").unlink()  # half deleted by the holder's pruning
    with open(copy / checkpoint.LOCK_FILE, "w") as held:
        held.write("process 4242 on elsewhere\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as the holding process's hold_run_lock does
        second = run_in_process(f"resume={copy}", f"hydra.run.dir={tmp_path / 'log'}", cwd=tmp_path, check=False)
    assert one_line_error(second) == (
        f"error: resume={copy}: {copy} is being resumed by process 4242 on elsewhere (it holds "
        f"{(copy / checkpoint.LOCK_FILE).resolve()}); wait for it to end"
    )
    assert checkpoint.run_lock_holder(copy) is None  # released with its holder


def test_a_resumed_trial_counts_all_its_training_time_and_ends_without_a_stale_reason(finished, store, tmp_path):
    copy = killed_copy(finished, store, tmp_path / "run", step=3)
    rewrite_state(copy / "checkpoints" / "step_000003", train_seconds=1000.0)  # as if 1000 s had been spent
    run_id = finished[1]["run_id"]
    client = mlflow.MlflowClient(store)
    client.set_tag(run_id, liveness.REASON_TAG, "interrupted (signal 15)")
    resumed = run_in_process(
        f"resume={copy}", "trainer.progress=false", f"hydra.run.dir={tmp_path / 'log'}", cwd=tmp_path, check=False
    )
    assert resumed.returncode == 0, resumed.stderr
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and liveness.REASON_TAG not in run.data.tags
    [last] = [m for m in client.get_metric_history(run_id, "train_seconds") if m.step == 4][-1:]
    assert 1000.0 < last.value < 1000.0 + 600
    assert run.data.tags["cpu_threads"] == str(torch.get_num_threads())


def test_resume_refuses_only_the_overrides_passed_that_change_the_trial(finished, store, tmp_path):
    copy = killed_copy(finished, store, tmp_path / "run")
    refused = run_in_process(
        f"resume={copy}", "optim.lr=0.5", "trainer.progress=false", f"hydra.run.dir={tmp_path / 'l'}", check=False
    )
    line = one_line_error(refused)
    listed = line.split("change the trial (", 1)[1].split("); ", 1)[0]
    assert listed.startswith("optim.lr:") and listed.endswith("→ 0.5") and "," not in listed


def test_an_absurd_model_is_refused_with_its_memory_estimate_before_anything_is_made(tmp_path):
    out, store = tmp_path / "out", tmp_path / "mlflow.db"
    result = run_in_process(
        "model.d_model=100000",
        "model.n_head=1",
        f"hydra.run.dir={out}",
        cwd=tmp_path,
        env_uri=f"sqlite:///{store}",
        check=False,
    )
    line = one_line_error(result)
    assert "model.d_model=100000" in line and "TB to train" in line and "use a smaller model" in line
    assert not out.exists() and not store.exists()


@pytest.mark.parametrize("arguments", [["study=a;rm"], ["hydra.run.dir=/tmp/a", "b"]])  # the second: `dir=/tmp/a b`
def test_hydra_grammar_errors_are_one_line_and_exit_2(tmp_path, tracking_uri, arguments):
    line = one_line_error(run_in_process(*arguments, cwd=tmp_path, check=False))
    assert line.startswith(f"error: {arguments[-1]}: not an override Hydra's grammar accepts") and "quotes" in line


def test_a_malformed_overlay_is_one_line_and_exit_2(tmp_path, tracking_uri):
    conf = shutil.copytree(Path(__file__).parents[3] / "conf", tmp_path / "conf")
    (conf / "intervention" / "broken.yaml").write_text("# @package _global_\noptim: {lr: [1, 2\n")
    result = run_in_process("--config-dir", str(conf), "+intervention=broken", cwd=tmp_path, check=False)
    line = one_line_error(result)
    assert "broken.yaml" in line


def test_replay_into_a_store_without_the_run_is_one_line(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    store = f"sqlite:///{tmp_path / 'other.db'}"
    header = {"run_id": "0123456789abcdef", "uri": store, "experiment_id": "0"}
    (run_dir / "unsent_records.jsonl").write_text(json.dumps(header) + "\n")
    line = one_line_error(run_in_process("replay", str(run_dir), f"tracking.uri={store}", check=False))
    assert f"no MLflow store at {store}" in line and not (tmp_path / "other.db").exists()  # none is created
    mlflow.MlflowClient(store).search_experiments()  # a store, without the run
    line = one_line_error(run_in_process("replay", str(run_dir), f"tracking.uri={store}", check=False))
    assert f"run 0123456789abcdef of {run_dir / 'unsent_records.jsonl'} is not in {store}" in line


def test_a_period_records_the_study_micro_batch_loss_min_and_max(finished):
    run_dir, _ = finished
    state = torch.load(run_dir / "checkpoints" / "step_000004" / checkpoint.STATE_FILE, weights_only=True)
    history = dict(zip(state["history"]["step"], state["history"]["loss"]))
    first = 1
    for period in state["periods"]:
        steps = [history[s] for s in range(first, period["step"] + 1)]
        low, high = period["microbatch_loss_min"], period["microbatch_loss_max"]
        assert low <= period["train_loss_min"] <= period["train_loss_max"] <= high
        assert all(low <= loss <= high for loss in steps)
        assert low < high  # two micro-batches a step: the study's extremes lie beyond the step means
        first = period["step"] + 1
