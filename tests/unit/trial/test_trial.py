import mlflow
import pytest
import torch
from safetensors.torch import load_file

from analysis.load import mlflow_store
from harness.config.compose import config_hash
from harness.trial import checkpoint
from harness.trial.trainer import Trial
from harness.trial.weights import build_model, fingerprint
from interventions import REGISTRY
from tests.conftest import TINY, compose_config, new_store, run_in_process

CONTRACT_TAGS = [
    "intervention",
    "seed",
    "train_seed",
    "data_seed",
    "init_fingerprint",
    "config_hash",
    "scale",
    "mlflow.source.git.commit",
    "code_version",
]


def only_run(uri: str):
    with mlflow_store(uri) as fluent:  # not mlflow.set_tracking_uri: it would redirect the tests after this one
        runs = fluent.search_runs(search_all_experiments=True)
    assert len(runs) == 1
    return mlflow.MlflowClient(uri).get_run(runs.run_id[0])


def test_cli_trial_lands_in_mlflow_with_the_whole_contract(tmp_path):
    uri = new_store(tmp_path / "mlflow.db")
    out = run_in_process(
        *TINY,
        "+intervention=[no_dropout,gradient_clipping]",
        "seed=67",
        "train_seed=23",
        "study=demo",
        f"hydra.run.dir={tmp_path}/run",
        cwd=tmp_path,
        env_uri=uri,
    ).stdout
    run = only_run(uri)
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    for tag in CONTRACT_TAGS + ["study"]:
        assert tags.get(tag), tag
    assert (
        tags["intervention"],
        tags["seed"],
        tags["train_seed"],
        tags["data_seed"],
        tags["study"],
        tags["scale"],
    ) == ("gradient_clipping+no_dropout", "67", "23", "none", "demo", "smoke")
    assert run.data.params["model.dropout"] == "0.0" and run.data.params["optim.grad_clip"] == "3.5"
    assert run.data.params["trainer.max_steps"] == "4"
    metrics = run.data.metrics
    for metric in [
        "test_loss",
        "test_loss_amp",
        "train_seconds",
        "train_loss",
        "train_loss_avg",
        "train_loss_min",
        "train_loss_max",
        "grad_norm_max",
        "grad_norm_avg",
        "clip_fraction",
        "nonfinite_element",
        "nonfinite_overflow",
        "nonfinite_exploding",
        "nonfinite_scaler_skips",
        "lr",
        "tokens_per_sec",
    ]:
        assert metric in metrics, metric
    assert 5 < metrics["test_loss"] < 12
    assert f"{metrics['test_loss']:.6f}" in out
    assert metrics["test_loss_amp"] == pytest.approx(metrics["test_loss"], rel=1e-6)  # tf32 on CPU: no autocast
    assert tags["test_loss_amp_autocast"] == "none"
    client = mlflow.MlflowClient(uri)
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 4
    # periods end after 0-based steps 0, 2 (step % 2 == 0) and 3 (the last), as the reference code's
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss_avg")] == [1, 3, 4]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "charts", "samples", "checkpoints.json"} <= artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "charts")} == {
        "charts/loss.png",
        "charts/grad_norm.png",
        "charts/lr.png",
    }
    sample = mlflow.artifacts.load_text(f"{run.info.artifact_uri}/samples/step_000004.txt")
    assert sample.startswith("Every effort moves you") and len(sample) > len("Every effort moves you")
    assert (tmp_path / "run" / "checkpoints" / "step_000004" / "model.safetensors").exists()


def run_tiny(tmp_path, name: str, *overrides: str):
    cfg = compose_config(*TINY, *overrides)
    return Trial(cfg, tmp_path / name).run()


def final_weights(tmp_path, name: str) -> dict:
    return load_file(str(checkpoint.resolve(tmp_path / name / "checkpoints") / checkpoint.MODEL_FILE))


def test_same_config_and_seeds_give_bit_identical_weights(tmp_path, tracking_uri):
    first = run_tiny(tmp_path, "a", "seed=3", "train_seed=5")
    # what config_hash leaves out (samples, progress, checksums) must not change the computation
    unhashed = [
        "trainer.sample_prompt=Hello",
        "trainer.sample_tokens=7",
        "trainer.sample_top_k=3",
        "trainer.sample_temperature=1.4",
        "trainer.progress=true",
        "data.verify_checksums=false",
    ]
    assert config_hash(compose_config(*TINY, "seed=3", "train_seed=5", *unhashed)) == config_hash(
        compose_config(*TINY, "seed=3", "train_seed=5")
    )
    second = run_tiny(tmp_path, "b", "seed=3", "train_seed=5", *unhashed)
    a, b = final_weights(tmp_path, "a"), final_weights(tmp_path, "b")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (first["test_loss"], first["test_loss_amp"]) == (second["test_loss"], second["test_loss_amp"])
    other_train_seed = run_tiny(tmp_path, "c", "seed=3", "train_seed=6")
    c = final_weights(tmp_path, "c")
    assert other_train_seed["init_fingerprint"] == first["init_fingerprint"]  # same init, other dropout masks
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_init_fingerprint_changes_exactly_when_the_registry_says(name):
    seed = ("seed=67",)
    baseline = fingerprint(build_model(compose_config(*TINY, *seed)))
    changed = fingerprint(build_model(compose_config(*TINY, *seed, f"+intervention={name}"))) != baseline
    assert changed == REGISTRY[name].changes_init


def test_no_dropout_keeps_and_qkv_bias_changes_the_logged_init_fingerprint(tmp_path, tracking_uri):
    base = run_tiny(tmp_path, "base", "seed=67")["init_fingerprint"]
    assert run_tiny(tmp_path, "nd", "seed=67", "+intervention=no_dropout")["init_fingerprint"] == base
    assert run_tiny(tmp_path, "qkv", "seed=67", "+intervention=qkv_bias")["init_fingerprint"] != base
    with mlflow_store(tracking_uri) as fluent:
        runs = fluent.search_runs(search_all_experiments=True).set_index("tags.intervention")
    assert runs.loc["no_dropout", "tags.init_fingerprint"] == runs.loc["baseline", "tags.init_fingerprint"] == base
    assert runs.loc["qkv_bias", "tags.init_fingerprint"] != base


def test_tied_weights_train_and_checkpoint_once(tmp_path, tracking_uri):
    run_tiny(tmp_path, "tied", "+intervention=weight_tying")
    weights = final_weights(tmp_path, "tied")
    assert ("tok_emb.weight" in weights) != ("out_head.weight" in weights)  # the shared matrix is stored once
    model = build_model(compose_config(*TINY, "+intervention=weight_tying"))
    checkpoint.load(checkpoint.resolve(tmp_path / "tied" / "checkpoints"), model)
    assert model.out_head.weight is model.tok_emb.weight


@pytest.mark.parametrize("error, status", [(KeyboardInterrupt(), "KILLED"), (RuntimeError("boom"), "FAILED")])
def test_an_interrupted_or_failing_trial_never_ends_finished(tmp_path, tracking_uri, monkeypatch, error, status):
    real_step = Trial.train_step

    def step_then_fail(self, step):
        if step == 2:
            raise error
        return real_step(self, step)

    monkeypatch.setattr(Trial, "train_step", step_then_fail)
    with pytest.raises(type(error)):
        run_tiny(tmp_path, "x")
    run = only_run(tracking_uri)
    assert run.info.status == status
    if status == "FAILED":
        assert run.data.tags["failure_reason"] == "RuntimeError: boom"


def test_fp16_without_cuda_is_refused_clearly_unless_the_cpu_is_asked_for(tmp_path, tracking_uri):
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="fp16_amp but no CUDA device was found.*trainer.device=cpu"):
            Trial(compose_config(*TINY, "trainer.precision=fp16_amp"), tmp_path / "auto")
    assert Trial(
        compose_config(*TINY, "trainer.precision=fp16_amp", "trainer.device=cpu"), tmp_path / "cpu"
    ).scaler.is_enabled()
