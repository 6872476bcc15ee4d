"""HellaSwag inside a trial: scored at the end (and every N steps) on the bundled fixture, logged with its
per-example record, charted, refused before any compute when the data is missing, and never changing training."""

import json

import mlflow
import pytest
import torch

from harness.config.checks import ConfigError
from harness.config.compose import config_hash
from harness.data.hellaswag import load_hellaswag
from harness.trial.evaluation import score_hellaswag
from harness.trial.preflight import check_trial
from harness.trial.trainer import Trial
from tests.conftest import TINY, compose_config, final_weights
from tests.fixtures.hellaswag import write_fixture

# context 64: every fixture ending fits (the fixture's long contexts are truncated from the left)
HELLASWAG_TINY = [*TINY, "model.context_length=64", "eval.hellaswag=true", "eval.hellaswag_batch_size=16"]


@pytest.fixture
def fixture_file(tmp_path):
    path = tmp_path / "hellaswag_val.jsonl"
    write_fixture(path, count=24)
    return path


def test_a_trial_records_hellaswag_at_the_end_and_every_n_steps_without_changing_training(
    tmp_path, tracking_uri, fixture_file
):
    scored = compose_config(*HELLASWAG_TINY, f"eval.hellaswag_path={fixture_file}", "eval.hellaswag_interval=1")
    plain = compose_config(*TINY, "model.context_length=64")
    assert config_hash(scored) == config_hash(plain)  # scoring reads the weights; it is not another computation
    result = Trial(scored, tmp_path / "scored").run()
    Trial(plain, tmp_path / "plain").run()
    a, b = final_weights(tmp_path / "scored"), final_weights(tmp_path / "plain")
    assert all(torch.equal(a[k], b[k]) for k in a)

    client = mlflow.MlflowClient(tracking_uri)
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "hellaswag_acc_norm")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]  # every step, the last one being the final score
    assert run.data.metrics["hellaswag_examples"] == 24
    record = json.loads(mlflow.artifacts.load_text(f"{run.info.artifact_uri}/hellaswag/final.json"))
    examples = load_hellaswag(fixture_file)
    assert record["ind"] == [e.ind for e in examples] and record["label"] == [e.label for e in examples]
    assert record["acc_norm"] == run.data.metrics["hellaswag_acc_norm"] == result["hellaswag_acc_norm"]
    correct = sum(c == label for c, label in zip(record["choice_norm"], record["label"])) / 24
    assert correct == record["acc_norm"]
    # the final record is the final weights' score, recomputed from the checkpoint
    model = Trial(scored, tmp_path / "again").model
    model.load_state_dict(a)
    again = score_hellaswag(model, examples, scored.eval, None)
    assert again.choices_norm == record["choice_norm"]
    assert mlflow.artifacts.load_text(f"{run.info.artifact_uri}/hellaswag/step_000002.json")
    assert (tmp_path / "scored" / "charts" / "loss.png").stat().st_size > 0


def test_missing_hellaswag_is_refused_before_any_compute_with_the_prepare_command(tmp_path):
    missing = tmp_path / "nowhere"
    cfg = compose_config(*HELLASWAG_TINY, f"eval.hellaswag_path={missing}")
    with pytest.raises(ConfigError) as refused:
        check_trial(cfg)
    (problem,) = refused.value.problems
    assert str(missing) in problem and f"python -m harness prepare dataset=hellaswag out={missing}" in problem
    assert "\n" not in problem


def test_an_ending_longer_than_the_context_is_refused_before_any_compute(tmp_path, fixture_file):
    cfg = compose_config(
        *TINY,
        "model.context_length=8",
        "data.test_tokens=256",
        "eval.hellaswag=true",
        f"eval.hellaswag_path={fixture_file}",
    )
    with pytest.raises(ConfigError) as refused:
        check_trial(cfg)
    assert any("context_length=8" in problem and "eval.hellaswag=true" in problem for problem in refused.value.problems)


def test_scale_defaults_score_hellaswag_where_it_is_cheap_beside_training():
    assert not compose_config().eval.hellaswag  # smoke: the bundled corpus, nothing to download
    assert compose_config("scale=gpt2_small").eval.hellaswag and compose_config("scale=proxy").eval.hellaswag
