"""`python -m harness gpu-check device=cpu` in a real process, as CI runs `make gpu-check device=cpu`: every check
runs (the resume check SIGKILLs a real trial), both reports are written, and the speed rows reach the bench records
that `python -m harness plan` reads."""

import json
import os
import subprocess
import sys

import pytest

from harness.paths import PROJECT_ROOT

CHECKS = ["baseline", "resume", "compile", "overflow", "speed", "reproducibility", "tracking", "ranks"]


@pytest.mark.slow
def test_gpu_check_on_cpu_passes_and_writes_both_reports_and_the_bench_records(tmp_path):
    records = tmp_path / "throughput.jsonl"
    env = {**os.environ, "HARNESS_BENCH_RECORDS": str(records)}
    done = subprocess.run(
        [sys.executable, "-m", "harness", "gpu-check", f"out={tmp_path / 'out'}", "device=cpu"],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "out" / "gpucheck.json").read_text())
    assert [c["name"] for c in report["checks"]] == CHECKS
    assert {c["name"]: c["status"] for c in report["checks"]} == dict.fromkeys(CHECKS, "pass")
    for check in report["checks"]:  # one line per check, as printed
        assert f"PASS  {check['name']:<15} {check['summary']}" in done.stdout
    resume = next(c for c in report["checks"] if c["name"] == "resume")["numbers"]
    assert resume["differing_tensors"] == [] and 0 < resume["killed_after_step"] < resume["steps"]
    assert report["environment"]["torch"] and report["environment"]["gpus"] == 0
    assert [row["config"] for row in report["speed"]] == ["bf16", "no_dropout", "baseline"]
    markdown = (tmp_path / "out" / "gpucheck.md").read_text()
    assert markdown.count("| pass |") == len(CHECKS) and "| baseline | " in markdown
    recorded = [json.loads(line) for line in records.read_text().splitlines()]
    assert [r["gpu"] for r in recorded] == ["cpu"] * 3 and recorded[-1]["precision"] == "tf32"


def test_gpu_check_refuses_a_device_it_does_not_know(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "harness", "gpu-check", f"out={tmp_path}", "device=tpu"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == "gpu-check: device=tpu: must be one of auto, cuda, cpu"
    assert not any(tmp_path.iterdir())
