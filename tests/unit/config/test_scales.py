"""The proxy scale: gpt2_small's architecture and data scaled down to minutes on one GPU, single-epoch."""

import math

import torch

from harness.config.compose import as_dict
from harness.trial.model import GPTModel
from interventions import flatten
from tests.conftest import compose_config

STUDY_TRAIN_TOKENS = 10_248_871_837  # one epoch of the study's training tokens (gpjt/fineweb-gpt2-tokens)
H100_TOKENS_PER_SECOND = 400e3  # assumed training throughput of a model this size on one H100


def test_proxy_scales_gpt2_small_down_and_stays_single_epoch():
    proxy, small = compose_config("scale=proxy"), compose_config("scale=gpt2_small")
    ours, theirs = flatten(as_dict(proxy)), flatten(as_dict(small))
    assert {key for key in ours if ours[key] != theirs[key]} == {
        "scale",
        "model.n_layer",
        "model.n_head",
        "model.d_model",
        "data.test_tokens",
        "trainer.micro_batch_size",
        "trainer.max_steps",
        "trainer.checkpoint_interval",
        "tracking.experiment",
    }  # harness/proxy, harness/gpt2_small: one experiment per scale
    m, t = proxy.model, proxy.trainer
    assert (proxy.scale, m.n_layer, m.n_head, m.d_model, m.context_length) == ("proxy", 6, 6, 384, 1024)
    with torch.device("meta"):
        parameters = GPTModel(m).num_parameters()
    assert parameters == 49_631_232

    tokens_per_step = t.global_batch_size * m.context_length
    assert tokens_per_step == 98_304 and t.grad_accum_steps(1) == 4
    assert t.max_steps == math.ceil(4 * parameters / tokens_per_step) == 2_020
    assert t.max_steps * tokens_per_step == 198_574_080 <= STUDY_TRAIN_TOKENS / 50
    assert t.max_steps * tokens_per_step / H100_TOKENS_PER_SECOND < 10 * 60
    assert t.max_steps % t.checkpoint_interval == 0

    # the test window is the first fifth of gpt2_small's: same offset, same sequences
    d = proxy.data
    assert (d.dataset, d.test_offset, d.eval_batch_size) == (
        "fineweb_gpt2_tokens",
        small.data.test_offset,
        small.data.eval_batch_size,
    )
    assert d.test_tokens * 5 == small.data.test_tokens == 19_660_800
