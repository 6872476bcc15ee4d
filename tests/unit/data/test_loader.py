"""Training and test data from a prepared (FineWeb-format) directory, through the trial that reads it:
memory-mapped shards, sequences of context+1 tokens in order or shuffled by data.seed, refusals with the
numbers before any training, loud repeats with `epochs` logged, and shard checksums."""

import logging
import shutil

import mlflow
import numpy as np
import pytest

from harness.data.loader import DataConfig, open_dataset
from harness.data.shards import ChecksumError, ConcatenatedTokens, DataError, Manifest, ShardWriter
from harness.data.tokenizer import END_OF_TEXT
from harness.trial.trainer import Trial
from tests.conftest import TINY, compose_config, run_in_process

# Three training documents of 150, 200 and 160 tokens, one per shard: with their end-of-text tokens the split
# holds 513 tokens = exactly the 16 sequences of 32 + 1 tokens that TINY's 4 steps × 4 sequences read.
TRAIN_DOCUMENT_LENGTHS = (150, 200, 160)
TEST_DOCUMENT_LENGTH = 300  # the TINY test window needs 256 + 1 tokens
CONTEXT, SEQUENCES = 32, 16


def documents(lengths, first_id: int) -> list[np.ndarray]:
    starts = first_id + np.cumsum((0,) + lengths[:-1])
    return [np.arange(start, start + length) for start, length in zip(starts, lengths)]


def token_stream(docs: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.append(doc, END_OF_TEXT) for doc in docs])


TRAIN_DOCUMENTS = documents(TRAIN_DOCUMENT_LENGTHS, first_id=1)
TEST_DOCUMENTS = documents((TEST_DOCUMENT_LENGTH,), first_id=20_000)
TRAIN_TOKENS = token_stream(TRAIN_DOCUMENTS)


def write_prepared(directory, shard_tokens: int = 150):
    manifest = Manifest(
        dataset="fineweb", source={"synthetic": "tests/unit/data/test_loader.py"}, holdout_fraction=0.25
    )
    for split, docs in (("train", TRAIN_DOCUMENTS), ("test", TEST_DOCUMENTS)):
        writer = ShardWriter(directory, manifest, split, shard_tokens)
        for doc in docs:
            writer.add(doc)
        writer.close()
    manifest.complete = True
    manifest.save(directory)
    return directory


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return write_prepared(tmp_path_factory.mktemp("fineweb"))


def fineweb(path, *overrides: str):
    return compose_config(*TINY, "data.dataset=fineweb", f"data.path={path}", *overrides)


def sequences_per_step(trial: Trial) -> list[list[tuple]]:
    """Per optimizer step, the (context+1)-token sequences its micro-steps read, in reading order."""
    steps = []
    for step in range(trial.cfg.trainer.max_steps):
        rows = []
        for micro_step in range(trial.accum):
            inputs, targets = (tensor.numpy() for tensor in trial.batches.get(step, micro_step))
            assert inputs.shape == targets.shape == (trial.cfg.trainer.micro_batch_size, CONTEXT)
            assert np.array_equal(inputs[:, 1:], targets[:, :-1])
            rows += [tuple(row) for row in np.concatenate([inputs, targets[:, -1:]], axis=1).tolist()]
        steps.append(rows)
    return steps


def test_prepared_shards_are_memory_mapped_and_read_as_one_stream(prepared):
    train = open_dataset(DataConfig(dataset="fineweb", path=str(prepared)), "train")
    assert isinstance(train, ConcatenatedTokens) and len(train.arrays) == 3
    assert all(isinstance(shard, np.memmap) for shard in train.arrays)
    assert np.array_equal(train[0 : len(train)], TRAIN_TOKENS)
    assert np.array_equal(train[140:400], TRAIN_TOKENS[140:400])  # across both shard boundaries
    test = open_dataset(DataConfig(dataset="fineweb", path=str(prepared)), "test")
    assert isinstance(test, np.memmap) and np.array_equal(test, token_stream(TEST_DOCUMENTS))


def test_training_reads_sequences_of_context_plus_one_tokens_in_order(prepared):
    trial = Trial(fineweb(prepared), prepared / "unused")
    assert trial.batches.epochs == 1.0
    read = [row for step in sequences_per_step(trial) for row in step]
    expected = [tuple(TRAIN_TOKENS[j * CONTEXT : j * CONTEXT + CONTEXT + 1]) for j in range(SEQUENCES)]
    assert read == expected  # sequence j starts at token j·context; 4 and 10 cross into the next shard


def test_data_seed_shuffles_the_sequence_order_reproducibly(prepared):
    in_order = sequences_per_step(Trial(fineweb(prepared), prepared / "unused"))
    shuffled = sequences_per_step(Trial(fineweb(prepared, "data.seed=7"), prepared / "unused"))
    assert shuffled == sequences_per_step(Trial(fineweb(prepared, "data.seed=7"), prepared / "unused"))
    assert shuffled != sequences_per_step(Trial(fineweb(prepared, "data.seed=8"), prepared / "unused"))
    assert shuffled[0] != in_order[0]
    # one epoch: every sequence exactly once, only the order differs
    assert sorted(row for step in shuffled for row in step) == sorted(row for step in in_order for row in step)


def test_too_few_training_tokens_fail_before_training_naming_the_numbers(prepared, tmp_path):
    store = tmp_path / "mlflow.db"
    result = run_in_process(
        *TINY,
        "data.dataset=fineweb",
        f"data.path={prepared}",
        "trainer.max_steps=5",
        cwd=tmp_path,
        env_uri=f"sqlite:///{store}",
        check=False,
    )
    assert result.returncode != 0
    assert (
        "the trial needs 20 sequences of 33 tokens (640 tokens) but the training split holds 16 (513 tokens): "
        "1.25 epochs > data.max_epochs=1.0"
    ) in result.stderr
    assert not store.exists()  # refused before any run was recorded


def test_repeating_training_tokens_warns_loudly_and_logs_epochs(prepared, tmp_path, tracking_uri, caplog):
    cfg = fineweb(prepared, "trainer.max_steps=5", "trainer.checkpoint_interval=5", "data.max_epochs=2")
    with caplog.at_level(logging.WARNING, logger="harness.data.loader"):
        result = Trial(cfg, tmp_path / "run").run()
    assert "!" * 80 in caplog.text and "reads the training data 1.25 times" in caplog.text
    history = mlflow.MlflowClient(tracking_uri).get_metric_history(result["run_id"], "epochs")
    assert [(m.step, m.value) for m in history] == [(0, 1.25)]


def test_a_shard_that_does_not_match_its_checksum_fails_naming_it(prepared, tmp_path):
    damaged = shutil.copytree(prepared, tmp_path / "damaged")
    with open(damaged / "train_000001.bin", "r+b") as shard:
        shard.seek(10)
        shard.write(b"\x00\x00")
    with pytest.raises(
        ChecksumError,
        match=r"shard .*damaged/train_000001.bin does not match its manifest checksum; "
        r"re-create it with `python -m harness.data prepare dataset=fineweb out=",
    ):
        Trial(fineweb(damaged), tmp_path / "run")


def test_an_unfinished_preparation_is_refused(prepared, tmp_path):
    unfinished = shutil.copytree(prepared, tmp_path / "unfinished")
    manifest = Manifest.load(unfinished)
    manifest.complete = False
    manifest.save(unfinished)
    with pytest.raises(DataError, match="unfinished preparation; finish it with `python -m harness.data prepare"):
        open_dataset(DataConfig(dataset="fineweb", path=str(unfinished)), "train")
