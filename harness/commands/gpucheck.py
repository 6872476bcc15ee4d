"""The CUDA path's acceptance in one command: `python -m harness gpu-check [out=DIR] [device=cuda|cpu]` (also
`make gpu-check`). It runs every check in turn, prints one line per check, and writes DIR/gpucheck.json and
DIR/gpucheck.md (environment, each check with pass/fail/skip and its numbers, the speed table); the speed rows go
into the bench records `python -m harness plan` reads. On a CPU the same sequence runs on a tiny model; a check that
cannot run here says why. What each check proves and how it is sized: docs/gpu.md."""

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import torch
import torch.distributed as dist

from harness.arguments import split
from harness.commands.bench import compose_overrides, losses_of_two_runs, measure
from harness.commands.bench_tracking import TimedCalls
from harness.paths import PROJECT_ROOT
from harness.study.cost import gpu_kind, record_bench
from harness.tracking.tracker import NullTracker, Tracker
from harness.trial import checkpoint
from harness.trial.launch import set_determinism
from harness.trial.ranks import Ranks
from harness.trial.step import MicroStep, NoReadBack
from harness.trial.trainer import Trial

KEYS = {"out": "gpucheck", "device": "auto"}
DEVICES = ("auto", "cuda", "cpu")

# The trial each check trains, on local tokens (the bundled corpus: nothing is downloaded).
CUDA_TRIAL = [
    "scale=gpt2_small",
    "data=bundled",
    "data.max_epochs=1000",
    "data.test_tokens=8192",
    "data.eval_batch_size=8",
]
CPU_TRIAL = [
    "model.n_layer=1",
    "model.d_model=32",
    "model.n_head=2",
    "model.context_length=32",
    "trainer.global_batch_size=8",
    "trainer.micro_batch_size=4",
    "trainer.device=cpu",
    "trainer.precision=tf32",  # the baseline and overflow checks add fp16_amp (GradScaler), emulated: slow on CPU
    "data.test_tokens=256",
    "data.eval_batch_size=4",
    "trainer.sample_tokens=2",
]
# What the GradScaler checks add on a CPU (on CUDA the trial is fp16_amp already).
CPU_SCALER = ["trainer.precision=fp16_amp"]
# Steps per check (CUDA, CPU): sized so the CUDA run stays within 8 minutes on one H100 (docs/gpu.md).
STEPS = {
    "baseline": (50, 12),
    "resume": (30, 24),
    "compile": (20, 8),
    "overflow": (6, 6),
    "speed": (20, 4),
    "repeat": (20, 4),
    "tracking": (30, 10),
    "ranks": (20, 6),
}


@dataclass
class Check:
    name: str
    status: str  # pass | fail | skip
    summary: str
    numbers: dict = field(default_factory=dict)
    seconds: float = 0.0

    def line(self) -> str:
        return f"{self.status.upper():4}  {self.name:<15} {self.summary} ({self.seconds:.1f} s)"


class Checks:
    def __init__(self, device: str, out: Path):
        self.cuda = device == "cuda"
        self.out = out
        self.trial_overrides = CUDA_TRIAL if self.cuda else CPU_TRIAL
        self.scaler = [] if self.cuda else CPU_SCALER
        self.speed_rows: list[dict] = []

    def steps(self, name: str) -> int:
        return STEPS[name][0 if self.cuda else 1]

    def config(self, *extra: str, steps: int):
        return compose_overrides([*self.trial_overrides, *extra], steps)

    def synchronize(self):
        if self.cuda:
            torch.cuda.synchronize()

    # --- the checks --------------------------------------------------------------------------------------------
    def baseline(self) -> Check:
        """gpt2_small (CPU: tiny) with fp16 autocast, GradScaler, TF32, fused AdamW, the process group initialised
        (world 1); loss finite and falling, and no read-back from the device inside any step."""
        steps = self.steps("baseline")
        with process_group("nccl" if self.cuda else "gloo"), tempfile.TemporaryDirectory() as run_dir:
            probe = torch.ones((), device="cuda" if self.cuda else "cpu")
            dist.all_reduce(probe)
            trial = Trial(self.config(*self.scaler, steps=steps), run_dir)
            with no_read_back(self.cuda):
                values = [trial.train_step(step) for step in range(steps)]
            losses = torch.stack(values)[:, 0].tolist()
        window = max(2, steps // 5)
        first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
        numbers = {
            "parameters": trial.model.num_parameters(),
            "steps": steps,
            "first_loss": first,
            "last_loss": last,
            "backend": dist.Backend.NCCL if self.cuda else dist.Backend.GLOO,
            "autocast": str(trial.precision.autocast_dtype),
            "grad_scaler": trial.scaler.is_enabled(),
            "tf32": torch.backends.cuda.matmul.allow_tf32,
            "fused_adamw": bool(trial.optimizer.defaults.get("fused")),
            "micro_batch_size": trial.micro_batch,
        }
        ok = all(map(math.isfinite, losses)) and last < first and numbers["fused_adamw"] and numbers["grad_scaler"]
        return Check(
            "baseline",
            "pass" if ok else "fail",
            f"{numbers['parameters']:,} params, {steps} steps, loss {first:.3f} -> {last:.3f}, "
            f"{numbers['backend']} world 1, {numbers['autocast']} + GradScaler, fused AdamW, no read-back in a step",
            numbers,
        )

    def resume(self) -> Check:
        """A real trial process with trainer.deterministic=true, SIGKILLed from outside after its first checkpoint,
        resumed with resume=; its final weights against an uninterrupted trial's, tensor by tensor."""
        steps = self.steps("resume")
        root = self.out / "resume"
        shutil.rmtree(root, ignore_errors=True)
        interval = steps // 3
        args = [
            *self.trial_overrides,
            f"trainer.max_steps={steps}",
            f"trainer.checkpoint_interval={interval}",
            "trainer.deterministic=true",
            "trainer.progress=false",
            f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
            "tracking.system_metrics=false",
        ]
        killed = harness_process(*args, f"hydra.run.dir={root / 'killed'}", wait=False)
        latest = root / "killed" / "checkpoints" / "latest"
        while not latest.exists() and killed.poll() is None:
            time.sleep(0.02)
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait()
        if killed.returncode != -signal.SIGKILL:
            return Check("resume", "fail", f"the trial ended (exit {killed.returncode}) before it could be killed")
        killed_at = checkpoint.read_manifest(checkpoint.resolve(root / "killed" / "checkpoints")) or {}
        resumed = harness_process(f"resume={root / 'killed'}", wait=False)
        harness_process(*args, f"hydra.run.dir={root / 'whole'}")
        if resumed.wait():
            return Check("resume", "fail", f"resume={root / 'killed'} exited {resumed.returncode}", {"steps": steps})
        differing = differing_tensors(root / "whole", root / "killed")
        numbers = {"steps": steps, "killed_after_step": killed_at.get("step"), "differing_tensors": differing}
        return Check(
            "resume",
            "fail" if differing else "pass",
            f"SIGKILL after the step-{killed_at.get('step')} checkpoint, resume= to step {steps}: "
            + ("bit-identical to uninterrupted" if not differing else f"{len(differing)} tensors differ"),
            numbers,
        )

    def compile(self) -> Check:
        """trainer.compile=true against eager over the same steps (dropout off: compiled dropout draws its own
        random numbers), losses within fp16 tolerance, with dynamo's graph-break and compile counts."""
        from torch._dynamo.utils import counters

        steps = self.steps("compile")
        cfg = self.config("+intervention=no_dropout", steps=steps)
        with tempfile.TemporaryDirectory() as run_dir:
            eager = Trial(cfg, run_dir)
            eager_losses = torch.stack([eager.train_step(step)[0] for step in range(steps)]).tolist()
        torch._dynamo.reset()
        counters.clear()
        backend = "inductor" if self.cuda else "aot_eager"  # inductor's C++ build on 2 CPU cores takes minutes
        with tempfile.TemporaryDirectory() as run_dir:
            compiled = Trial(cfg, run_dir)
            compiled.micro_step = MicroStep(
                compiled.train_model, compiled.plugins, compiled.precision, compile=True, backend=backend
            )
            started = time.perf_counter()
            values = [compiled.train_step(0)]
            values[0].tolist()
            compile_seconds = time.perf_counter() - started
            values += [compiled.train_step(step) for step in range(1, steps)]
            compiled_losses = torch.stack(values)[:, 0].tolist()
        graph_breaks = sum(counters["graph_break"].values())
        recompiles = counters["stats"]["unique_graphs"] - 1
        drift = max(abs(a - b) / abs(b) for a, b in zip(compiled_losses, eager_losses))
        tolerance = 1e-2  # fp16 autocast: ~3 significant digits per op, compounded over the steps
        ok = graph_breaks == 0 and recompiles == 0 and drift <= tolerance
        return Check(
            "compile",
            "pass" if ok else "fail",
            f"{backend}: {graph_breaks} graph breaks, {recompiles} recompiles over {steps} steps, first step "
            f"{compile_seconds:.1f} s; max relative |Δloss| vs eager {drift:.2g} (tolerance {tolerance:g})",
            {
                "backend": backend,
                "graph_breaks": graph_breaks,
                "recompiles": recompiles,
                "compile_seconds": compile_seconds,
                "max_relative_loss_difference": drift,
                "steps": steps,
            },
        )

    def overflow(self) -> Check:
        """A planted overflow: every gradient element of one step set to inf before unscaling. The GradScaler must
        skip the update (weights unchanged), halve its scale, and the period count it in nonfinite_scaler_skips."""
        steps, planted = self.steps("overflow"), 3
        with tempfile.TemporaryDirectory() as run_dir:
            trial = Trial(self.config(*self.scaler, steps=steps), run_dir)
            armed = {"on": False}
            first = next(trial.model.parameters())
            first.register_hook(lambda grad: torch.full_like(grad, math.inf) if armed["on"] else grad)
            period, scales = trial._new_period(), []
            for step in range(steps):
                armed["on"] = step == planted
                before = [p.detach().clone() for p in trial.model.parameters()] if armed["on"] else None
                scale = trial.scaler.get_scale()
                loss, norm, max_abs, lowered = trial.train_step(step).tolist()[:4]  # and the micro-batch min, max
                period.add(loss, norm, max_abs, lowered)
                scales.append((scale, trial.scaler.get_scale()))
                if before is not None:
                    unchanged = all(torch.equal(a, p) for a, p in zip(before, trial.model.parameters()))
        scale_before, scale_after = scales[planted]
        summary = period.summary(steps, 1, 1.0, None)
        numbers = {
            "planted_step": planted,
            "scale_before": scale_before,
            "scale_after": scale_after,
            "weights_unchanged": unchanged,
            "nonfinite_scaler_skips": summary["nonfinite_scaler_skips"],
            "nonfinite_element": summary["nonfinite_element"],
        }
        ok = unchanged and scale_after == scale_before / 2 and summary["nonfinite_scaler_skips"] == 1
        return Check(
            "overflow",
            "pass" if ok else "fail",
            f"step {planted}: update skipped={unchanged}, scale {scale_before:g} -> {scale_after:g}, "
            f"nonfinite_scaler_skips={summary['nonfinite_scaler_skips']}",
            numbers,
        )

    def speed(self) -> Check:
        """tokens/s, matmul-FLOP MFU, peak memory and data time of the baseline and its bf16 and no_dropout
        variants at the micro-batch trainer.micro_batch_size=auto picks; each row into the bench records."""
        steps = self.steps("speed")
        variants = {
            "bf16": ["+intervention=bf16"],
            "no_dropout": ["+intervention=no_dropout"],
            "baseline": [],  # recorded last: the newest record of this GPU is the baseline's
        }
        for name, extra in variants.items():
            overrides = [*self.trial_overrides, *extra, "trainer.micro_batch_size=auto"]
            cfg = compose_overrides(overrides, steps + 4 + 2)
            result = measure(cfg, steps, 2, None)
            result["config"] = name
            result.pop("top_ops")
            record_bench(result["device"], result["tokens_per_sec"], cfg, overrides, now())
            self.speed_rows.append(result)
        base = self.speed_rows[-1]
        return Check(
            "speed",
            "pass",
            f"baseline {base['tokens_per_sec']:,.0f} tokens/s, MFU {show_mfu(base['mfu'])}, "
            f"peak {base['peak_memory_gib']:.2f} GiB, micro-batch {base['micro_batch_size']}; "
            f"recorded for `python -m harness plan gpu={gpu_kind(base['device'])}`",
            {"rows": self.speed_rows},
        )

    def reproducibility(self) -> Check:
        """The same seed twice, bit-identical or not; and what trainer.deterministic=true costs in throughput."""
        steps = self.steps("repeat")
        cfg = self.config(steps=steps + 8)
        first, second = losses_of_two_runs(cfg, steps)
        fast = measure(cfg, 4, 2, None)["tokens_per_sec"]
        deterministic_cfg = self.config("trainer.deterministic=true", steps=steps + 8)
        set_determinism(True)
        try:
            exact_first, exact_second = losses_of_two_runs(deterministic_cfg, steps)
            slow = measure(deterministic_cfg, 4, 2, None)["tokens_per_sec"]
        finally:
            set_determinism(False)
        numbers = {
            "steps": steps,
            "rerun_bit_identical": first == second,
            "deterministic_rerun_bit_identical": exact_first == exact_second,
            "deterministic_throughput_cost": 1 - slow / fast,
        }
        return Check(
            "reproducibility",
            "pass" if exact_first == exact_second else "fail",
            f"same-seed rerun {'bit-identical' if first == second else 'differs'}; with trainer.deterministic=true "
            f"{'bit-identical' if exact_first == exact_second else 'differs'}, costing "
            f"{numbers['deterministic_throughput_cost']:.1%} of throughput",
            numbers,
        )

    def tracking(self) -> Check:
        """The time the step loop spends inside tracker calls (a real Tracker sending to sqlite), as a share of
        step time with the device busy; goal < 1%."""
        steps = self.steps("tracking")
        cfg = self.config(steps=2 * steps + 2)
        with tempfile.TemporaryDirectory() as scratch:
            trial = Trial(cfg, Path(scratch) / "run")
            tracker = TimedCalls(Tracker(f"sqlite:///{Path(scratch) / 'mlflow.db'}", "gpu-check"))
            tracker.start("gpu-check", {}, {})
            trial.logged_steps(NullTracker(), 0, 2)
            tracker.seconds, tracker.calls = 0.0, 0  # the step loop's calls only, not the run's creation
            seconds = trial.logged_steps(tracker, 2, steps)
            tracker.flush()
            tracker.end("FINISHED")
        share = tracker.seconds / seconds
        # The goal is for a busy GPU; on a CPU the writer thread competes with the step for the same cores.
        judged = "goal < 1%" if self.cuda else "goal < 1% judged on a GPU only, reported here"
        return Check(
            "tracking",
            "pass" if share < 0.01 or not self.cuda else "fail",
            f"{100 * share:.3f}% of step time inside tracker calls ({judged}), {tracker.calls} calls "
            f"over {steps} steps",
            {"share": share, "calls": tracker.calls, "steps": steps, "seconds": seconds},
        )

    def ranks(self) -> Check:
        """2 ranks (NCCL on 2 GPUs, gloo on a CPU) against 1 rank with twice the accumulation, same global batch."""
        if self.cuda and torch.cuda.device_count() < 2:
            return Check("ranks", "skip", f"needs 2 GPUs; this machine has {torch.cuda.device_count()}")
        steps = self.steps("ranks")
        cfg = self.config("+intervention=no_dropout", steps=steps)  # dropout masks differ per rank
        with tempfile.TemporaryDirectory() as run_dir:
            single = Trial(cfg, run_dir)
            one_rank = torch.stack([single.train_step(step)[0] for step in range(steps)]).tolist()
        with tempfile.TemporaryDirectory() as scratch:
            result = Path(scratch) / "losses.json"
            torch.multiprocessing.spawn(
                two_rank_losses, args=(cfg, steps, str(result), free_port(), self.cuda), nprocs=2, join=True
            )
            two_ranks = json.loads(result.read_text())
        drift = max(abs(a - b) for a, b in zip(one_rank, two_ranks))
        tolerance = 1e-2 if self.cuda else 1e-4
        return Check(
            "ranks",
            "pass" if drift <= tolerance else "fail",
            f"2 ranks vs 1 rank × {single.accum} micro-steps over {steps} steps: max |Δloss| {drift:.2g} "
            f"(tolerance {tolerance:g})",
            {"max_loss_difference": drift, "tolerance": tolerance, "steps": steps},
        )


# --- what the checks share ---------------------------------------------------------------------------------------
def now() -> str:
    return datetime.now().isoformat(timespec="seconds")


def show_mfu(value: float | None) -> str:
    return "n/a (no known peak)" if value is None else f"{100 * value:.1f}%"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class process_group:
    """A process group of world 1 on 127.0.0.1 for the duration (NCCL on CUDA: the baseline's collectives)."""

    def __init__(self, backend: str):
        self.backend = backend

    def __enter__(self):
        dist.init_process_group(self.backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)

    def __exit__(self, *exc):
        dist.destroy_process_group()


class no_read_back:
    """On CUDA torch's sync debug mode (any synchronising call raises); on a CPU the NoReadBack guard."""

    def __init__(self, cuda: bool):
        self.cuda, self.guard = cuda, NoReadBack()

    def __enter__(self):
        if self.cuda:
            torch.cuda.set_sync_debug_mode("error")
        else:
            self.guard.__enter__()

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.set_sync_debug_mode("default")
        else:
            self.guard.__exit__(*exc)


def harness_process(*args: str, wait: bool = True):
    """`python -m harness ARGS` in its own process (this checkout's code); waits and raises on failure if `wait`."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "harness", *args]
    if not wait:
        return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"`python -m harness {' '.join(args)}` exited {done.returncode}: {tail[0]}")
    return done


def differing_tensors(first_run: Path, second_run: Path) -> list[str]:
    """Names of the final weights' tensors that differ between two run directories' latest checkpoints."""
    from safetensors.torch import load_file

    a, b = (
        load_file(checkpoint.resolve(run / "checkpoints") / checkpoint.MODEL_FILE) for run in (first_run, second_run)
    )
    return sorted(
        name for name in a.keys() | b.keys() if name not in a or name not in b or not torch.equal(a[name], b[name])
    )


def two_rank_losses(rank: int, cfg, steps: int, result: str, port: int, cuda: bool) -> None:
    """One of two ranks: train `steps` steps; rank 0 writes the losses (averaged over the ranks) to `result`."""
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        with tempfile.TemporaryDirectory() as run_dir:
            trial = Trial(cfg, run_dir, Ranks(rank, rank, 2))
            losses = torch.stack([trial.train_step(step)[0] for step in range(steps)]).tolist()
        if rank == 0:
            Path(result).write_text(json.dumps(losses))
    finally:
        dist.destroy_process_group()


# --- the report ------------------------------------------------------------------------------------------------
def environment(cuda: bool) -> dict:
    found = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": sys.version.split()[0],
        "cpu_threads": torch.get_num_threads(),
        "gpus": torch.cuda.device_count() if cuda else 0,
    }
    if cuda:
        found["gpu"] = torch.cuda.get_device_name()
        found["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        smi = shutil.which("nvidia-smi")
        query = [smi, "--query-gpu=driver_version", "--format=csv,noheader"] if smi else None
        found["driver"] = subprocess.run(query, capture_output=True, text=True).stdout.strip() if query else None
    return found


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        f"# gpu-check on {env.get('gpu') or 'cpu'} ({report['time']})",
        "",
        f"{report['verdict']}: {report['passed']} passed, {report['failed']} failed, {report['skipped']} skipped "
        f"in {report['seconds']:.0f} s.",
        "",
        "## Environment",
        "",
        *(f"- {key}: {value}" for key, value in env.items()),
        "",
        "## Checks",
        "",
        "| check | result | what was measured | seconds |",
        "|---|---|---|---|",
        *(f"| {c['name']} | {c['status']} | {c['summary']} | {c['seconds']:.1f} |" for c in report["checks"]),
        "",
        "## Speed (micro-batch chosen by trainer.micro_batch_size=auto)",
        "",
        "| config | micro-batch | tokens/s | MFU | step ms | data ms | peak GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['config']} | {r['micro_batch_size']} | {r['tokens_per_sec']:,.0f} | {show_mfu(r['mfu'])} | "
        f"{r['step_ms']:.1f} | {r['data_ms']:.2f} | {r['peak_memory_gib']:.2f} |"
        for r in report["speed"]
    ]
    return "\n".join(lines) + "\n"


ORDER = ("baseline", "resume", "compile", "overflow", "speed", "reproducibility", "tracking", "ranks")


def main(argv: list[str]) -> int:
    given = split(argv, KEYS)
    if given.rest:
        print(
            f"gpu-check: unknown arguments {' '.join(given.rest)}; it takes out=DIR and device=cuda|cpu",
            file=sys.stderr,
        )
        return 2
    options = {**KEYS, **given.settings}
    if options["device"] not in DEVICES:
        print(f"gpu-check: device={options['device']}: must be one of {', '.join(DEVICES)}", file=sys.stderr)
        return 2
    device = options["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu-check: device=cuda: no CUDA device is visible to torch", file=sys.stderr)
        return 2
    out = Path(options["out"]).resolve()
    out.mkdir(parents=True, exist_ok=True)
    checks, started, results = Checks(device, out), time.perf_counter(), []
    print(f"gpu-check on {device}: {len(ORDER)} checks, reports in {out}", flush=True)
    for name in ORDER:
        begun = time.perf_counter()
        try:
            result = getattr(checks, name)()
        except Exception as error:
            result = Check(name, "fail", f"{type(error).__name__}: {error}".splitlines()[0][:500])
            result.numbers["traceback"] = traceback.format_exc()
        finally:
            set_determinism(False)
        result.seconds = time.perf_counter() - begun
        results.append(result)
        print(result.line(), flush=True)
    counts = {status: sum(r.status == status for r in results) for status in ("pass", "fail", "skip")}
    report = {
        "time": now(),
        "device": device,
        "verdict": "PASS" if counts["fail"] == 0 else "FAIL",
        "passed": counts["pass"],
        "failed": counts["fail"],
        "skipped": counts["skip"],
        "seconds": time.perf_counter() - started,
        "environment": environment(device == "cuda"),
        "checks": [asdict(r) for r in results],
        "speed": checks.speed_rows,
    }
    (out / "gpucheck.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "gpucheck.md").write_text(markdown(report))
    print(
        f"{report['verdict']}: {counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped in "
        f"{report['seconds']:.0f} s; {out / 'gpucheck.json'}, {out / 'gpucheck.md'}"
    )
    return 0 if counts["fail"] == 0 else 1
