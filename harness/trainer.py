"""One trial: build the seeded model, train it, evaluate it on the held-out window, record it."""

import hashlib
import json
import logging
import math
import random
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from harness import charts, checkpoint
from harness.config import TrialConfig, as_dict, config_hash, flatten, intervention_tag
from harness.data.loader import TrainBatches, open_dataset, held_out_batches
from harness.model import GPTModel, cross_entropy
from harness.optim import build_optimizer, build_scheduler
from harness.precision import Precision
from harness.sampling import continue_text
from harness.tracking import Tracker

log = logging.getLogger(__name__)

# Dense fp16/bf16 tensor-core peak FLOP/s used for MFU, by substring of the CUDA device name.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


class DivergenceError(RuntimeError):
    pass


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def build_model(cfg: TrialConfig) -> GPTModel:
    """Seed, then build on the CPU so the initial weights do not depend on the device."""
    seed_everything(cfg.seed)
    return GPTModel(cfg.model)


def fingerprint(model: torch.nn.Module) -> str:
    """sha256 over every named tensor of the state dict (a tied matrix appears under both names)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    max_abs_grad: float
    clipped: bool
    applied: bool
    scaler_skipped: bool


@dataclass
class PeriodStats:
    """What the seeds recorded per checkpoint period, plus the non-finite step counts by kind."""

    exploding_threshold: float
    losses: list = field(default_factory=list)
    norms: list = field(default_factory=list)
    clipped: int = 0
    exploding: int = 0  # (a) finite norm above the threshold: counted, still applied (or clipped)
    overflow: int = 0  # (b) finite elements whose norm overflows to inf: skipped
    nonfinite_element: int = 0  # (c) at least one inf/NaN gradient element: skipped
    scaler_skips: int = 0  # fp16 GradScaler skipped the step (its scale was too high)
    started: float = field(default_factory=time.perf_counter)

    def add(self, r: StepResult) -> None:
        self.losses.append(r.loss)
        finite_elements, finite_norm = math.isfinite(r.max_abs_grad), math.isfinite(r.grad_norm)
        if finite_norm:
            self.norms.append(r.grad_norm)
            self.exploding += r.grad_norm > self.exploding_threshold
        self.overflow += finite_elements and not finite_norm
        self.nonfinite_element += not finite_elements
        self.scaler_skips += r.scaler_skipped
        self.clipped += r.clipped

    def summary(self, step: int, lr: float, tokens: int, flops_per_token: float, peak: Optional[float]) -> dict:
        finite = [x for x in self.losses if math.isfinite(x)] or [float("nan")]
        seconds = time.perf_counter() - self.started
        stats = {
            "step": step, "lr": lr,
            "train_loss_avg": float(np.mean(finite)), "train_loss_min": min(finite), "train_loss_max": max(finite),
            "grad_norm_max": max(self.norms, default=float("nan")),
            "grad_norm_avg": float(np.mean(self.norms)) if self.norms else float("nan"),
            "clip_fraction": self.clipped / len(self.losses),
            "nonfinite_exploding": self.exploding, "nonfinite_overflow": self.overflow,
            "nonfinite_element": self.nonfinite_element, "nonfinite_scaler_skips": self.scaler_skips,
            "tokens_per_sec": tokens / seconds,
        }
        if peak:
            stats["mfu"] = stats["tokens_per_sec"] * flops_per_token / peak
        return stats


class Trial:
    def __init__(self, cfg: TrialConfig, run_dir: Path):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.device = resolve_device(cfg.trainer.device)
        self.precision = Precision(cfg.trainer.precision, self.device)
        tokens = open_dataset(cfg.data, "train")
        self.test_tokens = open_dataset(cfg.data, "test")
        list(held_out_batches(self.test_tokens, cfg.data, cfg.model.context_length))  # validate the window up front
        self.accum = cfg.trainer.grad_accum_steps(world_size=1)
        self.batches = TrainBatches(tokens, cfg.model.context_length, cfg.trainer.micro_batch_size, self.accum,
                                    world=1, rank=0, total_steps=cfg.trainer.max_steps,
                                    max_epochs=cfg.data.max_epochs, seed=cfg.data.seed)

        self.model = build_model(cfg)
        self.init_fingerprint = fingerprint(self.model)
        if cfg.train_seed is not None:
            seed_everything(cfg.train_seed)
        self.model.to(self.device)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.trainer.max_steps, cfg.optim)
        self.scaler = self.precision.grad_scaler()
        self.tokens_per_step = cfg.trainer.global_batch_size * cfg.model.context_length
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else ""
        self.peak_flops = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
        self.history = {"step": [], "loss": [], "grad_norm": [], "lr": []}
        self.periods: list[dict] = []

    def tags(self) -> dict[str, str]:
        cfg = self.cfg
        tags = {
            "intervention": intervention_tag(cfg.interventions), "seed": str(cfg.seed),
            "train_seed": "none" if cfg.train_seed is None else str(cfg.train_seed),
            "data_seed": "none" if cfg.data.seed is None else str(cfg.data.seed),
            "init_fingerprint": self.init_fingerprint, "config_hash": config_hash(cfg), "scale": cfg.scale,
            "device": str(self.device), "host": socket.gethostname(),
        }
        if cfg.study:
            tags["study"] = cfg.study
        return tags

    def train_step(self, step: int) -> StepResult:
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        for micro_step in range(self.accum):
            inputs, targets = (t.to(self.device, non_blocking=True) for t in self.batches.get(step, micro_step))
            with self.precision.autocast():
                loss = cross_entropy(self.model(inputs), targets) / self.accum
            self.scaler.scale(loss).backward()
            loss_sum += loss.detach()
        self.scaler.unscale_(self.optimizer)
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, 2.0)
        max_abs = torch.nn.utils.get_total_norm(grads, math.inf)
        clip = self.cfg.optim.grad_clip
        if clip is not None:
            torch.nn.utils.clip_grads_with_norm_(self.model.parameters(), clip, norm)
        loss_value, norm_value, max_abs_value = torch.stack([loss_sum, norm, max_abs]).tolist()  # one host sync
        applied = math.isfinite(norm_value)
        if applied:
            self.scaler.step(self.optimizer)
        self.scaler.update()  # an fp16 scaler lowers its scale after a skipped (non-finite) step
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss_value, norm_value, max_abs_value, clipped=clip is not None and norm_value > clip,
                          applied=applied, scaler_skipped=self.scaler.is_enabled() and not applied)

    @torch.no_grad()
    def test_loss(self) -> float:
        """Mean cross-entropy over the fixed held-out window in full fp32, dropout off."""
        self.model.eval()
        total, count = 0.0, 0
        with full_precision():
            for inputs, targets in held_out_batches(self.test_tokens, self.cfg.data, self.cfg.model.context_length):
                loss = cross_entropy(self.model(inputs.to(self.device)), targets.to(self.device))
                total += loss.double().item() * targets.numel()
                count += targets.numel()
        return total / count

    def sample(self) -> str:
        t = self.cfg.trainer
        return continue_text(self.model, t.sample_prompt, t.sample_tokens, t.sample_top_k, t.sample_temperature,
                             seed=self.cfg.seed)

    def run(self) -> dict:
        cfg = self.cfg
        tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment)
        run_name = f"{intervention_tag(cfg.interventions)}-s{cfg.seed}" + (f"-t{cfg.train_seed}" if cfg.train_seed is not None else "")
        tracker.start(run_name, self.tags(), flatten(as_dict(cfg)))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(as_dict(cfg)))
        tracker.log_artifact(self.run_dir / "config.yaml")
        try:
            result = self._train(tracker)
        except KeyboardInterrupt:
            tracker.end("KILLED")
            raise
        except BaseException as error:
            tracker.set_tags({"failure_reason": f"{type(error).__name__}: {error}"[:5000]})
            tracker.end("FAILED")
            raise
        tracker.end("FINISHED")
        return result

    def _train(self, tracker: Tracker) -> dict:
        cfg, t = self.cfg, self.cfg.trainer
        params = self.model.num_parameters()
        log.info("model: %s parameters; %d steps × %d tokens; %d micro-steps of %d sequences; device %s, %s",
                 f"{params:,}", t.max_steps, self.tokens_per_step, self.accum, t.micro_batch_size, self.device, t.precision)
        tracker.log_metrics({"parameters": params, "epochs": self.batches.epochs}, step=0)
        started = time.perf_counter()
        period = PeriodStats(t.exploding_grad_norm)
        nonfinite_streak = 0
        bar = tqdm(total=t.max_steps, disable=not t.progress, unit="step", dynamic_ncols=True)
        for step in range(t.max_steps):
            lr = self.scheduler.get_last_lr()[0]
            result = self.train_step(step)
            period.add(result)
            for key, value in (("step", step + 1), ("loss", result.loss), ("grad_norm", result.grad_norm), ("lr", lr)):
                self.history[key].append(value)
            tracker.log_metrics({"train_loss": result.loss, "grad_norm": result.grad_norm, "lr": lr}, step=step + 1)
            nonfinite_streak = 0 if math.isfinite(result.loss) else nonfinite_streak + 1
            if nonfinite_streak >= t.divergence_patience:
                raise DivergenceError(f"loss was non-finite for {nonfinite_streak} consecutive steps (to step {step + 1})")
            if (step + 1) % cfg.tracking.log_interval == 0:
                tracker.flush()
            bar.update()
            bar.set_postfix(loss=f"{result.loss:.4f}", tok_s=f"{self.tokens_per_step * (step + 1) / (time.perf_counter() - started):,.0f}")
            if (step + 1) % t.checkpoint_interval == 0 or step + 1 == t.max_steps:
                self._end_period(period, step + 1, lr, tracker)
                period = PeriodStats(t.exploding_grad_norm)
        bar.close()
        train_seconds = time.perf_counter() - started
        test_loss = self.test_loss()
        tracker.log_metrics({"test_loss": test_loss, "train_seconds": train_seconds}, step=t.max_steps)
        log.info("test loss %.6f after %.1f s of training", test_loss, train_seconds)
        return {"test_loss": test_loss, "train_seconds": train_seconds, "run_id": tracker.run_id,
                "init_fingerprint": self.init_fingerprint}

    def _end_period(self, period: PeriodStats, step: int, lr: float, tracker: Tracker) -> None:
        stats = period.summary(step, lr, self.tokens_per_step * len(period.losses), self.model.flops_per_token(), self.peak_flops)
        is_best = all(stats["train_loss_avg"] < p["train_loss_avg"] for p in self.periods)
        self.periods.append(stats)
        tracker.log_metrics({k: v for k, v in stats.items() if k != "step"} | {"is_best": float(is_best)}, step=step)
        saved = checkpoint.save(self.run_dir / "checkpoints", step, self.model, self._state(step), is_best)
        sample = self.sample()
        log.info("step %d: period loss %.4f (min %.4f, max %.4f)%s; sample: %s", step, stats["train_loss_avg"],
                 stats["train_loss_min"], stats["train_loss_max"], " [best]" if is_best else "", sample)
        tracker.log_text(sample, f"samples/step_{step:06d}.txt")
        pointers = {"host": socket.gethostname(), "latest": str(saved.resolve()),
                    "best": str(checkpoint.resolve(self.run_dir / "checkpoints", "best").resolve())}
        tracker.log_text(json.dumps(pointers, indent=1), "checkpoints.json")
        for path in charts.write_charts(self.history, self.periods, self.run_dir / "charts", self.cfg.optim.grad_clip):
            tracker.log_artifact(path, "charts")
        tracker.flush()

    def _state(self, step: int) -> dict:
        return {
            "step": step, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "rng": checkpoint.rng_state(), "periods": self.periods,
            "history": self.history,
        }


@contextmanager
def full_precision():
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)
