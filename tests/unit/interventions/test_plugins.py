"""The plugin path: hook points that let intervention code change a trial without editing the loop."""

import math

import mlflow
import pytest
import torch

from harness.trial.model import cross_entropy
from harness.trial.plugins import Plugin, register
from harness.trial.trainer import Trial
from harness.trial.weights import build_model
from interventions.z_loss import ZLoss
from tests.conftest import TINY, compose_config


@register("freeze_position_embeddings_for_test")
class FreezePositionEmbeddings(Plugin):
    """Defined here, not shipped: uses every hook so the test sees each one applied."""

    def __init__(self, lr_scale: float):
        self.lr_scale = lr_scale
        self.calls = {"build_model": 0, "loss": 0, "after_backward": 0}

    def build_model(self, model):
        self.calls["build_model"] += 1
        model.frozen = model.pos_emb.weight
        return model

    def parameter_groups(self, model, groups):
        frozen = model.pos_emb.weight
        rest = [p for g in groups for p in g["params"] if p is not frozen]
        return [{**groups[0], "params": rest}, {**groups[0], "params": [frozen], "weight_decay": 0.0}]

    def lr_factor(self, step, total_steps, factor):
        return factor * self.lr_scale

    def loss(self, loss, logits, targets):
        self.calls["loss"] += 1
        return loss

    def after_backward(self, model, step):
        self.calls["after_backward"] += 1
        model.pos_emb.weight.grad.zero_()


def test_a_plugin_defined_outside_the_package_is_discovered_and_applied(tmp_path, tracking_uri):
    cfg = compose_config(*TINY, "+plugins={freeze_position_embeddings_for_test: {lr_scale: 0.5}}")
    trial = Trial(cfg, tmp_path)
    plugin = trial.plugins.active[0]
    initial = {k: v.clone() for k, v in trial.model.state_dict().items()}
    trial.run()
    steps, micro_steps = cfg.trainer.max_steps, cfg.trainer.grad_accum_steps(1)
    assert plugin.calls == {"build_model": 1, "loss": steps * micro_steps, "after_backward": steps}
    assert torch.equal(trial.model.pos_emb.weight, initial["pos_emb.weight"])  # zero grad, no decay: frozen
    assert not torch.equal(trial.model.tok_emb.weight, initial["tok_emb.weight"])
    lrs = mlflow.MlflowClient(tracking_uri).get_metric_history(trial.run_id, "lr")
    assert len(lrs) == steps and all(m.value == pytest.approx(cfg.optim.lr * 0.5) for m in lrs)
    params = mlflow.MlflowClient(tracking_uri).get_run(trial.run_id).data.params
    assert params["plugins.freeze_position_embeddings_for_test.lr_scale"] == "0.5"


def test_unknown_plugin_and_bad_options_fail_clearly():
    with pytest.raises(KeyError, match="no plugin named 'nope'; registered: .*z_loss"):
        build_model(compose_config(*TINY, "+plugins={nope: {}}"))
    with pytest.raises(TypeError, match="plugins.z_loss: .*unexpected keyword argument 'coef'"):
        build_model(compose_config(*TINY, "+plugins={z_loss: {coef: 1}}"))


def test_z_loss_adds_the_squared_log_normaliser():
    logits, targets = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    base = cross_entropy(logits, targets)
    expected = base + 1e-4 * torch.logsumexp(logits, -1).square().mean()
    torch.testing.assert_close(ZLoss(1e-4).loss(base, logits, targets), expected)


def test_z_loss_overlay_changes_only_the_training_loss(tmp_path, tracking_uri):
    base = Trial(compose_config(*TINY, "model.dropout=0"), tmp_path / "base")
    with_z = Trial(compose_config(*TINY, "model.dropout=0", "+intervention=z_loss"), tmp_path / "z")
    base_loss = base.train_step(0)[0].item()
    z_loss = with_z.train_step(0)[0].item()
    assert 1e-4 * 10.8**2 < z_loss - base_loss < 1e-4 * 11.5**2  # log Z ≈ ln(50257) ≈ 10.8 at init


def test_no_decay_groups_exempt_embeddings_norms_and_biases():
    cfg = compose_config(*TINY, "+intervention=no_decay_embeddings_norms_biases")
    trial = Trial(cfg, "unused")
    trial_groups, model = trial.optimizer.param_groups, trial.model
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = sorted(names[id(p)] for g in trial_groups if g["weight_decay"] == 0.1 for p in g["params"])
    exempt = sorted(names[id(p)] for g in trial_groups if g["weight_decay"] == 0.0 for p in g["params"])
    assert decayed == sorted(
        n
        for n in names.values()
        if n.endswith(".weight") and (".att.W_" in n or "out_proj" in n or ".ff.layers" in n or n == "out_head.weight")
    )
    assert "tok_emb.weight" in exempt and "pos_emb.weight" in exempt and "final_norm.bias" in exempt
    assert len(decayed) + len(exempt) == len(names)


def test_scaled_tying_shares_a_linear_scale_matrix_and_starts_near_uniform_loss():
    untied = build_model(compose_config(*TINY))
    scaled = build_model(compose_config(*TINY, "+intervention=weight_tying_scaled_init"))
    seeds_tying = build_model(compose_config(*TINY, "+intervention=weight_tying"))
    assert scaled.tok_emb.weight is scaled.out_head.weight
    assert torch.equal(scaled.out_head.weight, untied.out_head.weight)  # the head's own U(±1/√d) draw
    assert scaled.out_head.weight.abs().max() <= 1 / math.sqrt(32)
    untied_state = untied.state_dict()
    for name, tensor in scaled.state_dict().items():
        if name not in ("tok_emb.weight", "out_head.weight"):
            assert torch.equal(tensor, untied_state[name]), name
    x = torch.randint(0, 50257, (2, 16))
    scaled.eval(), seeds_tying.eval()
    with torch.no_grad():
        scaled_loss = cross_entropy(scaled(x[:, :-1]), x[:, 1:]).item()
        tied_loss = cross_entropy(seeds_tying(x[:, :-1]), x[:, 1:]).item()
    assert abs(scaled_loss - math.log(50257)) < 0.5 < tied_loss - math.log(50257)


def test_bf16_overlay_trains(tmp_path, tracking_uri):
    result = Trial(compose_config(*TINY, "+intervention=bf16", "trainer.max_steps=2"), tmp_path).run()
    assert math.isfinite(result["test_loss"])
