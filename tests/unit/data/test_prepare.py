"""FineWeb preparation end to end on small local parquet files (no network): parquet -> 2 tokenizer
processes -> shards + manifest, through the command line and the Python function, including resuming."""

import itertools
import logging
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from harness.data.__main__ import main
from harness.data.loader import DataConfig, open_dataset
from harness.data.prepare import ENCODING, SPLIT_RULE, PrepareError, prepare, read_texts, reference_test_start
from harness.data.shards import MANIFEST, Manifest, open_split, sha256_file
from harness.data.tokenizer import END_OF_TEXT, gpt2_encoding
from harness.paths import PROJECT_ROOT
from harness.trial.trainer import Trial
from tests.conftest import TINY, compose_config, flip_a_byte, run_in_process

FILE_DOCUMENTS = (150, 130, 120)  # 400 documents: the last 4 are held out
TEST_DOCUMENTS = 4
SHARD_TOKENS = 3000
ROW_GROUP_SIZE = 50

SENTENCES = [
    "The city council approved the new budget after a long debate on Tuesday evening.",
    "Researchers found that the bees returned to the hive earlier when the weather turned cold.",
    "To bake the bread, mix the flour with warm water and let the dough rest for an hour.",
    "Our store will be closed on Monday for inventory; we apologize for any inconvenience.",
    "He had never seen the ocean before, and the sound of the waves kept him awake all night.",
    "Click the settings icon, choose Privacy, and turn off location sharing.",
    "The 2019 report estimated that 3.5 million households lacked reliable internet access.",
    "In 1887, the railway reached the valley and the town doubled in size within a decade.",
    "Students should submit their essays by Friday at 5 p.m. through the online portal.",
    "If the engine light comes on, check the oil level before driving any further.",
    'She said, "We don\'t know yet," and walked back into the lab.',
    "Prices start at $19.99 (shipping not included) — see our FAQ for details.",
]
SPECIAL_DOCUMENTS = {
    5: "",
    17: "Café naïve résumé — 東京 🚀\n\n\tan indented line",
    42: "A page that mentions <|endoftext|> literally is still ordinary text.",
    398: "   \n",
}


def make_documents() -> list[str]:
    rng = random.Random(0)
    documents = []
    for _ in range(sum(FILE_DOCUMENTS)):
        paragraphs = [" ".join(rng.choices(SENTENCES, k=rng.randint(1, 5))) for _ in range(rng.randint(1, 3))]
        documents.append("\n\n".join(paragraphs))
    for index, text in SPECIAL_DOCUMENTS.items():
        documents[index] = text
    return documents


def write_parquet_files(
    directory: Path, documents: list[str], column: str = "text", counts: tuple[int, ...] = FILE_DOCUMENTS
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    start = 0
    for number, count in enumerate(counts):
        texts = documents[start : start + count]
        table = pa.table({"id": [f"doc-{start + i}" for i in range(count)], column: texts})
        pq.write_table(table, directory / f"{number:03d}_00000.parquet", row_group_size=ROW_GROUP_SIZE)
        start += count


def cli_arguments(parquet_dir: Path, out: Path) -> list[str]:
    return ["dataset=fineweb", f"parquet_dir={parquet_dir}", f"out={out}", "workers=2", f"shard_tokens={SHARD_TOKENS}"]


def run_cli(*arguments: str, **popen_options) -> subprocess.CompletedProcess:
    return run_python("-m", "harness.data", "prepare", *arguments, **popen_options)


def run_python(*arguments: str, **popen_options) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, *arguments],
        check=False,
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        **popen_options,
    )


def output_files(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir()) if path.is_file()}


def disk_with_free_bytes(free: int):
    return lambda path: types.SimpleNamespace(total=10**12, used=10**12 - free, free=free)


@pytest.fixture(scope="module")
def documents() -> list[str]:
    return make_documents()


@pytest.fixture(scope="module")
def parquet_dir(tmp_path_factory, documents) -> Path:
    directory = tmp_path_factory.mktemp("parquet")
    write_parquet_files(directory, documents)
    return directory


@pytest.fixture(scope="module")
def reference(tmp_path_factory, parquet_dir) -> Path:
    """An uninterrupted preparation through the command line."""
    out = tmp_path_factory.mktemp("reference")
    result = run_cli(*cli_arguments(parquet_dir, out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    assert "documents" in result.stderr and "tokens" in result.stderr  # the progress bars
    return out


def test_cli_writes_train_and_held_out_test_shards(reference, parquet_dir):
    manifest = Manifest.load(reference)
    assert manifest.complete and manifest.dataset == "fineweb"
    assert manifest.source["files"] == sorted(path.name for path in parquet_dir.glob("*.parquet"))
    assert manifest.source["documents"] == sum(FILE_DOCUMENTS)
    assert manifest.splits["train"].documents == sum(FILE_DOCUMENTS) - TEST_DOCUMENTS
    assert manifest.splits["test"].documents == TEST_DOCUMENTS
    assert len(manifest.splits["train"].shards) > 2
    for split in manifest.splits.values():
        assert sum(shard.documents for shard in split.shards) == split.documents
        assert sum(shard.tokens for shard in split.shards) == split.tokens
        for shard in split.shards:
            path = reference / shard.file
            assert sha256_file(path) == shard.sha256
            assert path.stat().st_size == 2 * shard.tokens
    assert sorted(path.name for path in reference.iterdir()) == sorted(
        [MANIFEST] + [shard.file for split in manifest.splits.values() for shard in split.shards]
    )


def reference_tokens(texts: list[str]) -> np.ndarray:
    """prepare_datasets.py's stream: `encode_batch(texts, allowed_special={'<|endoftext|>'})`, each followed by
    end-of-text."""
    encoded = gpt2_encoding().encode_batch(texts, allowed_special={"<|endoftext|>"})
    return np.array([token for document in encoded for token in [*document, END_OF_TEXT]], dtype=np.uint16)


def test_every_document_is_encoded_as_the_reference_and_ends_with_end_of_text(reference, documents):
    test_start = len(documents) - TEST_DOCUMENTS
    for split, texts in (("train", documents[:test_start]), ("test", documents[test_start:])):
        tokens = np.asarray(open_split(reference, split)[:])
        np.testing.assert_array_equal(tokens, reference_tokens(texts))
        assert gpt2_encoding().decode(tokens.tolist()) == "".join(text + "<|endoftext|>" for text in texts)
    for shard in Manifest.load(reference).splits["train"].shards:
        assert np.fromfile(reference / shard.file, dtype=np.uint16)[-1] == END_OF_TEXT


def test_a_literal_end_of_text_in_a_document_is_token_50256_as_the_reference_encodes_it(reference, documents):
    """ "A page that mentions <|endoftext|> literally…" (document 42): the reference's encode call allows the
    special token, so the text becomes 50256 inside the document, not the tokens of "<|", "endoftext", "|>"."""
    encoding = gpt2_encoding()
    ordinary = encoding.encode_ordinary(documents[42])
    assert END_OF_TEXT not in ordinary
    tokens = np.asarray(open_split(reference, "train")[:])
    start = len(reference_tokens(documents[:42]))
    document = tokens[start : start + len(reference_tokens(documents[42:43]))].tolist()
    before, after = documents[42].split("<|endoftext|>")
    assert document == [*encoding.encode_ordinary(before), END_OF_TEXT, *encoding.encode_ordinary(after), END_OF_TEXT]
    assert document.count(END_OF_TEXT) == 2 and document != ordinary + [END_OF_TEXT]


# `datasets`' percent slices (arrow_reader._pct_to_abs_closest): boundary = int(round(99 * n / 100.0)), Python's
# round-half-to-even; train[:99%] is documents [0, boundary), train[99%:] (the reference's validation) the rest.
DATASETS_SPLIT = {101: 100, 150: 148, 199: 197, 250: 248, 350: 346, 400: 396, 1_050: 1_040, 14_868_862: 14_720_173}


@pytest.mark.parametrize("documents, boundary", sorted(DATASETS_SPLIT.items()))
def test_split_boundary_rounds_as_datasets_train_99_percent(documents, boundary):
    assert reference_test_start(documents) == boundary


def test_too_few_documents_for_a_held_out_document_are_refused():
    for documents in (1, 50):  # round(49.5) = 50: datasets would leave the validation split empty
        with pytest.raises(PrepareError, match="too few to hold out"):
            reference_test_start(documents)


def test_crafted_document_counts_split_where_the_reference_splits_them(tmp_path):
    """250 documents: datasets' train[:99%] ends at round(247.5) = 248, so 2 are held out, not ceil(2.5) = 3."""
    texts = [f"Document number {i} says hello." for i in range(250)]
    write_parquet_files(tmp_path / "parquet", texts, counts=(130, 120))
    out = prepare(
        "fineweb", out=tmp_path / "out", workers=1, shard_tokens=SHARD_TOKENS, parquet_dir=tmp_path / "parquet"
    )
    manifest = Manifest.load(out)
    assert (manifest.splits["train"].documents, manifest.splits["test"].documents) == (248, 2)
    np.testing.assert_array_equal(open_split(out, "test")[:], reference_tokens(texts[248:]))
    assert manifest.source["encoding"] == ENCODING and manifest.source["split"] == SPLIT_RULE


def test_a_preparation_made_the_old_way_is_not_resumed_and_a_trial_on_it_is_warned(
    reference, parquet_dir, tmp_path, caplog
):
    out = shutil.copytree(reference, tmp_path / "out")
    manifest = Manifest.load(out)
    for key in ("encoding", "split"):
        del manifest.source[key]
    for complete in (False, True):
        manifest.complete = complete
        manifest.save(out)
        with pytest.raises(PrepareError, match="prepared by an earlier harness.*Delete .* and prepare again"):
            prepare("fineweb", out=out, workers=1, shard_tokens=SHARD_TOKENS, parquet_dir=parquet_dir)
    with caplog.at_level(logging.WARNING):
        open_dataset(DataConfig(dataset="fineweb", path=str(out)), "train")
    assert "prepared by an earlier harness" in caplog.text and "differ from the study's" in caplog.text


def test_python_function_writes_the_same_bytes_as_the_cli(reference, parquet_dir, tmp_path):
    out = prepare("fineweb", out=tmp_path / "out", workers=2, shard_tokens=SHARD_TOKENS, parquet_dir=parquet_dir)
    assert output_files(out) == output_files(reference)


def test_reading_resumes_at_any_document(documents, parquet_dir):
    files = sorted(parquet_dir.glob("*.parquet"))
    for skip in [0, 1, ROW_GROUP_SIZE, FILE_DOCUMENTS[0] + 7, len(documents) - 1, len(documents)]:
        chunks = list(read_texts(files, skip=skip, batch_size=32))
        assert all(len(chunk) <= 32 for chunk in chunks)
        assert [text for chunk in chunks for text in chunk.to_pylist()] == documents[skip:]


class SimulatedCrash(Exception):
    pass


def crash_at_manifest_save(monkeypatch, save_number: int) -> None:
    saves = itertools.count(1)
    save = Manifest.save

    def save_or_crash(self, directory):
        if next(saves) == save_number:  # the shard is renamed into place but not yet in the manifest
            raise SimulatedCrash
        save(self, directory)

    monkeypatch.setattr(Manifest, "save", save_or_crash)


@pytest.mark.parametrize("crash_at", ["first shard", "completion"])
def test_resume_after_crash_is_byte_identical(crash_at, reference, parquet_dir, tmp_path, monkeypatch):
    train_shards = len(Manifest.load(reference).splits["train"].shards)
    out = tmp_path / "out"
    # one worker, and still the reference's bytes: the worker count must not change the output
    options = {"out": out, "workers": 1, "shard_tokens": SHARD_TOKENS, "parquet_dir": parquet_dir}
    with monkeypatch.context() as crashing:
        crash_at_manifest_save(crashing, {"first shard": 1, "completion": train_shards + 2}[crash_at])
        with pytest.raises(SimulatedCrash):
            prepare("fineweb", **options)
    assert not (out / MANIFEST).exists() or not Manifest.load(out).complete
    (out / "train_000001.bin.tmp").write_bytes(b"half a shard")

    prepare("fineweb", **options)
    assert output_files(out) == output_files(reference)


def test_complete_preparation_is_a_no_op(reference, parquet_dir, tmp_path, capsys):
    out = shutil.copytree(reference, tmp_path / "out")
    before = {path.name: path.stat().st_mtime_ns for path in out.iterdir()}
    prepare("fineweb", out=out, workers=2, shard_tokens=SHARD_TOKENS, parquet_dir=parquet_dir)
    assert "already prepared" in capsys.readouterr().err
    assert {path.name: path.stat().st_mtime_ns for path in out.iterdir()} == before


def test_refuses_to_continue_with_other_settings(reference, parquet_dir, tmp_path):
    out = shutil.copytree(reference, tmp_path / "out")
    with pytest.raises(PrepareError, match="holds a preparation of fineweb"):
        prepare("fineweb", out=out, shard_tokens=SHARD_TOKENS + 1, parquet_dir=parquet_dir)
    with pytest.raises(PrepareError, match="holds a preparation of fineweb"):
        prepare("fineweb_edu", out=out, shard_tokens=SHARD_TOKENS, parquet_dir=parquet_dir)


def test_continuing_re_creates_a_recorded_shard_that_was_damaged(reference, parquet_dir, tmp_path, capsys):
    out = shutil.copytree(reference, tmp_path / "out")
    manifest = Manifest.load(out)
    manifest.complete = False
    manifest.save(out)
    with open(out / "train_000001.bin", "r+b") as shard:
        shard.truncate(10)
    prepare("fineweb", out=out, workers=1, shard_tokens=SHARD_TOKENS, parquet_dir=parquet_dir)
    assert "train_000001.bin (29 documents, checksum as recorded)" in capsys.readouterr().err
    assert output_files(out) == output_files(reference)


def test_the_advice_for_a_damaged_or_missing_shard_is_the_command_that_repairs_it(reference, tmp_path):
    out = shutil.copytree(reference, tmp_path / "out")
    flip_a_byte(out / "train_000003.bin")  # same size, another checksum
    (out / "test_000000.bin").unlink()
    trial = [*TINY, "data.dataset=fineweb", f"data.path={out}"]

    refused = run_in_process(*trial, f"hydra.run.dir={tmp_path}/run", check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    [line] = refused.stderr.splitlines()
    assert f"shard {out}/train_000003.bin does not match its manifest checksum; re-create it with `" in line
    command = re.search(r"`(python -m harness\.data prepare [^`]*)`", line).group(1)
    assert (
        command == f"python -m harness.data prepare dataset=fineweb out={out} shard_tokens={SHARD_TOKENS} "
        f"parquet_dir={Manifest.load(reference).source['parquet_dir']}"
    )
    assert not (tmp_path / "run").exists()

    repaired = run_python(*shlex.split(command)[1:])  # as printed, with this interpreter
    assert repaired.returncode == 0, repaired.stderr
    assert output_files(out) == output_files(reference)  # both shards back, byte for byte
    repaired_trial = Trial(compose_config(*trial), tmp_path / "run")  # reads and verifies every shard
    losses = [repaired_trial.train_step(step)[0].item() for step in range(2)]
    assert all(5 < loss < 12 for loss in losses + [repaired_trial.test_losses()["test_loss"]])


def test_refuses_before_writing_when_the_disk_is_too_small(reference, parquet_dir, tmp_path, monkeypatch):
    written = sum(path.stat().st_size for path in reference.glob("*.bin"))
    monkeypatch.setattr(shutil, "disk_usage", disk_with_free_bytes(written))  # the estimate errs on the large side
    out = tmp_path / "out"
    with pytest.raises(PrepareError, match=r"not enough disk space .* need about \d+\.\d\d GB but only \d+\.\d\d GB"):
        prepare("fineweb", out=out, shard_tokens=SHARD_TOKENS, parquet_dir=parquet_dir)
    assert not out.exists()


def test_missing_huggingface_hub_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes `import huggingface_hub` fail
    with pytest.raises(PrepareError, match=r"pip install -e \.\[data\]"):
        prepare("fineweb", out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def fake_huggingface_hub(parquet_dir: Path, calls: list) -> types.SimpleNamespace:
    """Serves the local parquet files as if they were `sample/10BT` of the Hub repository."""

    class HfApi:
        def list_repo_tree(self, repo_id, path_in_repo=None, *, repo_type=None):
            calls.append(("list_repo_tree", repo_id, path_in_repo, repo_type))
            folder = [types.SimpleNamespace(path="sample/10BT/extra")]  # folders have no size
            files = [
                types.SimpleNamespace(path=f"sample/10BT/{p.name}", size=p.stat().st_size)
                for p in parquet_dir.iterdir()
            ]
            return folder + files

    def snapshot_download(*, repo_id, repo_type, allow_patterns, local_dir):
        calls.append(("snapshot_download", repo_id, repo_type, allow_patterns))
        for pattern in allow_patterns:
            target = Path(local_dir) / pattern
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(parquet_dir / Path(pattern).name, target)
        return str(local_dir)

    return types.SimpleNamespace(HfApi=HfApi, snapshot_download=snapshot_download)


def test_downloads_the_first_files_with_huggingface_hub(parquet_dir, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "huggingface_hub", fake_huggingface_hub(parquet_dir, calls))
    out = prepare("fineweb_edu", out=tmp_path / "out", workers=2, shard_tokens=SHARD_TOKENS, max_files=2)

    first_two = ["sample/10BT/000_00000.parquet", "sample/10BT/001_00000.parquet"]
    assert calls == [
        ("list_repo_tree", "HuggingFaceFW/fineweb-edu", "sample/10BT", "dataset"),
        ("snapshot_download", "HuggingFaceFW/fineweb-edu", "dataset", first_two),
    ]
    manifest = Manifest.load(out)
    assert manifest.complete and manifest.source["documents"] == sum(FILE_DOCUMENTS[:2])
    assert sorted(path.name for path in (out / "parquet/sample/10BT").iterdir()) == [Path(p).name for p in first_two]

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # finished: no Hub needed to say so
    prepare("fineweb_edu", out=out, shard_tokens=SHARD_TOKENS, max_files=2)


def test_refuses_to_download_without_room_for_the_files_and_shards(parquet_dir, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "huggingface_hub", fake_huggingface_hub(parquet_dir, calls))
    parquet_bytes = sum(path.stat().st_size for path in parquet_dir.iterdir())
    monkeypatch.setattr(shutil, "disk_usage", disk_with_free_bytes(parquet_bytes))
    with pytest.raises(PrepareError, match="the download and the token shards need about"):
        prepare("fineweb", out=tmp_path / "out")
    assert [call[0] for call in calls] == ["list_repo_tree"]
    assert not (tmp_path / "out").exists()


def test_clear_errors_for_bad_input(documents, tmp_path, capsys):
    with pytest.raises(
        PrepareError, match="unknown dataset 'c4'; known datasets: fineweb, fineweb_edu, fineweb_gpt2_tokens"
    ):
        prepare("c4", parquet_dir=tmp_path)
    with pytest.raises(PrepareError, match="holds no \\*.parquet files"):
        prepare("fineweb", out=tmp_path / "out", parquet_dir=tmp_path)
    write_parquet_files(tmp_path / "content", documents, column="content")
    with pytest.raises(PrepareError, match="has no `text` column"):
        prepare("fineweb", out=tmp_path / "out", parquet_dir=tmp_path / "content")
    assert not (tmp_path / "out").exists()

    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / MANIFEST).write_text("{not json")
    with pytest.raises(
        PrepareError, match=f"{tmp_path}/damaged/manifest.json is not a valid manifest .*; move it away"
    ):
        prepare("fineweb", out=tmp_path / "damaged", parquet_dir=tmp_path)

    assert main(["prepare", "dataset=fineweb", "shard_tokens=many"]) == 2
    assert main(["prepare", "parquet_dir=x"]) == 2
    assert main(["prepare", "dataset=fineweb", "verbose"]) == 2
    errors = capsys.readouterr().err
    assert "shard_tokens must be an integer" in errors and "missing dataset=NAME" in errors
    assert "expected key=value" in errors
