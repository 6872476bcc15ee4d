import torch

from harness.model import GPTModel, ModelConfig
from harness.trainer import build_model, fingerprint
from tests.conftest import TINY, compose_config


def count(**overrides) -> int:
    with torch.device("meta"):
        return GPTModel(ModelConfig(**overrides)).num_parameters()


def test_gpt2_small_parameter_counts_match_the_seeds():
    assert count() == 163_009_536
    assert count(tie_weights=True) == 124_412_160
    assert count() - count(tie_weights=True) == 38_597_376
    assert count(qkv_bias=True) == 163_037_184


def test_gpt2_small_config_builds_the_seeds_model():
    cfg = compose_config("scale=gpt2_small")
    with torch.device("meta"):
        assert GPTModel(cfg.model).num_parameters() == 163_009_536


def test_tying_shares_the_embedding_and_draws_every_other_weight_as_untied():
    untied = build_model(compose_config(*TINY))
    tied = build_model(compose_config(*TINY, "+intervention=weight_tying"))
    assert tied.out_head.weight is tied.tok_emb.weight
    untied_state = untied.state_dict()
    for name, tensor in tied.state_dict().items():
        if name != "out_head.weight":
            assert torch.equal(tensor, untied_state[name]), name
    assert not torch.equal(tied.out_head.weight, untied.out_head.weight)


def test_attention_dropout_only_while_training():
    model = build_model(compose_config(*TINY))
    x = torch.randint(0, 50257, (2, 16))
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))


def test_fingerprint_tracks_the_weights():
    model = build_model(compose_config(*TINY))
    before = fingerprint(model)
    assert fingerprint(build_model(compose_config(*TINY))) == before
    with torch.no_grad():
        model.final_norm.weight[0] += 1e-3
    assert fingerprint(model) != before
