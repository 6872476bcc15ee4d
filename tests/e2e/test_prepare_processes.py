"""A data preparation SIGKILLed, with its tokenizer workers, between writing a shard and recording it in the
manifest, then resumed through the command line: the same bytes as an uninterrupted preparation."""

import signal

from harness.data.shards import Manifest
from tests.unit.data import test_prepare
from tests.unit.data.test_prepare import cli_arguments, output_files, run_cli, run_python

# the unit tests' module-scoped fixtures: a parquet source and its uninterrupted preparation
documents, parquet_dir, reference = test_prepare.documents, test_prepare.parquet_dir, test_prepare.reference

KILL_AT_MANIFEST_SAVE = """
import os, signal, sys
from harness.data import shards
from harness.data.__main__ import main
from harness.data.loader import DataConfig, open_dataset

kill_at, saves = int(sys.argv[1]), 0
save = shards.Manifest.save

def save_or_die(self, directory):
    global saves
    saves += 1
    if saves == kill_at:  # the shard is renamed into place but not yet in the manifest
        os.killpg(0, signal.SIGKILL)  # the whole group: the preparation and its tokenizer workers
    save(self, directory)

shards.Manifest.save = save_or_die
sys.exit(main(sys.argv[2:]))
"""


def test_resume_after_kill_is_byte_identical(reference, parquet_dir, tmp_path):
    first_test_shard_save = len(Manifest.load(reference).splits["train"].shards) + 1
    out = tmp_path / "out"
    arguments = cli_arguments(parquet_dir, out)

    killed = run_python(
        "-c", KILL_AT_MANIFEST_SAVE, str(first_test_shard_save), "prepare", *arguments, start_new_session=True
    )
    assert killed.returncode == -signal.SIGKILL
    manifest = Manifest.load(out)
    assert not manifest.complete and manifest.splits["test"].documents == 0
    assert (out / "test_000000.bin").exists()  # written, but not in the manifest
    (out / "test_000000.bin.tmp").write_bytes(b"half a shard")

    resumed = run_cli(*arguments)
    assert resumed.returncode == 0, resumed.stderr
    assert output_files(out) == output_files(reference)
