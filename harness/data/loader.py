"""Sequences of context+1 tokens laid end to end (stride = context), read in a fixed order.

Sequence j is tokens[j·T : j·T + T + 1]. Rank r at optimizer step s and micro-step a reads micro-batch
item ((s·accum) + a)·world + r, i.e. sequences item·B … item·B + B − 1 — so any split of the same
global batch into ranks × micro-batch × accumulation reads the same sequences at each step.
"""

import functools
import logging

import numpy as np
import torch

from harness.config.schema import DataConfig
from harness.data.corpus import BUNDLED_CACHE, prepare_bundled
from harness.data.shards import MANIFEST, Manifest, open_split

log = logging.getLogger(__name__)


def open_dataset(cfg: DataConfig, split: str, verify: bool = True):
    """The split's tokens; `verify=False` skips the sha256 pass (ranks other than each node's first)."""
    if cfg.dataset == "bundled":
        directory = prepare_bundled(BUNDLED_CACHE, cfg.holdout_fraction, verify=cfg.verify_checksums and verify)
    else:
        directory = cfg.prepared_directory()
        if not (directory / MANIFEST).exists():
            raise FileNotFoundError(
                f"no prepared {cfg.dataset} data in {directory}. Prepare it once with "
                f"`python -m harness.data prepare dataset={cfg.dataset}` (or `make data DATASET={cfg.dataset}`), "
                f"or point data.path at a prepared directory."
            )
    if cfg.dataset in ("fineweb", "fineweb_edu") and "encoding" not in Manifest.load(directory).source:
        log.warning(
            "%s was prepared by an earlier harness (encode_ordinary, ceil(1%%) held out), not as the study's "
            "prepare_datasets.py did it: its split and test window differ from the study's. Prepare it again "
            "to match (python -m harness.data prepare dataset=%s out=NEW_DIR).",
            directory,
            cfg.dataset,
        )
    return open_split(directory, split, verify=cfg.verify_checksums and verify)


class TrainBatches:
    def __init__(
        self,
        tokens,
        context: int,
        micro_batch: int,
        accum: int,
        world: int,
        rank: int,
        total_steps: int,
        max_epochs: float,
        seed: int | None = None,
    ):
        self.tokens, self.context, self.micro_batch = tokens, context, micro_batch
        self.accum, self.world, self.rank = accum, world, rank
        self.available = (len(tokens) - 1) // context
        needed = total_steps * accum * world * micro_batch
        self.epochs = needed / self.available
        if self.epochs > max_epochs:
            raise ValueError(
                f"the trial needs {needed:,} sequences of {context + 1} tokens ({needed * context:,} tokens) but the "
                f"training split holds {self.available:,} ({len(tokens):,} tokens): {self.epochs:.2f} epochs > "
                f"data.max_epochs={max_epochs}. Use fewer steps or more data, or raise data.max_epochs."
            )
        if self.epochs > 1:
            log.warning(
                "!" * 80 + "\nThis trial reads the training data %.2f times: training loss is no longer "
                "measured on unseen data, and dropout behaves differently on repeated data.\n" + "!" * 80,
                self.epochs,
            )
        self.seed = seed

    def _sequence_index(self, j: int) -> int:
        epoch, position = divmod(j, self.available)
        return position if self.seed is None else int(self._permutation(epoch)[position])

    @functools.lru_cache(maxsize=2)  # noqa: B019 (two epochs of one long-lived dataset)
    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.available)

    def get(self, step: int, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        item = (step * self.accum + micro_step) * self.world + self.rank
        rows = [self._row(self._sequence_index(item * self.micro_batch + b)) for b in range(self.micro_batch)]
        batch = torch.from_numpy(np.stack(rows).astype(np.int64))
        return batch[:, :-1], batch[:, 1:]

    def _row(self, sequence: int) -> np.ndarray:
        start = sequence * self.context
        return np.asarray(self.tokens[start : start + self.context + 1])


class DeviceBatches:
    """The train batches on the trial's device. On CUDA (`prefetch` defaults to it) each micro-batch is pinned and
    its copy issued without blocking, and the next one is read and sent while the device computes on this one; on
    a CPU the batches pass through as they are. Either way the same tensors arrive in the same order."""

    def __init__(self, batches: TrainBatches, device: torch.device, accum: int, prefetch: bool | None = None):
        self.batches, self.device, self.accum = batches, device, accum
        self.prefetch = device.type == "cuda" if prefetch is None else prefetch
        self.ahead: tuple[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] | None = None

    def _send(self, step: int, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.batches.get(step, micro_step)
        if self.device.type != "cuda":
            return batch
        return tuple(t.pin_memory().to(self.device, non_blocking=True) for t in batch)

    def get(self, step: int, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.prefetch:
            return self._send(step, micro_step)
        key = (step, micro_step)
        batch = self.ahead[1] if self.ahead and self.ahead[0] == key else self._send(*key)
        following = (step, micro_step + 1) if micro_step + 1 < self.accum else (step + 1, 0)
        self.ahead = (following, self._send(*following))
        return batch


def held_out_batches(tokens, cfg: DataConfig, context: int):
    """The fixed held-out window: `test_tokens` input tokens from `test_offset`, in eval batches."""
    per_batch = cfg.eval_batch_size * context
    if cfg.test_tokens % per_batch:
        raise ValueError(
            f"data.test_tokens={cfg.test_tokens:,} is not a whole number of eval batches "
            f"(data.eval_batch_size × context = {per_batch:,})"
        )
    if cfg.test_offset + cfg.test_tokens + 1 > len(tokens):
        raise ValueError(
            f"the test window (tokens {cfg.test_offset:,} … {cfg.test_offset + cfg.test_tokens:,}) does "
            f"not fit in the held-out split of {len(tokens):,} tokens"
        )
    for first in range(cfg.test_offset, cfg.test_offset + cfg.test_tokens, per_batch):
        window = np.asarray(tokens[first : first + per_batch + 1]).astype(np.int64)
        inputs = torch.from_numpy(window[:-1].reshape(cfg.eval_batch_size, context))
        targets = torch.from_numpy(window[1:].reshape(cfg.eval_batch_size, context))
        yield inputs, targets
