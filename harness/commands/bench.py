"""Throughput benchmark: `python -m harness bench [steps=N] [warmup=N] [compare="OVERRIDES; OVERRIDES…"]
[repeat=true] [deterministic=true] [TRIAL OVERRIDES…]` (also `make bench`).

Trains the composed trial (and each `;`-separated compare config on top of it) for a few steps without MLflow and
prints tokens/s, MFU, peak memory and the top ops, then a table of all side by side;
the base config's tokens/s is appended to the bench records `python -m harness plan` reads. docs/trial.md has more."""

import resource
import tempfile
import time
from datetime import datetime

import torch
from hydra import compose, initialize_config_dir

from harness.arguments import split, whole_number
from harness.config.compose import compose_trial
from harness.config.schema import TrialConfig
from harness.paths import PROJECT_ROOT
from harness.study.cost import gpu_kind, record_bench
from harness.trial.flops import mfu
from harness.trial.launch import set_determinism
from harness.trial.trainer import Trial

BENCH_KEYS = {
    "steps": 20,
    "warmup": 5,
    "compare": None,
    "repeat": False,
    "repeat_steps": 50,
    "deterministic": False,
    "peak_flops": None,
}


def compose_overrides(overrides: list[str], steps: int) -> TrialConfig:
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, f"trainer.max_steps={steps}", "trainer.progress=false"])
    return compose_trial(cfg, overrides)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(cfg: TrialConfig, steps: int, warmup: int, peak_flops) -> dict:
    with tempfile.TemporaryDirectory() as run_dir:
        trial = Trial(cfg, run_dir)
        device = trial.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for step in range(warmup):
            trial.train_step(step)
        synchronize(device)
        started = time.perf_counter()
        for step in range(warmup, warmup + steps):
            last = trial.train_step(step)
        last.tolist()
        seconds = (time.perf_counter() - started) / steps
        data_started = time.perf_counter()
        for micro_step in range(trial.accum):
            trial.batches.get(warmup, micro_step)
        data_seconds = time.perf_counter() - data_started
        top_ops = profile(trial, warmup + steps)
    tokens_per_sec = trial.tokens_per_step / seconds
    peak = peak_flops or (trial.peak_flops if device.type == "cuda" else None)
    return {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "step_ms": 1000 * seconds,
        "data_ms": 1000 * data_seconds,
        "tokens_per_sec": tokens_per_sec,
        "mfu": mfu(tokens_per_sec, trial.model.flops_per_token(), peak, trial.ranks.world) if peak else None,
        "peak_memory_gib": (
            torch.cuda.max_memory_allocated(device)
            if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        )
        / 2**30,
        "micro_batch_size": trial.micro_batch,
        "top_ops": top_ops,
    }


def profile(trial: Trial, first_step: int, steps: int = 2) -> list[tuple[str, float]]:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if trial.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for step in range(first_step, first_step + steps):
            trial.train_step(step)
        synchronize(trial.device)
    attr = "self_device_time_total" if trial.device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, attr), reverse=True)
    total = sum(getattr(e, attr) for e in events) or 1
    return [(e.key, getattr(e, attr) / total) for e in events[:8]]


def losses_of_two_runs(cfg: TrialConfig, steps: int) -> tuple[list[float], list[float]]:
    runs = []
    for _ in range(2):
        with tempfile.TemporaryDirectory() as run_dir:
            trial = Trial(cfg, run_dir)
            runs.append(torch.stack([trial.train_step(step)[0] for step in range(steps)]).tolist())
    return runs[0], runs[1]


def report(name: str, result: dict) -> str:
    utilisation = (
        f"{100 * result['mfu']:.1f}%" if result["mfu"] is not None else "n/a (no known peak; pass peak_flops=)"
    )
    lines = [
        f"== {name} on {result['device']}",
        f"   step {result['step_ms']:.1f} ms (data {result['data_ms']:.1f} ms) | {result['tokens_per_sec']:,.0f} tokens/s"
        f" | MFU {utilisation} | peak memory {result['peak_memory_gib']:.2f} GiB",
        "   step time by op (self time share):",
    ]
    lines += [f"     {share:6.1%}  {op}" for op, share in result["top_ops"]]
    return "\n".join(lines)


def comparison_table(configs: dict[str, list[str]], results: dict[str, dict]) -> str:
    """Every measured config side by side, throughput relative to the base."""
    base = results["base"]["tokens_per_sec"]
    rows = [("config", "tokens/s", "× base", "MFU", "step ms", "data ms", "peak GiB", "micro-batch")]
    for name, result in results.items():
        rows.append(
            (
                f"{name}: {' '.join(configs[name]) or 'defaults'}",
                f"{result['tokens_per_sec']:,.0f}",
                f"{result['tokens_per_sec'] / base:.3f}",
                f"{100 * result['mfu']:.1f}%" if result["mfu"] is not None else "n/a",
                f"{result['step_ms']:.1f}",
                f"{result['data_ms']:.2f}",
                f"{result['peak_memory_gib']:.2f}",
                str(result["micro_batch_size"]),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        for row in rows
    )


def main(argv: list[str]) -> None:
    given = split(argv, BENCH_KEYS)
    options, overrides = dict(BENCH_KEYS), given.rest
    for key, value in given.settings.items():
        if key == "compare":
            options[key] = value
        elif key in ("repeat", "deterministic"):
            options[key] = value.lower() == "true"
        elif key == "peak_flops":
            options[key] = float(value)
        else:
            options[key] = whole_number(key, value)
    steps, warmup = options["steps"], options["warmup"]
    configs = {"base": overrides}
    for number, extra in enumerate(filter(None, map(str.strip, (options["compare"] or "").split(";"))), 1):
        configs[f"compare {number}"] = [*overrides, *extra.split()]
    if options["deterministic"]:
        configs["deterministic"] = [*overrides, "trainer.deterministic=true"]
    results = {}
    for name, config_overrides in configs.items():
        cfg = compose_overrides(config_overrides, max(steps + warmup + 2, options["repeat_steps"]))
        set_determinism(cfg.trainer.deterministic)
        results[name] = measure(cfg, steps, warmup, options["peak_flops"])
        print(report(f"{name}: {' '.join(config_overrides) or 'defaults'}", results[name]), flush=True)
        if name == "base":
            path = record_bench(
                results[name]["device"],
                results[name]["tokens_per_sec"],
                cfg,
                config_overrides,
                datetime.now().isoformat(timespec="seconds"),
            )
            print(f"   recorded in {path} for `python -m harness plan gpu={gpu_kind(results[name]['device'])}`")
        if options["repeat"]:
            first, second = losses_of_two_runs(cfg, options["repeat_steps"])
            drift = max(abs(a - b) for a, b in zip(first, second))
            verdict = "bit-identical" if first == second else f"differs (max |Δloss| {drift:.3g})"
            print(f"   same-seed rerun, {options['repeat_steps']} steps: {verdict}")
    if len(results) > 1:
        print(comparison_table(configs, results))
    if "deterministic" in results:
        cost = 1 - results["deterministic"]["tokens_per_sec"] / results["base"]["tokens_per_sec"]
        print(f"trainer.deterministic=true costs {cost:.1%} of throughput")
