import torch

from harness.trial.model import GPTModel, ModelConfig
from harness.trial.weights import build_model, fingerprint
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


# Hand count for gpt2_small: per block W_q, W_k, W_v, out_proj (4 × 768 × 768) and the MLP (2 × 768 × 3,072) =
# 7,077,888 multiplying weights × 12 blocks = 84,934,656, plus the head 50,257 × 768 = 38,597,376: 123,532,032.
# Attention's QKᵀ and AV: 12 × layers 12 × d 768 × context 1,024 = 113,246,208.
GPT2_SMALL_MATMUL_WEIGHTS = 4 * 768 * 768 * 12 + 2 * 768 * 3072 * 12 + 50257 * 768
GPT2_SMALL_FLOPS_PER_TOKEN = 6 * 123_532_032 + 113_246_208


def flops_per_token(**overrides) -> float:
    with torch.device("meta"):
        return GPTModel(ModelConfig(**overrides)).flops_per_token()


def test_flops_per_token_counts_matmuls_only_untied_embedding_as_a_lookup_and_a_tied_matrix_once():
    assert GPT2_SMALL_MATMUL_WEIGHTS == 123_532_032 and GPT2_SMALL_FLOPS_PER_TOKEN == 854_438_400
    assert flops_per_token() == 854_438_400  # untied: the token embedding is a lookup
    assert flops_per_token(tie_weights=True) == 854_438_400  # tied: the shared matrix multiplies once, as the head
    assert flops_per_token(tie_weights=True, tied_init="head") == 854_438_400
    assert flops_per_token(qkv_bias=True) == 854_438_400  # biases are additions, not matmuls
    assert (
        flops_per_token(n_layer=6, n_head=6, d_model=384)
        == 6 * (12 * 6 * 384 * 384 + 50257 * 384) + 12 * 6 * 384 * 1024
    )
