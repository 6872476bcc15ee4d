"""The speed work a CPU can prove: the compiled micro-step, trainer.micro_batch_size=auto, prefetched batches,
no read-back from the device inside a step, and the SDPA backend a deterministic CUDA trial relies on."""

import math

import pytest
import torch

from harness.trial import step as step_module
from harness.trial.precision import choose_sdpa_backend
from harness.trial.step import HostReadBack, NoReadBack, largest_fitting, micro_batch_candidates
from harness.trial.trainer import Trial
from tests.conftest import TINY, compose_config

# A context of 16 keeps inductor's CPU compile of the whole step to its minimum (docs/gpu.md has its time).
TINIEST = [*TINY, "model.d_model=16", "model.context_length=16", "data.test_tokens=256", "trainer.max_steps=8"]


def losses(trial: Trial, steps: int) -> list[float]:
    return torch.stack([trial.train_step(step)[0] for step in range(steps)]).tolist()


@pytest.mark.slow
def test_compiled_step_is_one_graph_without_recompiles_and_matches_eager(tmp_path):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    # Dropout off: compiled dropout draws its own random numbers, so only the dropout-free losses can match.
    compiled = Trial(compose_config(*TINIEST, "model.dropout=0.0", "trainer.compile=true"), tmp_path / "compiled")
    compiled_losses = losses(compiled, 5)
    assert counters["graph_break"] == {}
    assert counters["stats"]["unique_graphs"] == 1  # five steps × two micro-steps: compiled once, never again
    assert counters["aot_autograd"]["ok"] == 1  # the backward is compiled with the forward
    eager_losses = losses(Trial(compose_config(*TINIEST, "model.dropout=0.0"), tmp_path / "eager"), 5)
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4)


def test_a_graph_break_in_the_compiled_step_is_an_error_not_a_slowdown(tmp_path):
    trial = Trial(compose_config(*TINIEST), tmp_path)

    def breaks(loss, logits, targets):
        print("a graph break")  # dynamo cannot trace a print into the graph
        return loss

    trial.plugins.loss = breaks
    step = step_module.MicroStep(trial.model, trial.plugins, trial.precision, compile=True, backend="eager")
    inputs, targets = trial.batches.get(0, 0)
    with pytest.raises(torch._dynamo.exc.Unsupported):
        step(inputs, targets)


def test_micro_batch_search_finds_the_largest_that_fits_by_bisection():
    candidates = micro_batch_candidates(96, 1)
    assert candidates == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 96]
    assert micro_batch_candidates(96, 8) == [1, 2, 3, 4, 6, 12]
    for limit in (1, 5, 12, 13, 95, 96):
        chosen, tries = largest_fitting(candidates, lambda m, limit=limit: m <= limit)
        assert chosen == max(c for c in candidates if c <= limit)
        assert len(tries) <= math.ceil(math.log2(len(candidates) + 1))
    with pytest.raises(ValueError, match="not even a micro-batch of 1 fits"):
        largest_fitting(candidates, lambda m: False)


def test_auto_micro_batch_under_a_memory_limit_trains_what_the_explicit_split_trains(tmp_path, monkeypatch):
    """A memory limit imposed through the probe: each sequence "needs" 1 GiB and 2 GiB are free."""
    sequence_bytes, free = 2**30, 2 * 2**30
    monkeypatch.setattr(step_module, "memory_probe", lambda *args: lambda m: m * sequence_bytes <= free)
    auto = Trial(compose_config(*TINIEST, "trainer.global_batch_size=8", "trainer.micro_batch_size=auto"), tmp_path)
    assert (auto.micro_batch, auto.accum) == (2, 4)
    auto_losses = losses(auto, 4)  # each trial in turn: dropout draws from the one global generator
    explicit = Trial(compose_config(*TINIEST, "trainer.global_batch_size=8", "trainer.micro_batch_size=2"), tmp_path)
    assert auto_losses == losses(explicit, 4)


def test_auto_is_refused_only_where_the_ranks_cannot_share_the_global_batch():
    from harness.config.checks import ConfigError

    assert compose_config("trainer.micro_batch_size=auto").trainer.micro_batch_size == "auto"
    with pytest.raises(ConfigError, match="trainer.micro_batch_size=.*auto"):
        compose_config("trainer.micro_batch_size=big")
    with pytest.raises(ConfigError, match="divisible by trainer.nproc_per_node = 5"):
        compose_config("trainer.micro_batch_size=auto", "trainer.nproc_per_node=5")


def test_prefetched_batches_change_no_batch_and_no_loss(tmp_path):
    plain = Trial(compose_config(*TINIEST), tmp_path / "plain")
    prefetched = Trial(compose_config(*TINIEST), tmp_path / "prefetched")
    prefetched.device_batches.prefetch = True
    assert not plain.device_batches.prefetch  # on a CPU the default passes batches through
    for step in range(3):
        for micro_step in range(plain.accum):
            for a, b in zip(
                plain.device_batches.get(step, micro_step), prefetched.device_batches.get(step, micro_step)
            ):
                assert torch.equal(a, b)
    plain_losses = losses(Trial(compose_config(*TINIEST), tmp_path / "p2"), 4)
    prefetched = Trial(compose_config(*TINIEST), tmp_path / "f2")
    prefetched.device_batches.prefetch = True
    assert plain_losses == losses(prefetched, 4)


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["+intervention=[gradient_clipping,z_loss]"],
        ["trainer.device=cpu", "trainer.precision=fp16_amp"],  # GradScaler on: unscale, skip and update on device
    ],
)
def test_nothing_in_the_step_reads_back_from_the_device(tmp_path, overrides):
    trial = Trial(compose_config(*TINIEST, *overrides), tmp_path)
    with NoReadBack():
        values = [trial.train_step(step) for step in range(3)]
    assert all(math.isfinite(v) for v in torch.stack(values)[:, 0].tolist())


def test_the_read_back_guard_catches_each_way_of_reading_a_value():
    value = torch.ones(())
    for read in (lambda: value.item(), lambda: bool(value), lambda: value.tolist(), lambda: float(value)):
        with NoReadBack(), pytest.raises(HostReadBack):
            read()


def test_deterministic_cuda_attention_uses_flash_or_efficient_else_math_never_cudnn():
    assert choose_sdpa_backend("cuda", True, lambda name: True) == "flash"
    assert choose_sdpa_backend("cuda", True, lambda name: name == "efficient") == "efficient"
    assert choose_sdpa_backend("cuda", True, lambda name: name == "cudnn") == "math"
    assert choose_sdpa_backend("cuda", True, lambda name: False) == "math"
    assert choose_sdpa_backend("cuda", False, lambda name: True) is None  # torch picks
    assert choose_sdpa_backend("cpu", True, lambda name: True) is None  # CPU kernels are deterministic
    tried = []
    choose_sdpa_backend("cuda", True, lambda name: tried.append(name) or False)
    assert tried == ["flash", "efficient"]  # math is plain matmuls: never probed, never refused
