"""One trial: build the seeded model, train it on 1…N ranks, evaluate it on the held-out window (and HellaSwag, when
enabled), record it."""

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from harness import progress
from harness.config.schema import TrialConfig
from harness.data.loader import DeviceBatches, TrainBatches, held_out_batches, open_dataset
from harness.paths import default_tracking_uri
from harness.tracking import liveness
from harness.tracking.liveness import ClaimedElsewhere
from harness.tracking.store import probe
from harness.trial import charts, checkpoint, preemption
from harness.trial.checkpointer import Checkpointer
from harness.trial.evaluation import (
    FINAL_HELLASWAG,
    HELLASWAG_ARTIFACTS,
    held_out_losses,
    hellaswag_examples,
    hellaswag_metrics,
    hellaswag_record,
    score_hellaswag,
    study_test_autocast,
)
from harness.trial.flops import mfu, peak_flops
from harness.trial.optim import build_optimizer, build_scheduler
from harness.trial.plugins import Plugins
from harness.trial.precision import Precision, select_sdpa_backend
from harness.trial.ranks import Ranks, on_main_rank
from harness.trial.record import end_line, open_record, start_line
from harness.trial.sampling import continue_text
from harness.trial.step import MicroStep, choose_micro_batch
from harness.trial.weights import build_model, fingerprint, seed_everything

log = logging.getLogger(__name__)
CHARTS_EVERY_S = 60  # the charts are redrawn at a period's end once this long has passed, and after the last step


def ends_period(step: int, interval: int, total_steps: int) -> bool:
    """Whether the 0-based `step` closes a checkpoint period. The reference code checkpoints after
    `global_step % interval == 0` (step 0 included) and after the last step, so its periods are step 0, steps
    1…interval, interval+1…2·interval, …; the harness labels each by the steps done (1, interval+1, …)."""
    return step % interval == 0 or step == total_steps - 1


def is_best_period(stats: dict, earlier: list[dict]) -> bool:
    """The reference's rule: best = lowest period-average train loss so far (strictly lower than the last best).
    There a non-finite loss makes the average inf or NaN, so a period with one is never best."""
    if stats["nonfinite_loss"] or not math.isfinite(stats["train_loss_avg"]):
        return False
    return stats["train_loss_avg"] < min((p["train_loss_avg"] for p in earlier if p.get("is_best")), default=math.inf)


class DivergenceError(RuntimeError):
    pass


def resolve_device(name: str, ranks: Ranks) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        torch.cuda.set_device(ranks.local_rank)
        return torch.device("cuda", ranks.local_rank)
    return torch.device(name)


@dataclass
class PeriodStats:
    """What the seeds recorded per checkpoint period, plus the non-finite steps by kind."""

    exploding_threshold: float
    grad_clip: float | None
    devices: int = 1  # ranks whose tokens the period's throughput counts (MFU is per device)
    losses: list = field(default_factory=list)
    norms: list = field(default_factory=list)
    clipped: int = 0
    exploding: int = 0  # (a) finite norm above the threshold: counted, still applied (clipped if clipping)
    overflow: int = 0  # (b) finite elements whose norm overflows to inf: step skipped
    nonfinite_element: int = 0  # (c) at least one inf/NaN gradient element: step skipped
    scaler_skips: int = 0  # steps after which the GradScaler's scale was lower than before (fp16: kind c)
    nonfinite_loss: int = 0  # steps whose training loss was inf or NaN (left out of train_loss_avg/min/max)
    microbatch_losses: list = field(default_factory=list)  # each step's finite (min, max) micro-batch loss, rank 0's
    started: float = field(default_factory=time.perf_counter)

    def add(
        self,
        loss: float,
        norm: float,
        max_abs: float,
        scale_lowered: float = 0.0,
        microbatch_min: float = math.nan,
        microbatch_max: float = math.nan,
    ) -> None:
        self.losses.append(loss)
        if math.isfinite(microbatch_min) and math.isfinite(microbatch_max):
            self.microbatch_losses.append((microbatch_min, microbatch_max))
        self.nonfinite_loss += not math.isfinite(loss)
        finite_elements, finite_norm = math.isfinite(max_abs), math.isfinite(norm)
        if finite_norm:
            self.norms.append(norm)
            self.exploding += norm > self.exploding_threshold
            self.clipped += self.grad_clip is not None and norm > self.grad_clip
        self.overflow += finite_elements and not finite_norm
        self.nonfinite_element += not finite_elements
        self.scaler_skips += scale_lowered > 0

    def summary(self, step: int, tokens: int, flops_per_token: float, peak: float | None) -> dict:
        finite = [x for x in self.losses if math.isfinite(x)] or [float("nan")]
        stats = {
            "step": step,
            "train_loss_avg": float(np.mean(finite)),
            "train_loss_min": min(finite),
            "train_loss_max": max(finite),
            # the study's definition: over the period's micro-batch losses (rank 0's), not the per-step means
            "microbatch_loss_min": min((low for low, _ in self.microbatch_losses), default=math.nan),
            "microbatch_loss_max": max((high for _, high in self.microbatch_losses), default=math.nan),
            "grad_norm_max": max(self.norms, default=float("nan")),
            "grad_norm_avg": float(np.mean(self.norms)) if self.norms else float("nan"),
            "clip_fraction": self.clipped / len(self.losses),
            "nonfinite_exploding": self.exploding,
            "nonfinite_overflow": self.overflow,
            "nonfinite_element": self.nonfinite_element,
            "nonfinite_scaler_skips": self.scaler_skips,
            "nonfinite_loss": self.nonfinite_loss,
            "tokens_per_sec": tokens / (time.perf_counter() - self.started),
        }
        if peak:
            stats["mfu"] = mfu(stats["tokens_per_sec"], flops_per_token, peak, self.devices)
        return stats


def run_trial(cfg: TrialConfig, run_dir: Path, ranks: Ranks = Ranks()) -> dict:
    """A dead tracking server fails the trial in seconds, before anything is built; a trial whose config or
    data is refused while it is built leaves no run; then `Trial.run` opens its record and trains."""
    on_main_rank(ranks, lambda: probe(cfg.tracking.uri or default_tracking_uri(), cfg.tracking.connect_timeout))
    return Trial(cfg, run_dir, ranks).run()


class Trial:
    def __init__(self, cfg: TrialConfig, run_dir: Path, ranks: Ranks = Ranks()):
        self.cfg, self.run_dir, self.ranks = cfg, Path(run_dir), ranks
        t = cfg.trainer
        self.device = resolve_device(t.device, ranks)
        self.precision = Precision(t.precision, self.device, device_requested=t.device != "auto")
        self.sdpa_backend = select_sdpa_backend(self.device, t.deterministic, t.precision, cfg.model)
        self.micro_batch = choose_micro_batch(cfg, self.device, self.precision, ranks.world)
        self.accum = t.grad_accum_steps(ranks.world, self.micro_batch)
        verify = ranks.local_rank == 0  # one sha256 pass per node is enough
        self.batches = TrainBatches(
            open_dataset(cfg.data, "train", verify),
            cfg.model.context_length,
            self.micro_batch,
            self.accum,
            ranks.world,
            ranks.rank,
            t.max_steps,
            cfg.data.max_epochs,
            cfg.data.seed,
        )
        self.test_tokens = open_dataset(cfg.data, "test", verify)
        list(held_out_batches(self.test_tokens, cfg.data, cfg.model.context_length))  # validate the window now

        self.plugins = Plugins(cfg.plugins)
        self.model = build_model(cfg, self.plugins)
        self.init_fingerprint = fingerprint(self.model)
        if cfg.train_seed is not None:
            seed_everything(cfg.train_seed)
        self.model.to(self.device)
        self.optimizer = build_optimizer(self.model, cfg.optim, self.plugins)
        self.scheduler = build_scheduler(self.optimizer, t.max_steps, cfg.optim, self.plugins)
        self.scaler = self.precision.grad_scaler()
        self.start_step, self.run_id, self.resumed_from = 0, None, None
        self.cpu_threads = torch.get_num_threads()  # the intra-op thread count changes a CPU trial's bits
        self.train_seconds_before = 0.0  # training time of the trial before the checkpoint it resumed from
        self.steps_started = time.perf_counter()  # reset when the step loop starts
        self.charts_drawn = time.monotonic()
        self.history = {
            "step": [],
            "loss": [],
            "grad_norm": [],
            "lr": [],
            "hellaswag_step": [],
            "hellaswag_acc_norm": [],
        }
        self.periods: list[dict] = []
        self.hellaswag = (
            hellaswag_examples(cfg.eval, cfg.model.context_length) if cfg.eval.hellaswag and ranks.is_main else []
        )
        self.checkpoints = Checkpointer(cfg, self.run_dir, ranks, self.show_progress)
        if cfg.resume:
            path = checkpoint.find(Path(cfg.resume))
            state = self.checkpoints.restore(path, self.model, self.optimizer, self.scheduler, self.scaler)
            self.start_step, self.run_id = state["step"], state["run_id"]
            self.periods, self.history = (
                state["periods"],
                {"hellaswag_step": [], "hellaswag_acc_norm": []} | state["history"],
            )
            self.train_seconds_before = state.get("train_seconds", 0.0)
            self.cpu_threads = state.get("cpu_threads", self.cpu_threads)
            torch.set_num_threads(self.cpu_threads)  # an exact continuation computes with the threads it started with
            log.info("resumed from %s at step %d", path, self.start_step)
            self.resumed_from = path.name
        self.train_model = self.model
        if ranks.world > 1:
            self.train_model = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.micro_step = MicroStep(self.train_model, self.plugins, self.precision, compile=t.compile)
        self.device_batches = DeviceBatches(self.batches, self.device, self.accum)
        self.tokens_per_step = t.global_batch_size * cfg.model.context_length
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else ""
        self.peak_flops = peak_flops(name)

    # --- the step -------------------------------------------------------------------------------
    def train_step(self, step: int) -> torch.Tensor:
        """One optimizer step. Returns (loss averaged over ranks, pre-clip norm, max |grad|, 1 if the GradScaler
        lowered its scale else 0, this rank's lowest and highest micro-batch loss) on the device: nothing here
        waits for the device, and a non-finite norm skips the update on the device."""
        self.train_model.train()
        loss_sum = torch.zeros((), device=self.device)
        microbatch_min = torch.full((), math.inf, device=self.device)
        microbatch_max = torch.full((), -math.inf, device=self.device)
        for micro_step in range(self.accum):
            inputs, targets = self.device_batches.get(step, micro_step)
            syncing = micro_step == self.accum - 1 or self.ranks.world == 1
            with contextlib.nullcontext() if syncing else self.train_model.no_sync():
                microbatch_loss = self.micro_step(inputs, targets)
                loss = microbatch_loss / self.accum
                self.scaler.scale(loss).backward()
            microbatch_min = torch.minimum(microbatch_min, microbatch_loss.detach().float())
            microbatch_max = torch.maximum(microbatch_max, microbatch_loss.detach().float())
            loss_sum += loss.detach()
        self.scaler.unscale_(self.optimizer)
        self.plugins.after_backward(self.model, step)
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, 2.0)
        max_abs = torch.nn.utils.get_total_norm(grads, math.inf)
        if self.cfg.optim.grad_clip is not None:
            torch.nn.utils.clip_grads_with_norm_(self.model.parameters(), self.cfg.optim.grad_clip, norm)
        # The fused AdamW skips the whole update on the device when found_inf is 1 (GradScaler's protocol).
        self.optimizer.grad_scale, self.optimizer.found_inf = None, (~torch.isfinite(norm)).float()
        self.optimizer.step()
        # GradScaler keeps its scale on the device (`_scale`); comparing it there costs no host sync.
        scale_before = self.scaler._scale.clone() if self.scaler.is_enabled() else None
        self.scaler.update()
        scale_lowered = torch.zeros_like(norm) if scale_before is None else (self.scaler._scale < scale_before).float()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ranks.world > 1:
            dist.all_reduce(loss_sum)
            loss_sum /= self.ranks.world
        return torch.stack(
            [loss_sum, norm.float(), max_abs.float(), scale_lowered.float(), microbatch_min, microbatch_max]
        )

    # --- the loop -------------------------------------------------------------------------------
    def run(self) -> dict:
        """Open the trial's record, train, evaluate. FINISHED only with finite final weights saved as the last
        checkpoint and a finite test loss."""
        tracker = open_record(self.cfg, self.run_dir, self.ranks)
        self.run_id = tracker.run_id
        if self.ranks.is_main:
            log.info(start_line(self.cfg, tracker))
        try:
            tracker.set_tags(
                {
                    "init_fingerprint": self.init_fingerprint,
                    "device": str(self.device),
                    "test_loss_amp_autocast": str(self.test_autocast or "none"),
                    "cpu_threads": str(self.cpu_threads),
                    "sdpa_backend": self.sdpa_backend or "torch's choice",
                }
            )
            if self.resumed_from:
                preemption.record_resume(tracker, self.resumed_from)
            result = self._train(tracker)
        except ClaimedElsewhere as error:
            tracker.end("KILLED", {liveness.REASON_TAG: f"withdrawn: {error}", liveness.WITHDRAWN_TAG: "true"})
            raise
        except preemption.Preempted as stopped:
            tracker.end("KILLED", preemption.preempted_tags(stopped, tracker))
            raise
        except KeyboardInterrupt as error:
            tracker.end("KILLED", {liveness.REASON_TAG: f"interrupted ({str(error) or 'SIGINT'})"})
            raise
        except BaseException as error:
            tracker.end("FAILED", {liveness.REASON_TAG: f"{type(error).__name__}: {error}"[:5000]})
            raise
        tracker.end("FINISHED")
        if self.ranks.is_main:
            log.info(end_line(self.cfg, tracker, result["test_loss"], result["train_seconds"]))
        return result

    def _train(self, tracker) -> dict:
        t = self.cfg.trainer
        params = self.model.num_parameters()
        log.info(
            "%s parameters; steps %d→%d × %d tokens; %d ranks × %d micro-steps × %d sequences; %s, %s",
            f"{params:,}",
            self.start_step,
            t.max_steps,
            self.tokens_per_step,
            self.ranks.world,
            self.accum,
            self.micro_batch,
            self.device,
            t.precision,
        )
        if self.start_step == 0:
            tracker.log_metrics(
                {"parameters": params, "epochs": self.batches.epochs, "micro_batch_size": self.micro_batch}, step=0
            )
        on_main_rank(self.ranks, lambda: self.checkpoints.check_disk(self.model))
        with progress.through_bars(self.show_progress):
            train_seconds = self._train_steps(tracker)
            result = {
                "run_id": tracker.run_id,
                "init_fingerprint": self.init_fingerprint,
                "train_seconds": train_seconds,
            }
            losses = on_main_rank(self.ranks, self.test_losses)
        if self.ranks.is_main:
            result |= losses
            tracker.log_metrics(
                {
                    "test_loss": losses["test_loss"],
                    "test_loss_amp": losses["test_loss_amp"],
                    "train_seconds": train_seconds,
                },
                step=t.max_steps,
            )
            log.info(
                "test loss %.6f (the study's evaluation: %.6f) after %.1f s of training",
                losses["test_loss"],
                losses["test_loss_amp"],
                train_seconds,
            )
        unfinished = [f"{name} {value}" for name, value in losses.items() if not math.isfinite(value)]
        if unfinished:
            raise DivergenceError(
                f"the final weights score non-finite: {', '.join(unfinished)}; {self.checkpoints.kept()}"
            )
        if self.cfg.eval.hellaswag:
            result |= on_main_rank(self.ranks, lambda: self.score_hellaswag(t.max_steps, tracker, FINAL_HELLASWAG))
        return result

    def _train_steps(self, tracker) -> float:
        """The step loop; returns the trial's training seconds (`train_seconds`). The bar counts every step as it
        is queued on the device; loss and tokens/s, which need the values back on the host, are refreshed at each
        read-back."""
        cfg, t = self.cfg, self.cfg.trainer
        self.steps_started = started = time.perf_counter()
        period = self._new_period()
        pending: list[tuple[int, float, torch.Tensor]] = []
        with progress.training_bar(t.max_steps, self.start_step, self.show_progress) as bar:
            for step in range(self.start_step, t.max_steps):
                pending.append((step + 1, self.scheduler.get_last_lr()[0], self.train_step(step)))
                bar.update(1)
                period_end = ends_period(step, t.checkpoint_interval, t.max_steps)
                if period_end or len(pending) == cfg.tracking.log_interval:
                    self._read_back(pending, period, tracker)
                    pending = []
                    tokens = self.tokens_per_step * (step + 1 - self.start_step)
                    bar.set_postfix(
                        loss=f"{self.history['loss'][-1]:.4f}", tok_s=f"{tokens / (time.perf_counter() - started):,.0f}"
                    )
                if cfg.eval.due(step + 1, t.max_steps):
                    on_main_rank(self.ranks, lambda: self.score_hellaswag(step + 1, tracker), share=False)
                if period_end:
                    self._end_period(period, step + 1, tracker)
                    period = self._new_period()
                # Several ranks agree by an all-reduce, so only where the loop already read back; one rank every step.
                signum = (
                    preemption.agreed(self.ranks.world, self.device) if self.ranks.world == 1 or not pending else None
                )
                if signum:
                    self._stop_preempted(signum, step + 1, pending, period, period_end, tracker)
        return self.train_seconds()

    def train_seconds(self) -> float:
        """The trial's training time so far: before the checkpoint it resumed from, plus this process's steps."""
        return self.train_seconds_before + time.perf_counter() - self.steps_started

    def _stop_preempted(self, signum: int, step: int, pending, period: PeriodStats, saved: bool, tracker) -> None:
        """A preemption signal arrived: checkpoint after `step` (unless its period just did), then stop."""
        if pending:
            self._read_back(pending, period, tracker)
        if not saved:
            self.checkpoints.save(step, False, self.model, tracker, self._training_state)
        raise preemption.Preempted(signum, step, str(self.checkpoints.last))

    @property
    def show_progress(self) -> bool:
        return self.cfg.trainer.progress and self.ranks.is_main

    def _new_period(self) -> PeriodStats:
        return PeriodStats(self.cfg.trainer.exploding_grad_norm, self.cfg.optim.grad_clip, devices=self.ranks.world)

    def _read_back(self, pending, period: PeriodStats, tracker) -> None:
        """The one host synchronisation: per-step values since the last read-back."""
        values = torch.stack([v for _, _, v in pending]).tolist()
        for (step, lr, _), (loss, norm, max_abs, scale_lowered, *microbatch) in zip(pending, values):
            period.add(loss, norm, max_abs, scale_lowered, *microbatch)
            for key, value in (("step", step), ("loss", loss), ("grad_norm", norm), ("lr", lr)):
                self.history[key].append(value)
            tracker.log_metrics({"train_loss": loss, "grad_norm": norm, "lr": lr}, step=step)
        stop_reason = on_main_rank(self.ranks, lambda: tracker.stop_reason)
        if stop_reason:
            raise ClaimedElsewhere(stop_reason)
        streak = next(
            (i for i, loss in enumerate(reversed(self.history["loss"])) if math.isfinite(loss)),
            len(self.history["loss"]),
        )
        if streak >= self.cfg.trainer.divergence_patience:
            last = self.history["step"][-1]
            raise DivergenceError(
                f"diverged at step {last}: the training loss was non-finite for the last {streak} "
                f"steps ({last - streak + 1}–{last}); {self.checkpoints.kept()}"
            )

    def _end_period(self, period: PeriodStats, step: int, tracker) -> None:
        stats = period.summary(
            step, self.tokens_per_step * len(period.losses), self.model.flops_per_token(), self.peak_flops
        )
        stats["is_best"] = is_best = is_best_period(stats, self.periods)
        self.periods.append(stats)
        tracker.log_metrics({k: v for k, v in stats.items() if k != "step"}, step=step)
        weights_finite = torch.stack([p.isfinite().all() for p in self.model.parameters()]).all().item()
        loss_finite = math.isfinite(self.history["loss"][-1])
        if not (loss_finite and weights_finite):
            what = "training loss" if weights_finite else "training loss and weights" if not loss_finite else "weights"
            if step == self.cfg.trainer.max_steps:
                raise DivergenceError(
                    f"diverged at step {step}: non-finite {what} at the end of the last period, so "
                    f"no final checkpoint was saved; {self.checkpoints.kept()}"
                )
            log.warning("step %d: %s non-finite; no checkpoint from them (%s)", step, what, self.checkpoints.kept())
            return
        self.checkpoints.save(step, is_best, self.model, tracker, self._training_state)
        on_main_rank(self.ranks, lambda: self._sample_and_chart(step, stats, is_best, tracker))

    def _training_state(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "periods": self.periods,
            "history": self.history,
            "train_seconds": self.train_seconds(),
            "cpu_threads": self.cpu_threads,
        }

    def _sample_and_chart(self, step: int, stats: dict, is_best: bool, tracker) -> None:
        t = self.cfg.trainer
        sample = continue_text(
            self.model, t.sample_prompt, t.sample_tokens, t.sample_top_k, t.sample_temperature, seed=self.cfg.seed
        )
        log.info(
            "step %d: period loss %.4f (min %.4f, max %.4f)%s | %s",
            step,
            stats["train_loss_avg"],
            stats["train_loss_min"],
            stats["train_loss_max"],
            " [best]" if is_best else "",
            sample,
        )
        tracker.log_text(sample, f"samples/step_{step:06d}.txt")
        # Periods seconds apart (a smoke run, a test) would spend more time drawing than training.
        if step == t.max_steps or time.monotonic() - self.charts_drawn >= CHARTS_EVERY_S:
            for path in charts.write_charts(
                self.history, self.periods, self.run_dir / "charts", self.cfg.optim.grad_clip
            ):
                tracker.log_artifact(path, "charts")
            self.charts_drawn = time.monotonic()

    # --- evaluation and records -----------------------------------------------------------------
    def test_losses(self) -> dict[str, float]:
        return held_out_losses(self.model, self.test_tokens, self.cfg.data, self.test_autocast, self.show_progress)

    def score_hellaswag(self, step: int, tracker, artifact: str | None = None) -> dict[str, float]:
        """HellaSwag of the current weights (no random draws: training continues exactly as without it), logged at
        `step` with its per-example record."""
        result = score_hellaswag(self.model, self.hellaswag, self.cfg.eval, self.test_autocast, self.show_progress)
        metrics = hellaswag_metrics(result)
        tracker.log_metrics(metrics, step=step)
        record = hellaswag_record(result, self.hellaswag, step)
        tracker.log_text(record, f"{HELLASWAG_ARTIFACTS}/{artifact or f'step_{step:06d}.json'}")
        self.history["hellaswag_step"].append(step)
        self.history["hellaswag_acc_norm"].append(result.acc_norm)
        log.info(
            "step %d: HellaSwag acc %.4f, acc_norm %.4f (%d examples)", step, result.acc, result.acc_norm, result.n
        )
        return metrics

    @property
    def test_autocast(self) -> torch.dtype | None:
        return study_test_autocast(self.cfg.trainer.precision, self.device)

    def logged_steps(self, tracker, first_step: int, steps: int) -> float:
        """Seconds of `steps` steps read back and logged as the step loop does it (for the benchmarks)."""
        period, pending, interval = self._new_period(), [], self.cfg.tracking.log_interval
        started = time.perf_counter()
        for step in range(first_step, first_step + steps):
            pending.append((step + 1, self.scheduler.get_last_lr()[0], self.train_step(step)))
            if len(pending) == interval or step == first_step + steps - 1:
                self._read_back(pending, period, tracker)
                pending = []
        return time.perf_counter() - started
