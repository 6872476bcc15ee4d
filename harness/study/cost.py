"""What a trial costs before it runs: parameters, tokens, FLOPs, GPU-hours at a stated throughput, checkpoint
disk and money. Config layer only (no torch), so `python -m harness plan` answers at once and a study can budget
itself: `trial_gpu_hours(cfg, gpu="h100")`. Where the throughput figure comes from is in docs/study-runs.md."""

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from harness.config.schema import ModelConfig, TrialConfig
from harness.paths import PROJECT_ROOT
from harness.trial import disk
from harness.trial.flops import PEAK_FLOPS

# Where `make bench` keeps what it measured, one JSON line per run (HARNESS_BENCH_RECORDS overrides).
BENCH_RECORDS = PROJECT_ROOT / ".cache" / "bench" / "throughput.jsonl"

PARAMETER_BYTES = 4  # weights stay fp32 under every precision (AMP casts on the fly)


def parameters(m: ModelConfig) -> int:
    """`GPTModel(m).num_parameters()`, counted from the config."""
    d = m.d_model
    per_layer = 12 * d * d + 10 * d + (3 * d if m.qkv_bias else 0)  # 4 d² attention, 8 d² MLP; biases, 2 LayerNorms
    head = 0 if m.tie_weights else m.vocab_size * d
    return m.vocab_size * d + m.context_length * d + m.n_layer * per_layer + 2 * d + head


def flops_per_token(m: ModelConfig) -> float:
    """`GPTModel(m).flops_per_token()`, counted from the config: 6·M + 12·L·d·T, M the weights that multiply
    (every Linear, the head included, a tied matrix once)."""
    multiplying = m.n_layer * 12 * m.d_model**2 + m.vocab_size * m.d_model
    return 6 * multiplying + 12 * m.n_layer * m.d_model * m.context_length


# HellaSwag's scoring, as docs/hellaswag.md ("How fast") estimates it: 4 rows per example of ~70 tokens, ~25 of them
# the ending's; forward only, the head applied at the ending tokens alone, at the training's matmul FLOP/s, plus
# ~5 s per scoring of the whole split for the ~630 batches' launches and tokenizing its 40,168 strings.
HELLASWAG_EXAMPLES = 10_042
HELLASWAG_ROW_TOKENS = 70
HELLASWAG_ENDING_TOKENS = 25
HELLASWAG_OVERHEAD_S = 5.0


def hellaswag_flops(m: ModelConfig) -> float:
    """Forward FLOPs of one scoring of the whole validation split: 2 × the blocks' weights × every row token,
    2 × the head × the ending tokens."""
    rows, row_tokens = 4 * HELLASWAG_EXAMPLES, min(HELLASWAG_ROW_TOKENS, m.context_length)
    return rows * (
        2 * m.n_layer * 12 * m.d_model**2 * row_tokens + 2 * m.vocab_size * m.d_model * HELLASWAG_ENDING_TOKENS
    )


def hellaswag_scorings(cfg: TrialConfig) -> int:
    """How often the trial scores HellaSwag: at the end, and every eval.hellaswag_interval steps before it."""
    e, steps = cfg.eval, cfg.trainer.max_steps
    if not e.hellaswag:
        return 0
    return 1 + ((steps - 1) // e.hellaswag_interval if e.hellaswag_interval else 0)


# --- what the figures are ----------------------------------------------------------------------------------
# The study published that a gpt2_small trial (fp16 AMP, dropout 0.1, 33,165 steps × 98,304 tokens) took ~3.5 h on
# 8×A100 (40 GB, its runs/8xa100m40-*), end to end. That is its achieved MFU, the one measured figure here.
STUDY_TOKENS, STUDY_HOURS, STUDY_GPUS = 33_165 * 98_304, 3.5, 8
STUDY_TOKENS_PER_SEC = STUDY_TOKENS / (STUDY_HOURS * 3600 * STUDY_GPUS)  # per GPU
STUDY_MFU = STUDY_TOKENS_PER_SEC * flops_per_token(ModelConfig()) / PEAK_FLOPS["A100"]  # the defaults: gpt2_small


@dataclass(frozen=True)
class Gpu:
    name: str
    peak_flops: float
    mfu: float  # achieved on the reference setting
    mfu_source: str
    price: float  # US$ per GPU-hour
    price_source: str


_CARRIED = (
    f"assumption, not measured: the MFU the study measured on A100s ({STUDY_MFU:.1%}), at this GPU's "
    f"peak; `make bench` on one measures it"
)
GPUS = {
    "a100": Gpu(
        "A100",
        PEAK_FLOPS["A100"],
        STUDY_MFU,
        f"measured: the study's gpt2_small trials, ~{STUDY_HOURS:g} h on {STUDY_GPUS}×A100 (docs/study.md), "
        f"{STUDY_TOKENS_PER_SEC:,.0f} tokens/s per GPU",
        1.29,
        "assumption: an on-demand A100 40GB list price (the study paid US$35-135 per 28 GPU-hour trial)",
    ),
    "h100": Gpu(
        "H100", PEAK_FLOPS["H100"], STUDY_MFU, _CARRIED, 2.99, "assumption: a typical on-demand H100 SXM list price"
    ),
    "h200": Gpu(
        "H200", PEAK_FLOPS["H200"], STUDY_MFU, _CARRIED, 3.79, "assumption: a typical on-demand H200 list price"
    ),
}
DEFAULT_GPU = "h100"

# A trial's speed relative to the reference setting (fp16 AMP, dropout on), and where each number comes from.
SPEEDS = {
    "fp16_amp": (1.0, "the reference"),
    "bf16_amp": (1.0, "assumption: the same tensor-core peak as fp16"),
    "tf32": (0.5, "assumption: TF32 tensor cores peak at half the fp16 rate"),
    "fp32": (1 / 2.4, "measured: no_amp ran ~2.4× slower (docs/study.md)"),
    "no_dropout": (1.08, "measured: no_dropout ran ~8% faster (docs/study.md)"),
}


def speed(cfg: TrialConfig) -> float:
    return SPEEDS[cfg.trainer.precision][0] * (SPEEDS["no_dropout"][0] if cfg.model.dropout == 0 else 1.0)


def gpu_kind(device_name: str) -> str:
    """The GPUS key of a device name (`NVIDIA H100 80GB HBM3` -> h100), else the name in lower case."""
    name = device_name.split(" (")[0]  # bench writes `cpu (N threads)`
    return next((kind for kind, gpu in GPUS.items() if gpu.name in name), re.sub(r"\W+", "-", name.lower()).strip("-"))


# --- the throughput a plan uses ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Throughput:
    gpu: str  # a GPUS key, or another kind named by the user or a benchmark
    flops_per_sec: float  # achieved matmul FLOP/s per GPU on the reference setting
    source: str

    def tokens_per_sec(self, cfg: TrialConfig) -> float:
        """What one GPU trains per second on this trial."""
        return self.flops_per_sec * speed(cfg) / flops_per_token(cfg.model)


def bench_records_file() -> Path:
    return Path(os.environ.get("HARNESS_BENCH_RECORDS") or BENCH_RECORDS)


def latest_bench(gpu: str) -> dict | None:
    """The newest `make bench` record for this kind of GPU, if any."""
    path = bench_records_file()
    if not path.is_file():
        return None
    found = None
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a killed bench
            continue
        if record.get("gpu") == gpu:
            found = record
    return found


def record_bench(device: str, tokens_per_sec: float, cfg: TrialConfig, overrides: list[str], when: str) -> Path:
    """Append what a benchmark measured (tokens/s of one device on `cfg`); returns the file."""
    path = bench_records_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "time": when,
        "device": device,
        "gpu": gpu_kind(device),
        "tokens_per_sec": tokens_per_sec,
        "flops_per_token": flops_per_token(cfg.model),
        "precision": cfg.trainer.precision,
        "dropout": cfg.model.dropout,
        "scale": cfg.scale,
        "overrides": overrides,
    }
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
    return path


def throughput(
    gpu: str = DEFAULT_GPU,
    tokens_per_sec: float | None = None,
    mfu: float | None = None,
    first: TrialConfig | None = None,
) -> Throughput:
    """The figure a plan uses (module docstring). `tokens_per_sec` or `mfu`: one GPU's on `first`, the plan's
    first trial. Raises ValueError when nothing gives one."""
    if (tokens_per_sec is not None or mfu is not None) and first is None:
        raise ValueError("tokens_per_sec= and mfu= need the trial they were measured on")
    if tokens_per_sec is not None:
        return Throughput(
            gpu,
            tokens_per_sec * flops_per_token(first.model) / speed(first),
            f"given: tokens_per_sec={tokens_per_sec:g} on the first trial",
        )
    if mfu is not None:
        if gpu not in GPUS:
            raise ValueError(
                f"gpu={gpu}: mfu= needs a known peak, gpu= one of {', '.join(GPUS)} (or give tokens_per_sec=)"
            )
        return Throughput(
            gpu,
            mfu * GPUS[gpu].peak_flops / speed(first),
            f"given: mfu={mfu:g} of the {GPUS[gpu].name}'s peak on the first trial",
        )
    record = latest_bench(gpu)
    if record is not None:
        reference = SPEEDS[record["precision"]][0] * (SPEEDS["no_dropout"][0] if record["dropout"] == 0 else 1.0)
        overrides = " ".join(record.get("overrides") or []) or "defaults"
        return Throughput(
            gpu,
            record["tokens_per_sec"] * record["flops_per_token"] / reference,
            f"measured by `make bench` on {record['device']} at {record['time']} "
            f"({record['tokens_per_sec']:,.0f} tokens/s on {overrides}; {bench_records_file()})",
        )
    if gpu in GPUS:
        return Throughput(gpu, GPUS[gpu].mfu * GPUS[gpu].peak_flops, GPUS[gpu].mfu_source)
    raise ValueError(
        f"gpu={gpu}: no throughput known for it (the table has {', '.join(GPUS)}, and no `make bench` "
        f"ran on one); give tokens_per_sec="
    )


# --- one trial ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrialCost:
    name: str
    parameters: int
    steps: int
    tokens: int
    flops: float
    gpus: int  # ranks of the trial
    tokens_per_sec: float  # per GPU
    gpu_hours: float
    checkpoint_bytes: int  # one checkpoint
    checkpoints_at_most: int  # on disk at once while it runs
    checkpoints_kept: int  # left when it ends
    test_tokens: int
    hellaswag_scorings: int = 0
    hellaswag_seconds: float = 0.0  # all its scorings together, on one GPU

    @property
    def hours(self) -> float:
        """Wall time on its own GPUs."""
        return self.gpu_hours / self.gpus


def trial_cost(name: str, cfg: TrialConfig, rate: Throughput) -> TrialCost:
    t = cfg.trainer
    tokens = t.max_steps * t.global_batch_size * cfg.model.context_length
    per_gpu = rate.tokens_per_sec(cfg)
    params = parameters(cfg.model)
    return TrialCost(
        name,
        params,
        t.max_steps,
        tokens,
        tokens * flops_per_token(cfg.model),
        t.nproc_per_node,
        per_gpu,
        tokens / per_gpu / 3600,
        disk.checkpoint_size(PARAMETER_BYTES * params),
        disk.kept_at_most(t.max_steps, t.checkpoint_interval, t.keep_checkpoints),
        disk.kept_at_end(t.max_steps, t.checkpoint_interval, t.keep_checkpoints),
        cfg.data.test_tokens,
        hellaswag_scorings(cfg),
        hellaswag_scorings(cfg) * (hellaswag_flops(cfg.model) / rate.flops_per_sec + HELLASWAG_OVERHEAD_S),
    )


def trial_gpu_hours(cfg: TrialConfig, gpu: str = DEFAULT_GPU, tokens_per_sec: float | None = None) -> float:
    """GPU-hours the trial's training steps take on `gpu` GPUs: at `tokens_per_sec` per GPU if given, else at the
    figure `throughput(gpu)` finds (a `make bench` record, else the GPUS table). Raises ValueError for a GPU
    without a figure."""
    return trial_cost("", cfg, throughput(gpu, tokens_per_sec, first=cfg)).gpu_hours


# --- a study --------------------------------------------------------------------------------------------------
def study_hours(trials: list[TrialCost], gpus: int) -> float:
    """Wall hours for the trials on `gpus` GPUs, each trial on its own ranks: longest first, each to the GPUs
    that free up first (the basic launcher runs one at a time: gpus = one trial's ranks)."""
    slots = [0.0] * max(1, gpus // max(t.gpus for t in trials))
    for trial in sorted(trials, key=lambda t: -t.hours):
        slots[slots.index(min(slots))] += trial.hours
    return max(slots)


def disk_needed(trials: list[TrialCost], gpus: int) -> int:
    """Bytes the study's checkpoints need at most: what every trial leaves, plus what the trials running at once
    hold beyond that."""
    running = max(1, gpus // max(t.gpus for t in trials))
    kept = sum(t.checkpoints_kept * t.checkpoint_bytes for t in trials)
    extra = sorted(((t.checkpoints_at_most - t.checkpoints_kept) * t.checkpoint_bytes for t in trials), reverse=True)
    return kept + sum(extra[:running])


def speed_factors(first: TrialConfig, trials: list[TrialConfig]) -> str:
    """The speed factors (with their sources) by which the other trials differ from the first."""
    used = {cfg.trainer.precision for cfg in trials} - {first.trainer.precision}
    if {cfg.model.dropout == 0 for cfg in trials} != {first.model.dropout == 0}:
        used.add("no_dropout")
    return "; ".join(f"{name} ×{factor:.3g} ({source})" for name, (factor, source) in SPEEDS.items() if name in used)
