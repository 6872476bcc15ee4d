import json

import pytest

from harness.trial.trainer import Trial
from tests.conftest import TINY, compose_config, run_in_process


def bench(*args: str, env: dict) -> str:
    return run_in_process("bench", *args, env=env).stdout


def test_bench_reports_throughput_breakdown_comparison_and_repeatability_and_the_plan_uses_it(tmp_path):
    env = {"HARNESS_BENCH_RECORDS": str(tmp_path / "throughput.jsonl")}
    out = bench(
        *TINY,
        "steps=3",
        "warmup=1",
        "compare=model.dropout=0.0; optim.lr=1e-3",
        "repeat=true",
        "repeat_steps=4",
        "peak_flops=1e12",
        env=env,
    )
    assert out.count(" tokens/s | MFU ") == 3 and out.count("peak memory") == 3
    assert "aten::" in out  # the profiler's breakdown
    assert out.count("same-seed rerun, 4 steps: bit-identical") == 3
    # The side-by-side table: a header and one row per config, the base at 1.000× itself.
    table = out[out.index("config ") :].splitlines()
    assert table[0].split() == [
        "config",
        "tokens/s",
        "×",
        "base",
        "MFU",
        "step",
        "ms",
        "data",
        "ms",
        "peak",
        "GiB",
        "micro-batch",
    ]
    assert [row.split(":")[0] for row in table[1:4]] == ["base", "compare 1", "compare 2"]
    assert "model.dropout=0.0" in table[2] and "optim.lr=1e-3" in table[3] and " 1.000 " in table[1]
    # The base config's throughput is recorded, and the planner plans this machine's trials with it.
    [record] = [json.loads(line) for line in (tmp_path / "throughput.jsonl").read_text().splitlines()]
    assert record["gpu"] == "cpu" and f"| {record['tokens_per_sec']:,.0f} tokens/s |" in out
    plan = run_in_process("plan", *TINY, "gpu=cpu", env=env)
    assert f"throughput: {record['tokens_per_sec']:,.0f} tokens/s per GPU on baseline-s42" in plan.stdout
    assert "from: measured by `make bench` on cpu (" in plan.stdout


@pytest.mark.slow
def test_compiled_step_matches_eager_on_cpu(tmp_path):
    losses = {}
    for compiled in (False, True):
        trial = Trial(
            compose_config(*TINY, "model.dropout=0.0", f"trainer.compile={compiled}"), tmp_path / str(compiled)
        )
        losses[compiled] = [trial.train_step(step)[0].item() for step in range(4)]
    assert losses[True] == pytest.approx(losses[False], abs=1e-4)
