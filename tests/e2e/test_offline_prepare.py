"""`prepare` without a network answers in one line what failed and how to prepare from local copies."""

import os
import subprocess
import sys

import pytest

from harness.paths import PROJECT_ROOT


@pytest.mark.parametrize("command", [["-m", "harness", "prepare"], ["-m", "harness.data", "prepare"]])
def test_prepare_offline_is_one_line_not_a_traceback(tmp_path, command):
    pytest.importorskip("huggingface_hub")
    env = os.environ | {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(PROJECT_ROOT)}
    done = subprocess.run(
        [sys.executable, *command, "dataset=fineweb_gpt2_tokens", f"out={tmp_path / 'tokens'}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("error: dataset=fineweb_gpt2_tokens: could not fetch or write its files (OfflineMode")
    assert line.endswith("prepare from local copies: parquet_dir=DIR, safetensors_dir=DIR or url=file:///PATH")
