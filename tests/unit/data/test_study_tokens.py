"""The study's own tokens (`dataset=fineweb_gpt2_tokens`), offline: a small train/validation safetensors pair in
the published layout (one uint16 `tokens` tensor each, end-of-text after every document) converted into shards
through the command line, then read by the loader exactly as the reference code reads the originals."""

import itertools
import re
import shlex
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from harness.data import tokens as study_tokens
from harness.data.loader import DataConfig, TrainBatches, held_out_batches, open_dataset
from harness.data.prepare import PrepareError, prepare
from harness.data.shards import MANIFEST, ChecksumError, Manifest, ShardWriter, open_split, sha256_file
from harness.data.tokenizer import END_OF_TEXT
from tests.conftest import compose_config, flip_a_byte
from tests.unit.data.test_prepare import disk_with_free_bytes, output_files, run_cli, run_python

CONTEXT = 1024
SHARD_TOKENS = 50_000
TRAIN_TOKENS = 2 * 96 * CONTEXT + 1 + 777  # two gpt2_small steps of 96 sequences, the target token, and more
VALIDATION_TOKENS = 40_000


def token_stream(length: int, seed: int) -> np.ndarray:
    """Documents of 1…3,000 random GPT-2 ids, each followed by end-of-text, cut to `length` (ends with one)."""
    rng = np.random.default_rng(seed)
    pieces, total = [], 0
    while total < length:
        document = rng.integers(0, END_OF_TEXT, size=int(rng.integers(1, 3000)))
        pieces.append(np.append(document, END_OF_TEXT))
        total += len(pieces[-1])
    stream = np.concatenate(pieces)[:length].astype(np.uint16)
    stream[-1] = END_OF_TEXT
    return stream


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    """train.safetensors and validation.safetensors as the reference's prepare_datasets.py saved them."""
    directory = tmp_path_factory.mktemp("gpjt-fineweb-gpt2-tokens")
    train, validation = token_stream(TRAIN_TOKENS, seed=1), token_stream(VALIDATION_TOKENS, seed=2)
    save_file({"tokens": train}, str(directory / "train.safetensors"))
    save_file({"tokens": validation}, str(directory / "validation.safetensors"))
    return directory, train, validation


@pytest.fixture(scope="module")
def converted(published, tmp_path_factory) -> Path:
    directory, _, _ = published
    out = tmp_path_factory.mktemp("converted") / "fineweb_gpt2_tokens"
    result = run_cli(
        "dataset=fineweb_gpt2_tokens", f"safetensors_dir={directory}", f"out={out}", f"shard_tokens={SHARD_TOKENS}"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out) and "tokens" in result.stderr  # the progress bar
    return out


def test_shards_hold_exactly_the_published_tensors(published, converted):
    _, train, validation = published
    np.testing.assert_array_equal(open_split(converted, "train")[:], train)
    np.testing.assert_array_equal(open_split(converted, "test")[:], validation)
    manifest = Manifest.load(converted)
    assert manifest.complete and manifest.dataset == "fineweb_gpt2_tokens"
    directory, _, _ = published
    assert manifest.source["files"] == {
        name: {"tokens": tokens, "bytes": (directory / name).stat().st_size}
        for name, tokens in (("train.safetensors", TRAIN_TOKENS), ("validation.safetensors", VALIDATION_TOKENS))
    }
    assert manifest.splits["train"].tokens == TRAIN_TOKENS and len(manifest.splits["train"].shards) > 2
    for split, stream in (("train", train), ("test", validation)):
        assert manifest.splits[split].documents == np.count_nonzero(stream == END_OF_TEXT)
        for shard in manifest.splits[split].shards:
            assert sha256_file(converted / shard.file) == shard.sha256
            assert np.fromfile(converted / shard.file, dtype=np.uint16)[-1] == END_OF_TEXT


def test_shards_are_cut_where_shard_writer_cuts_documents(published, converted):
    """The same documents through ShardWriter (the parquet path's writer) give the same shards."""
    _, train, _ = published
    written = Manifest("fineweb_gpt2_tokens", {}, 0.01)
    directory = converted.parent / "by_writer"
    directory.mkdir()
    writer = ShardWriter(directory, written, "train", SHARD_TOKENS)
    for document in np.split(train, np.flatnonzero(train == END_OF_TEXT)[:-1] + 1):
        writer.add(document[:-1])
    writer.close()
    assert [(s.documents, s.tokens, s.sha256) for s in written.splits["train"].shards] == [
        (s.documents, s.tokens, s.sha256) for s in Manifest.load(converted).splits["train"].shards
    ]


def test_gpt2_small_reads_the_reference_codes_sequences_and_test_window(published, converted):
    """ddp_train.py: sequence j = tokens[j·1024 : j·1024 + 1025] from token 0 of train; test_loss.py: batches of
    6 × 1,024 from `start_token` of validation (here 5,000 instead of 50,000,000: the file is small)."""
    _, train, validation = published
    cfg = compose_config(
        "scale=gpt2_small", f"data.path={converted}", "data.test_offset=5000", "data.test_tokens=24576"
    )
    assert cfg.data.dataset == "fineweb_gpt2_tokens" and cfg.model.context_length == CONTEXT
    t = cfg.trainer
    for world, micro in ((1, t.micro_batch_size), (8, 12)):  # 1 GPU × 6 × 16 accumulation, and 8 × 12 × 1
        accum = t.global_batch_size // (micro * world)
        for rank in range(world):
            batches = TrainBatches(open_dataset(cfg.data, "train"), CONTEXT, micro, accum, world, rank, 2, 1.0)
            for step, micro_step in itertools.product(range(2), range(accum)):
                inputs, targets = batches.get(step, micro_step)
                for b in range(micro):
                    j = ((step * accum + micro_step) * world + rank) * micro + b
                    sequence = train[j * CONTEXT : j * CONTEXT + CONTEXT + 1].astype(np.int64)
                    assert torch.equal(inputs[b], torch.from_numpy(sequence[:-1]))
                    assert torch.equal(targets[b], torch.from_numpy(sequence[1:]))
    window = list(held_out_batches(open_dataset(cfg.data, "test"), cfg.data, CONTEXT))
    assert len(window) == 4 and all(inputs.shape == (6, CONTEXT) for inputs, _ in window)
    expected = validation[5000 : 5000 + 24576 + 1].astype(np.int64)
    np.testing.assert_array_equal(torch.cat([inputs.flatten() for inputs, _ in window]).numpy(), expected[:-1])
    np.testing.assert_array_equal(torch.cat([targets.flatten() for _, targets in window]).numpy(), expected[1:])


class SimulatedCrash(Exception):
    pass


@pytest.mark.parametrize("crash_at", ["first shard", "first test shard"])
def test_an_interrupted_conversion_resumes_to_the_same_bytes(crash_at, published, converted, tmp_path, monkeypatch):
    directory, _, _ = published
    out = tmp_path / "out"
    crash_at_save = {"first shard": 1, "first test shard": len(Manifest.load(converted).splits["train"].shards) + 1}[
        crash_at
    ]
    saves, save = itertools.count(1), Manifest.save

    def save_or_crash(self, target):
        if next(saves) == crash_at_save:  # the shard is renamed into place but not yet recorded
            raise SimulatedCrash
        save(self, target)

    with monkeypatch.context() as crashing:
        crashing.setattr(Manifest, "save", save_or_crash)
        crashing.setattr(study_tokens, "BLOCK_TOKENS", 4096)  # blocks smaller than a shard: same bytes
        with pytest.raises(SimulatedCrash):
            prepare("fineweb_gpt2_tokens", out=out, shard_tokens=SHARD_TOKENS, safetensors_dir=directory)
    (out / "train_000009.bin.tmp").write_bytes(b"half a shard")
    prepare("fineweb_gpt2_tokens", out=out, shard_tokens=SHARD_TOKENS, safetensors_dir=directory)
    assert output_files(out) == output_files(converted)


def test_the_advice_for_a_damaged_shard_is_the_command_that_repairs_it(published, converted, tmp_path):
    out = shutil.copytree(converted, tmp_path / "out")
    flip_a_byte(out / "train_000001.bin")  # same size, another checksum
    (out / "test_000000.bin").unlink()
    with pytest.raises(ChecksumError) as refused:
        open_split(out, "train")
    command = re.search(r"`(python -m harness\.data prepare [^`]*)`", str(refused.value)).group(1)
    directory, _, _ = published
    assert command == (
        f"python -m harness.data prepare dataset=fineweb_gpt2_tokens out={out} "
        f"shard_tokens={SHARD_TOKENS} safetensors_dir={directory}"
    )

    repaired = run_python(*shlex.split(command)[1:])  # as printed, with this interpreter
    assert repaired.returncode == 0, repaired.stderr
    assert "re-created" in repaired.stderr and "nothing to do" not in repaired.stderr
    assert output_files(out) == output_files(converted)  # both shards back, byte for byte


def test_refuses_before_writing_when_the_disk_is_too_small(published, tmp_path, monkeypatch):
    directory, _, _ = published
    monkeypatch.setattr(shutil, "disk_usage", disk_with_free_bytes(2 * TRAIN_TOKENS))
    with pytest.raises(PrepareError, match="not enough disk space .* the token shards need about"):
        prepare("fineweb_gpt2_tokens", out=tmp_path / "out", shard_tokens=SHARD_TOKENS, safetensors_dir=directory)
    assert not (tmp_path / "out").exists()


def fake_hub(directory: Path, calls: list) -> types.SimpleNamespace:
    """Serves the local pair as the Hub dataset gpjt/fineweb-gpt2-tokens."""

    class HfApi:
        def list_repo_tree(self, repo_id, path_in_repo=None, *, repo_type=None):
            calls.append(("list_repo_tree", repo_id, repo_type))
            return [types.SimpleNamespace(path=".gitattributes", size=10)] + [
                types.SimpleNamespace(path=p.name, size=p.stat().st_size) for p in directory.glob("*.safetensors")
            ]

    def snapshot_download(*, repo_id, repo_type, allow_patterns, local_dir):
        calls.append(("snapshot_download", repo_id, repo_type, sorted(allow_patterns)))
        for name in allow_patterns:
            Path(local_dir).mkdir(parents=True, exist_ok=True)
            shutil.copy(directory / name, Path(local_dir) / name)
        return str(local_dir)

    return types.SimpleNamespace(HfApi=HfApi, snapshot_download=snapshot_download)


def test_downloads_the_two_token_files_from_the_hub(published, converted, tmp_path, monkeypatch):
    directory, _, _ = published
    calls = []
    monkeypatch.setitem(sys.modules, "huggingface_hub", fake_hub(directory, calls))
    out = prepare("fineweb_gpt2_tokens", out=tmp_path / "out", shard_tokens=SHARD_TOKENS)
    assert calls == [
        ("list_repo_tree", "gpjt/fineweb-gpt2-tokens", "dataset"),
        ("snapshot_download", "gpjt/fineweb-gpt2-tokens", "dataset", ["train.safetensors", "validation.safetensors"]),
    ]
    shards = {name: data for name, data in output_files(out).items() if name != MANIFEST}
    assert shards == {name: data for name, data in output_files(converted).items() if name != MANIFEST}
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # finished: nothing to download to say so
    prepare("fineweb_gpt2_tokens", out=out, shard_tokens=SHARD_TOKENS)


@pytest.mark.parametrize(
    "tensors, message",
    [
        ({"tokens": np.zeros(10, dtype=np.int32)}, r"is I32 of shape \[10\]; expected a 1-D U16"),
        (
            {"tokens": np.zeros(10, dtype=np.uint16), "extra": np.zeros(1, dtype=np.uint16)},
            "expected exactly one named",
        ),
        (
            {"tokens": np.array([1, 2, 50257, END_OF_TEXT], dtype=np.uint16)},
            "token 2 is 50,257, outside GPT-2's vocabulary",
        ),
        (None, "is not a safetensors file"),
    ],
)
def test_files_that_are_not_the_published_layout_are_refused(tensors, message, published, tmp_path):
    directory, _, _ = published
    bad = tmp_path / "bad"
    shutil.copytree(directory, bad)
    if tensors is None:
        (bad / "validation.safetensors").write_bytes(b"\xff" * 64)
    else:
        save_file(tensors, str(bad / "validation.safetensors"))
    with pytest.raises(PrepareError, match=message):
        prepare("fineweb_gpt2_tokens", out=tmp_path / "out", shard_tokens=SHARD_TOKENS, safetensors_dir=bad)


def test_options_of_the_other_source_are_refused(published, tmp_path):
    directory, _, _ = published
    with pytest.raises(PrepareError, match="parquet_dir does not apply to dataset=fineweb_gpt2_tokens"):
        prepare("fineweb_gpt2_tokens", out=tmp_path / "a", parquet_dir=directory)
    with pytest.raises(PrepareError, match="safetensors_dir does not apply to dataset=fineweb"):
        prepare("fineweb", out=tmp_path / "b", safetensors_dir=directory)
    assert DataConfig(dataset="fineweb_gpt2_tokens").dataset == "fineweb_gpt2_tokens"
