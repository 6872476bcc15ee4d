import json
import lzma

import numpy as np
import pytest
import torch

from harness.data.corpus import CORPUS_FILE, prepare_bundled, read_documents
from harness.data.loader import DataConfig, TrainBatches, held_out_batches, open_dataset
from harness.data.shards import Manifest
from harness.data.tokenizer import END_OF_TEXT, gpt2_encoding
from harness.paths import PROJECT_ROOT


def test_bundled_corpus_is_real_prose_of_the_promised_size():
    with lzma.open(CORPUS_FILE, "rt", encoding="utf-8") as f:
        docs = [json.loads(line) for line in f]
    text_bytes = sum(len(d["text"].encode()) for d in docs)
    assert 1_000_000 <= text_bytes <= 5_000_000
    assert len(docs) >= 100 and all(d["text"].strip() and d["title"] for d in docs)


def test_held_out_split_is_whole_documents_no_training_step_reads():
    cfg = DataConfig()
    train, test = open_dataset(cfg, "train"), open_dataset(cfg, "test")
    docs = read_documents()
    n_test = int(np.ceil(len(docs) * cfg.holdout_fraction))
    enc = gpt2_encoding()
    expected_test = [t for d in docs[-n_test:] for t in enc.encode_ordinary(d) + [END_OF_TEXT]]
    assert np.array_equal(np.asarray(test), expected_test)
    assert len(train) == sum(len(enc.encode_ordinary(d)) + 1 for d in docs[:-n_test])
    assert train[-1] == test[-1] == END_OF_TEXT


def sequences_read(tokens, micro, accum, world, steps=3, seed=None):
    """Per step, the set of sequences (as tuples) all ranks and micro-steps read."""
    per_step = []
    for step in range(steps):
        rows = []
        for rank in range(world):
            batches = TrainBatches(tokens, 8, micro, accum, world, rank, total_steps=steps, max_epochs=1, seed=seed)
            for a in range(accum):
                x, y = batches.get(step, a)
                assert torch.equal(x[:, 1:], y[:, :-1])
                rows += [tuple(r) for r in torch.cat([x, y[:, -1:]], 1).tolist()]
        per_step.append(sorted(rows))
    return per_step


@pytest.mark.parametrize("seed", [None, 7])
def test_ranks_micro_batches_and_accumulation_read_the_same_sequences(seed):
    tokens = np.arange(2000, dtype=np.uint16)
    reference = sequences_read(tokens, micro=4, accum=1, world=1, seed=seed)
    assert sequences_read(tokens, micro=2, accum=2, world=1, seed=seed) == reference
    assert sequences_read(tokens, micro=2, accum=1, world=2, seed=seed) == reference
    assert sequences_read(tokens, micro=1, accum=2, world=2, seed=seed) == reference
    in_order = sequences_read(tokens, micro=4, accum=1, world=1)
    assert in_order[0][0][0] == 0 and in_order[1][0][0] == 32  # sequence j starts at token j·T, in order
    if seed is not None:
        assert reference != in_order


def test_trial_needing_more_than_the_data_fails_naming_the_numbers():
    tokens = np.arange(1000, dtype=np.uint16)
    with pytest.raises(ValueError, match=r"needs 200 sequences .* holds 124 .* 1.61 epochs"):
        TrainBatches(tokens, 8, 4, 1, 1, 0, total_steps=50, max_epochs=1.0)
    assert TrainBatches(tokens, 8, 4, 1, 1, 0, total_steps=50, max_epochs=2.0).epochs == pytest.approx(200 / 124)


def test_test_window_is_fixed_and_must_fit():
    tokens = np.arange(1000, dtype=np.uint16)
    cfg = DataConfig(test_offset=100, test_tokens=64, eval_batch_size=2)
    batches = list(held_out_batches(tokens, cfg, context=16))
    assert len(batches) == 2 and batches[0][0][0, 0] == 100 and batches[-1][1][-1, -1] == 164
    with pytest.raises(ValueError, match="does not fit"):
        list(held_out_batches(tokens, DataConfig(test_offset=990, test_tokens=32, eval_batch_size=2), context=16))


def test_manifest_records_the_cache():
    cfg = DataConfig()
    manifest = Manifest.load(prepare_bundled(PROJECT_ROOT / ".cache" / "data", cfg.holdout_fraction))
    assert manifest.complete and manifest.splits["train"].documents > manifest.splits["test"].documents > 0


def test_a_damaged_bundled_cache_is_built_again(tmp_path, caplog):
    directory = prepare_bundled(tmp_path, 0.05)
    built = {path.name: path.read_bytes() for path in directory.iterdir()}

    def flip_a_byte_and_lose_the_test_shard():
        with open(directory / "train_000000.bin", "r+b") as shard:
            shard.write(bytes([shard.read(1)[0] ^ 1]))
        (directory / "test_000000.bin").unlink()

    def break_the_manifest():
        (directory / "manifest.json").write_text('{"dataset": "bundled",')

    for damage, seen in (
        (flip_a_byte_and_lose_the_test_shard, "does not match its manifest checksum"),
        (break_the_manifest, "is not a valid manifest"),
    ):
        damage()
        caplog.clear()
        assert prepare_bundled(tmp_path, 0.05) == directory
        assert "the bundled token cache is damaged" in caplog.text and seen in caplog.text
        assert {path.name: path.read_bytes() for path in directory.iterdir()} == built
    assert [path.name for path in tmp_path.iterdir()] == [directory.name]  # nothing left aside
