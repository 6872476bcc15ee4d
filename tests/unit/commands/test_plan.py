"""`python -m harness plan`: what a trial or a study costs, before anything runs, with numbers worked out by hand
from the study's gpt2_small (docs/study.md) (33,165 steps × 98,304 tokens) and the quick study."""

import pytest
import torch

from harness.commands.plan import compose_trials, main
from harness.config.compose import compose, config_hash
from harness.config.schema import ModelConfig
from harness.progress import format_duration
from harness.study import cost
from harness.trial import disk
from harness.trial.checkpoint import checkpoint_bytes
from harness.trial.model import GPTModel
from interventions import REGISTRY
from tests.conftest import TINY

GPT2_SMALL_TOKENS = 33_165 * 96 * 1_024  # 3,260,252,160 (docs/study.md)
GPT2_SMALL_FLOPS_PER_TOKEN = 6 * (12 * 12 * 768**2 + 50_257 * 768) + 12 * 12 * 768 * 1_024  # 854,438,400
GPT2_SMALL_CHECKPOINT = 3 * 4 * 163_009_536 + 2**20  # fp32 weights and AdamW's two moments, plus the small state


@pytest.fixture(autouse=True)
def no_bench_records(tmp_path, monkeypatch):
    """The plans below use the documented table, whatever `make bench` recorded on this machine."""
    monkeypatch.setenv("HARNESS_BENCH_RECORDS", str(tmp_path / "none.jsonl"))


def plan(capsys, *arguments: str) -> str:
    assert main(list(arguments)) == 0
    return capsys.readouterr().out


def row(output: str, trial: str) -> list[str]:
    [line] = [line for line in output.splitlines() if line.startswith(f"| {trial} ")]
    return [cell.strip() for cell in line.strip("|").split("|")]


@pytest.mark.parametrize(
    "model",
    [{}, {"context_length": 64, "n_layer": 2, "n_head": 2, "d_model": 64}, {"n_layer": 6, "n_head": 6, "d_model": 384}],
    ids=["gpt2_small", "smoke", "proxy"],
)
def test_the_plan_counts_parameters_and_flops_as_the_model_does(model):
    """From the config alone, for every overlay's model settings: the counts the trainer logs and its mfu uses."""
    variants = {
        tuple(sorted((k.removeprefix("model."), v) for k, v in i.changes.items() if k.startswith("model.")))
        for i in REGISTRY.values()
    } | {(("qkv_bias", True), ("tie_weights", True))}
    for changes in variants:
        cfg = ModelConfig(**model, **dict(changes))
        with torch.device("meta"):
            built = GPTModel(cfg)
        assert cost.parameters(cfg) == built.num_parameters(), changes
        assert cost.flops_per_token(cfg) == built.flops_per_token(), changes
    seeds = {(): 163_009_536, (("tie_weights", True),): 124_412_160, (("qkv_bias", True),): 163_037_184}
    if not model:
        for changes, count in seeds.items():
            assert cost.parameters(ModelConfig(**dict(changes))) == count
        assert cost.flops_per_token(ModelConfig()) == GPT2_SMALL_FLOPS_PER_TOKEN


def test_the_checkpoint_size_is_the_trials_own_estimate():
    cfg = compose(TINY)
    assert disk.checkpoint_size(cost.PARAMETER_BYTES * cost.parameters(cfg.model)) == checkpoint_bytes(
        GPTModel(cfg.model)
    )


def test_gpt2_small_on_eight_gpus_at_a_given_throughput(capsys):
    out = plan(
        capsys,
        "scale=gpt2_small",
        "trainer.nproc_per_node=8",
        "gpus=8",
        "tokens_per_sec=100000",
        "price_per_gpu_hour=2",
    )
    gpu_hours = GPT2_SMALL_TOKENS / 100_000 / 3600  # 9.0563
    assert row(out, "baseline-s42") == [
        "baseline-s42",
        "163,009,536",
        "33,165",
        "3,260,252,160",
        f"{GPT2_SMALL_TOKENS * GPT2_SMALL_FLOPS_PER_TOKEN:.3g}",
        "100,000",
        "8",
        "9.06",
        "1h07m",
        "3 × 2.0 GB",
        "$18.11",
    ]  # 9.0563 h / 8 GPUs = 67.9 min; 9.0563 × $2
    assert gpu_hours == pytest.approx(9.0563, abs=1e-4)
    assert "from: given: tokens_per_sec=100000 on the first trial" in out
    assert (
        f"total: 1 trial; 3,260,252,160 tokens; 2.79e+18 FLOPs; 9.06 GPU-hours; 1h07m on 8 GPUs; checkpoints: "
        f"{disk.format_bytes(3 * GPT2_SMALL_CHECKPOINT)} of disk at most (keeping latest and best"
    ) in out
    assert "price: $2.00 per GPU-hour (given)" in out


def test_the_default_a100_figure_gives_back_the_study_s_own_measurement(capsys):
    """The study (docs/study.md): a gpt2_small trial took ~3.5 h on 8×A100; no_amp ~2.4× as long; no_dropout ~8% faster."""
    cfg = compose(["scale=gpt2_small"])
    assert cost.trial_gpu_hours(cfg, gpu="a100") == pytest.approx(3.5 * 8)
    assert cost.trial_gpu_hours(compose(["scale=gpt2_small", "+intervention=no_amp"]), gpu="a100") == pytest.approx(
        3.5 * 8 * 2.4
    )
    assert cost.trial_gpu_hours(cfg, gpu="h100", tokens_per_sec=100_000) == pytest.approx(
        GPT2_SMALL_TOKENS / 1e5 / 3600
    )
    out = plan(capsys, "scale=gpt2_small", "+intervention=no_dropout", "trainer.nproc_per_node=8", "gpus=8", "gpu=a100")
    assert row(out, "no_dropout-s42")[6:] == [
        "8",
        "25.93",
        "3h14m",
        "3 × 2.0 GB",
        "$33.44",
    ]  # 28 / 1.08 GPU-hours × $1.29
    # The study's 8.86% MFU at fp16 AMP with dropout, 8% faster without: 32,344 × 1.08 tokens/s, 312e12 × 9.57%.
    assert (
        "34,931 tokens/s per GPU on no_dropout-s42 (29.8 TFLOP/s of matmuls, 9.6% MFU of the A100's 312 TFLOP/s)" in out
    )
    assert (
        "from: measured: the study's gpt2_small trials, ~3.5 h on 8×A100 (docs/study.md), 32,344 tokens/s per GPU"
        in out
    )
    assert "price: $1.29 per GPU-hour (assumption:" in out


def test_the_quick_study_as_the_sweeper_composes_it(capsys):
    planned, what = compose_trials(["+sweep=quick"])
    assert what.startswith("study quick, 6 trials at scale smoke: ")
    assert [name for name, _ in planned] == [
        "baseline-s42",
        "no_dropout-s42",
        "lr_schedule-s42",
        "baseline-s22",
        "no_dropout-s22",
        "lr_schedule-s22",
    ]
    _, no_dropout_22 = planned[4]  # composed once per arm, its seeds set after: the same computation as composed
    assert config_hash(no_dropout_22) == config_hash(
        compose(
            [
                "trainer.max_steps=40",
                "trainer.checkpoint_interval=20",
                "+intervention=no_dropout",
                "seed=22",
                "train_seed=null",
            ]
        )
    )

    out = plan(capsys, "+sweep=quick", "gpu=cpu", "tokens_per_sec=1000", "price_per_gpu_hour=3", "gpus=2")
    # 40 steps × 16 × 64 = 40,960 tokens; 1,000 tokens/s for the first trial; no_dropout 8% faster (docs/study.md).
    assert row(out, "baseline-s42")[2:] == [
        "40",
        "40,960",
        "8.19e+11",
        "1,000",
        "1",
        "0.0114",
        "40s",
        "3 × 79.5 MB",
        "$0.03",
    ]
    assert row(out, "no_dropout-s22")[5:8] == ["1,080", "1", "0.0105"]  # 40,960 / 1,080 / 3,600
    # 4 × 40.96 s + 2 × 37.93 s = 239.7 s on 2 GPUs in parallel: 119.9 s. Checkpoints of 79,489,024 bytes after steps
    # 1, 21 and 40: at most 3 on disk while a trial runs, 2 (latest, best) left at its end.
    assert (
        "total: 6 trials; 245,760 tokens; 4.91e+12 FLOPs; 0.0666 GPU-hours; 1m59s on 2 GPUs; checkpoints: "
        "1.1 GB of disk at most"
    ) in out and out.splitlines()[-2].endswith("; $0.20")


@pytest.mark.parametrize(
    "arguments, error",
    [
        (
            ["gpu=tpu"],
            "gpu=tpu: no throughput known for it (the table has a100, h100, h200, and no `make bench` ran on "
            "one); give tokens_per_sec=",
        ),
        (
            ["gpu=cpu", "mfu=0.5"],
            "gpu=cpu: mfu= needs a known peak, gpu= one of a100, h100, h200 (or give tokens_per_sec=)",
        ),
        (["tokens_per_sec=1", "mfu=0.1"], "tokens_per_sec= and mfu= both give the throughput: give one"),
        (
            ["scale=gpt2_small", "trainer.nproc_per_node=8", "gpus=4"],
            "gpus=4: fewer than a trial's ranks (trainer.nproc_per_node=8)",
        ),
        (
            ["+sweep=quick", "hydra.sweeper.seeds=[42,-1]"],
            "study quick, trial baseline-s-1: seed=-1: must be a whole number in [0, 4294967295]",
        ),
        (["+sweep=quick", "seed=3"], "study quick: seed=3: the study sets it per trial; change hydra.sweeper.seeds"),
        (
            ["optim.lr=["],
            "optim.lr=[: not an override Hydra's grammar accepts (no viable alternative at input '['); an override is key=value, and a value holding spaces or characters such as ; needs quotes around it: key='a b'",
        ),
    ],
    ids=[
        "unknown gpu",
        "mfu without a peak",
        "two throughputs",
        "too few gpus",
        "a study's bad seed",
        "a per-trial key",
        "syntax",
    ],
)
def test_what_cannot_be_planned_is_refused_in_one_line(arguments, error, capsys):
    with pytest.raises(SystemExit) as exit_status:
        main(arguments)
    assert exit_status.value.code == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {error}"]


def test_the_hellaswag_time_is_its_forward_flops_at_the_training_throughput(capsys):
    # 4 × 10,042 rows × (2 × 12 layers × 12 × 768² × 70 row tokens + 2 × 50,257 × 768 × 25 ending tokens)
    flops = 4 * 10_042 * (2 * 12 * 12 * 768**2 * 70 + 2 * 50_257 * 768 * 25)
    assert cost.hellaswag_flops(ModelConfig()) == flops
    out = plan(capsys, "scale=gpt2_small", "eval.hellaswag_interval=250", "tokens_per_sec=100000")
    each = flops / (100_000 * GPT2_SMALL_FLOPS_PER_TOKEN) + 5  # the stated throughput's FLOP/s, plus 5 s a scoring
    [line] = [line for line in out.splitlines() if line.startswith("HellaSwag:")]
    scorings = 1 + (33_165 - 1) // 250  # every 250 steps before the last, and at the end
    assert f"baseline-s42: {scorings} × {format_duration(each)}" in line
    assert f"{format_duration(scorings * each)} in all" in line
    assert "not scored (eval.hellaswag=false)" in plan(capsys, "eval.hellaswag=false")
