"""The train step's pieces outside the loop: the micro-step (forward, loss and, through AOTAutograd, backward),
compiled as one graph under trainer.compile=true; the micro-batch that fits (trainer.micro_batch_size=auto);
and the guard that proves a step never reads a value back from the device. docs/gpu.md has the measurements."""

import logging
from collections.abc import Callable

import torch
from torch.overrides import TorchFunctionMode

from harness.trial.model import cross_entropy
from harness.trial.optim import build_optimizer
from harness.trial.plugins import Plugins
from harness.trial.weights import build_model

log = logging.getLogger(__name__)


class MicroStep:
    """`(inputs, targets) -> loss` of one micro-batch under the trial's autocast, the plugins' loss terms
    included. Compiled with `fullgraph=True` (a graph break fails the first step instead of slowing every step)
    and static shapes (every micro-batch has the same shape, so nothing recompiles)."""

    def __init__(self, model, plugins, precision, compile: bool = False, backend: str = "inductor"):
        self.model, self.plugins, self.precision = model, plugins, precision
        self.compiled = compile
        # Under DDP, dynamo splits the graph at the gradient buckets on purpose: a whole graph is asked of one rank.
        whole = not isinstance(model, torch.nn.parallel.DistributedDataParallel)
        self.run = torch.compile(self.eager, fullgraph=whole, dynamic=False, backend=backend) if compile else self.eager

    def eager(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with self.precision.autocast():
            logits = self.model(inputs)
            return self.plugins.loss(cross_entropy(logits, targets), logits, targets)

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.run(inputs, targets)


# --- trainer.micro_batch_size=auto ------------------------------------------------------------------------------
def micro_batch_candidates(global_batch: int, world: int) -> list[int]:
    """Every micro-batch that splits one rank's share of the global batch into whole micro-steps, ascending."""
    per_rank = global_batch // world
    return [m for m in range(1, per_rank + 1) if per_rank % m == 0]


def largest_fitting(candidates: list[int], fits: Callable[[int], bool]) -> tuple[int, list[tuple[int, bool]]]:
    """The largest candidate for which `fits` is true, by bisection (fitting is monotone: a smaller micro-batch
    needs less memory), and every try made. Raises ValueError when not even the smallest fits."""
    tries: list[tuple[int, bool]] = []
    low, high, best = 0, len(candidates) - 1, None
    while low <= high:
        middle = (low + high) // 2
        ok = fits(candidates[middle])
        tries.append((candidates[middle], ok))
        if ok:
            best, low = candidates[middle], middle + 1
        else:
            high = middle - 1
    if best is None:
        raise ValueError(
            f"trainer.micro_batch_size=auto: not even a micro-batch of {candidates[0]} fits on this device; "
            "use a smaller model.context_length or model"
        )
    return best, tries


def choose_micro_batch(
    cfg, device: torch.device, precision, world: int, fits: Callable[[int], bool] | None = None
) -> int:
    """trainer.micro_batch_size, or with `auto` the largest that fits (`fits`: default `memory_probe`), logged.
    The accumulation then keeps the global batch, and the loader reads the same sequences at any split."""
    t = cfg.trainer
    if t.micro_batch_size != "auto":
        return t.micro_batch_size
    if fits is None:

        def build():
            plugins = Plugins(cfg.plugins)
            model = build_model(cfg, plugins).to(device)
            return model, build_optimizer(model, cfg.optim, plugins), MicroStep(model, plugins, precision)

        fits = memory_probe(build, cfg.model.context_length, device)
    chosen, tries = largest_fitting(micro_batch_candidates(t.global_batch_size, world), fits)
    log.info(
        "trainer.micro_batch_size=auto: %d sequences × %d micro-steps per rank (tried %s)",
        chosen,
        t.global_batch_size // (world * chosen),
        ", ".join(f"{m} {'fits' if ok else 'does not fit'}" for m, ok in tries),
    )
    return chosen


def memory_probe(build: Callable[[], tuple], context: int, device: torch.device) -> Callable[[int], bool]:
    """A `fits(micro_batch)` that tries it: one forward, backward and optimizer step of a fresh model at that
    micro-batch on the device. On CUDA an out-of-memory error means it does not fit; a CPU has no memory limit
    the harness can catch, so there every micro-batch fits."""
    if device.type != "cuda":
        return lambda micro_batch: True

    def fits(micro_batch: int) -> bool:
        model, optimizer, step = build()
        try:
            tokens = torch.zeros((micro_batch, context), dtype=torch.long, device=device)
            step(tokens, tokens).backward()
            optimizer.step()
            torch.cuda.synchronize(device)
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            del model, optimizer, step
            torch.cuda.empty_cache()

    return fits


# --- no read-back from the device --------------------------------------------------------------------------------
READ_BACKS = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.numpy,
    torch.Tensor.cpu,
    torch.Tensor.__bool__,
    torch.Tensor.__float__,
    torch.Tensor.__int__,
    torch.Tensor.__index__,
}


class HostReadBack(RuntimeError):
    pass


class NoReadBack(TorchFunctionMode):
    """Inside it, any tensor call that brings a value to the host (`.item()`, `.tolist()`, `bool(t)`, `.cpu()` …)
    raises HostReadBack: on a CPU the same check that `torch.cuda.set_sync_debug_mode("error")` makes on a GPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in READ_BACKS:
            raise HostReadBack(f"{func.__name__} reads a tensor back to the host inside the train step")
        return func(*args, **(kwargs or {}))
