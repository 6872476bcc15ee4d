"""FineWeb preparation: parquet files of `sample/10BT` -> GPT-2 token shards (see `harness.data.shards`).

As the study's own prepare_datasets.py did it: documents in sorted file and row order, split as `datasets`'
`train[:99%]` / `train[99%:]` (the last 1% held out as `test`), each encoded with `encode_batch(texts,
allowed_special={"<|endoftext|>"})` and followed by end-of-text, tokenized in worker processes and written in
document order. A killed preparation resumes after its last completed shard and ends byte-identical to an
uninterrupted one. `dataset=fineweb_gpt2_tokens` is converted by `harness.data.tokens` instead."""

import itertools
import multiprocessing
import os
import signal
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from multiprocessing.pool import Pool
from pathlib import Path

import numpy as np
import pyarrow
import pyarrow.parquet as pq
from tqdm import tqdm

from harness.data.common import (
    HOLDOUT_FRACTION,
    TOKEN_BYTES,
    PrepareError,
    damaged_shards,
    describe,
    gigabytes,
    import_huggingface_hub,
    is_downloaded,
    load_matching_manifest,
    log,
    remove_unfinished_shards,
    require_disk_space,
    written_bytes,
)
from harness.data.shards import (
    SPLITS,
    TOKEN_DTYPE,
    Manifest,
    ShardWriter,
    sha256_file,
)
from harness.data.tokenizer import END_OF_TEXT, gpt2_encoding
from harness.paths import PROJECT_ROOT

PARQUET_DATASETS = {"fineweb": "HuggingFaceFW/fineweb", "fineweb_edu": "HuggingFaceFW/fineweb-edu"}
TOKEN_DATASETS = ("fineweb_gpt2_tokens",)  # already tokenized: harness.data.tokens
EVALUATION_DATASETS = ("hellaswag",)  # a benchmark's examples, not tokens: harness.data.hellaswag
DATASETS = (*PARQUET_DATASETS, *TOKEN_DATASETS, *EVALUATION_DATASETS)
SAMPLE = "sample/10BT"
TRAIN_PERCENT = 99  # the reference's split: train[:99%], validation (our test) train[99%:]
# Recorded in the manifest: a preparation made another way (as before these were recorded) is not resumed.
ENCODING = "encode_batch(allowed_special={'<|endoftext|>'})"
SPLIT_RULE = "datasets train[:99%] / train[99%:], closest rounding"
DEFAULT_SHARD_TOKENS = 100_000_000
DOCUMENTS_PER_TASK = 1024

# Conservative disk estimates. GPT-2 averages about 4.5 bytes of English text per token and a token is
# stored in 2 bytes, so the shards take at most half the text's bytes (plus 2 bytes of end-of-text per
# document). Before downloading only the parquet sizes are known: FineWeb's 15T tokens fill 44 TB of
# parquet, about 0.7 shard bytes per parquet byte, so reserving one shard byte per parquet byte is safe.
SHARD_BYTES_PER_TEXT_BYTE = 0.5
SHARD_BYTES_PER_PARQUET_BYTE = 1.0

TokenizedChunk = tuple[np.ndarray, np.ndarray]


def prepare(
    dataset: str,
    *,
    out: Path | str | None = None,
    workers: int | None = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    max_files: int | None = None,
    parquet_dir: Path | str | None = None,
    safetensors_dir: Path | str | None = None,
    url: str | None = None,
) -> Path:
    """Prepares (or finishes preparing) `dataset` into `out` and returns `out`.

    Downloads the parquet files unless `parquet_dir` already holds them; `max_files` keeps the first N.
    `fineweb_gpt2_tokens` downloads its two token files unless `safetensors_dir` holds them.
    `hellaswag` downloads its validation split from `url` (default: the original repository's file).
    """
    if dataset in EVALUATION_DATASETS:
        from harness.data.hellaswag import URL, prepare_hellaswag

        given = {"workers": workers, "max_files": max_files, "parquet_dir": parquet_dir}
        shards = {"shard_tokens": None if shard_tokens == DEFAULT_SHARD_TOKENS else shard_tokens}
        not_applicable(dataset, **given, **shards, safetensors_dir=safetensors_dir)
        return prepare_hellaswag(out, url or URL)
    not_applicable(dataset, url=url)
    if dataset in TOKEN_DATASETS:
        from harness.data.tokens import prepare_tokens

        require_positive(shard_tokens=shard_tokens)
        not_applicable(dataset, workers=workers, max_files=max_files, parquet_dir=parquet_dir)
        return prepare_tokens(dataset, out, shard_tokens, safetensors_dir)
    not_applicable(dataset, safetensors_dir=safetensors_dir)
    repo = dataset_repo(dataset)
    out = Path(out) if out is not None else PROJECT_ROOT / "data" / dataset
    workers = workers if workers is not None else default_workers()
    require_positive(workers=workers, shard_tokens=shard_tokens, max_files=max_files)
    settings = {
        "repo": repo,
        "sample": SAMPLE,
        "max_files": max_files,
        "shard_tokens": shard_tokens,
        "encoding": ENCODING,
        "split": SPLIT_RULE,
    }

    manifest = load_matching_manifest(out, dataset, settings)
    damaged = damaged_shards(out, manifest)
    if manifest is not None and manifest.complete and not damaged:
        log(f"{out} is already prepared ({describe(manifest)}); nothing to do")
        return out
    written = written_bytes(manifest)
    if parquet_dir is None:
        parquet_dir = downloaded_parquet(out, manifest) or download(repo, out / "parquet", max_files, out, written)
    files = parquet_files(Path(parquet_dir), max_files)
    documents, text_bytes = measure(files)
    source = {**settings, "files": [path.name for path in files], "documents": documents}
    if manifest is None:
        manifest = Manifest(dataset, source, HOLDOUT_FRACTION)
    elif without_parquet_dir(manifest.source) != source:
        raise PrepareError(f"the parquet files differ from those {out} was started with; delete {out} to start over")
    # Where the files are, so that the repair command a damaged shard prints is complete (not compared on resume).
    downloaded = Path(parquet_dir) == out / "parquet" / SAMPLE
    manifest.source["parquet_dir"] = None if downloaded else str(Path(parquet_dir).resolve())
    test_start = reference_test_start(documents)
    shard_bytes = SHARD_BYTES_PER_TEXT_BYTE * text_bytes + TOKEN_BYTES * documents
    require_disk_space(out, shard_bytes - written, "the token shards")

    out.mkdir(parents=True, exist_ok=True)
    remove_unfinished_shards(out, manifest)
    recreate_shards(out, manifest, damaged, files, test_start, workers)
    if not manifest.complete:
        write_shards(out, manifest, files, test_start, workers)
        manifest.complete = True
    manifest.save(out)
    log(f"prepared {out}: {describe(manifest)}")
    return out


def dataset_repo(dataset: str) -> str:
    if dataset not in PARQUET_DATASETS:
        raise PrepareError(f"unknown dataset {dataset!r}; known datasets: {', '.join(DATASETS)}")
    return PARQUET_DATASETS[dataset]


def not_applicable(dataset: str, **options) -> None:
    given = [name for name, value in options.items() if value is not None]
    if given:
        raise PrepareError(f"{', '.join(given)} do{'es' if len(given) == 1 else ''} not apply to dataset={dataset}")


def reference_test_start(documents: int) -> int:
    """Index of the first held-out document, as `datasets` computes `train[:99%]` (its default "closest"
    rounding: `int(round(99 * n / 100.0))`, Python's round-half-to-even) for the reference's split."""
    start = int(round(TRAIN_PERCENT * documents / 100.0))
    if not 0 < start < documents:
        raise PrepareError(
            f"{documents} documents are too few to hold out {HOLDOUT_FRACTION:.0%} for testing "
            f"(the split would leave {documents - start} test documents)"
        )
    return start


def default_workers() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores - 1)  # the main process reads parquet and writes shards meanwhile


def require_positive(**values: int | None) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise PrepareError(f"{name} must be at least 1, got {value}")


def download(repo: str, local_dir: Path, max_files: int | None, out: Path, written: int) -> Path:
    """Downloads the first `max_files` parquet files of `repo`'s sample into `local_dir`; returns their folder."""
    hub = import_huggingface_hub()
    tree = hub.HfApi().list_repo_tree(repo, path_in_repo=SAMPLE, repo_type="dataset")
    remote_files = sorted((entry for entry in tree if entry.path.endswith(".parquet")), key=lambda e: e.path)
    remote_files = remote_files[:max_files]
    if not remote_files:
        raise PrepareError(f"{repo} has no parquet files under {SAMPLE}")
    missing = [entry for entry in remote_files if not is_downloaded(local_dir / entry.path, entry.size)]
    download_bytes = sum(entry.size for entry in missing)
    shard_bytes = SHARD_BYTES_PER_PARQUET_BYTE * sum(entry.size for entry in remote_files) - written
    require_disk_space(out, download_bytes + shard_bytes, "the download and the token shards")
    log(f"downloading {len(missing)} of {len(remote_files)} files ({gigabytes(download_bytes)}) of {repo}/{SAMPLE}")
    hub.snapshot_download(
        repo_id=repo,
        repo_type="dataset",
        allow_patterns=[entry.path for entry in remote_files],
        local_dir=local_dir,
    )
    return local_dir / SAMPLE


def parquet_files(parquet_dir: Path, max_files: int | None) -> list[Path]:
    if not parquet_dir.is_dir():
        raise PrepareError(f"parquet_dir {parquet_dir} is not a directory")
    files = sorted(parquet_dir.glob("*.parquet"))
    if not files:
        raise PrepareError(f"parquet_dir {parquet_dir} holds no *.parquet files")
    return files[:max_files]


def measure(files: list[Path]) -> tuple[int, int]:
    """Documents and uncompressed `text` bytes of the files, from their parquet metadata alone."""
    documents = text_bytes = 0
    for path in files:
        metadata = open_parquet(path).metadata
        documents += metadata.num_rows
        for group in range(metadata.num_row_groups):
            row_group = metadata.row_group(group)
            columns = (row_group.column(c) for c in range(row_group.num_columns))
            text_bytes += sum(c.total_uncompressed_size for c in columns if c.path_in_schema == "text")
    return documents, text_bytes


def open_parquet(path: Path) -> pq.ParquetFile:
    try:
        parquet = pq.ParquetFile(path)
    except pyarrow.ArrowException as error:
        raise PrepareError(f"{path} is not a readable parquet file: {error}") from None
    if "text" not in parquet.schema_arrow.names:
        raise PrepareError(f"{path} has no `text` column (its columns: {', '.join(parquet.schema_arrow.names)})")
    return parquet


def without_parquet_dir(source: dict) -> dict:
    return {key: value for key, value in source.items() if key != "parquet_dir"}


def downloaded_parquet(out: Path, manifest: Manifest | None) -> Path | None:
    """The earlier download's folder when it still holds every file the preparation read (no network needed)."""
    folder = out / "parquet" / SAMPLE
    names = manifest.source.get("files") if manifest is not None else None
    return folder if names and all((folder / name).is_file() for name in names) else None


def recreate_shards(
    out: Path, manifest: Manifest, damaged: list[tuple[str, int]], files: list[Path], test_start: int, workers: int
) -> None:
    """Tokenizes the documents of each damaged shard again; the new file must have the recorded checksum."""
    if not damaged:
        return
    with tokenizer_pool(workers) as pool:
        for name, index in damaged:
            shard = manifest.splits[name].shards[index]
            before = sum(s.documents for s in manifest.splits[name].shards[:index])
            first = (test_start if name == "test" else 0) + before
            chunks = first_documents(read_texts(files, skip=first, batch_size=DOCUMENTS_PER_TASK), shard.documents)
            tmp = out / (shard.file + ".tmp")
            with open(tmp, "wb") as f:
                for tokens, lengths in tokenize_in_order(chunks, pool, max_in_flight=2 * workers):
                    for document in np.split(tokens, np.cumsum(lengths)[:-1]):
                        np.append(document, END_OF_TEXT).astype(TOKEN_DTYPE).tofile(f)
            if sha256_file(tmp) != shard.sha256:
                tmp.unlink()
                raise PrepareError(
                    f"re-created {out / shard.file} does not match its recorded checksum: the parquet "
                    f"files are not those it was prepared from; delete {out} to start over"
                )
            os.replace(tmp, out / shard.file)
            log(f"re-created {out / shard.file} ({shard.documents:,} documents, checksum as recorded)")


def first_documents(chunks: Iterable[pyarrow.Array], count: int) -> Iterator[pyarrow.Array]:
    for chunk in chunks:
        if count <= 0:
            return
        yield chunk.slice(0, count)
        count -= len(chunk)


def tokenizer_pool(workers: int) -> Pool:
    # spawn, not fork: the main process has pyarrow and tqdm threads running, which fork does not copy safely.
    # Workers ignore Ctrl-C; the main process gets it and terminates them.
    return multiprocessing.get_context("spawn").Pool(
        workers, initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN)
    )


def write_shards(out: Path, manifest: Manifest, files: list[Path], test_start: int, workers: int) -> None:
    """Tokenizes every document not yet in a completed shard and appends it to its split's shards."""
    already_documents = sum(split.documents for split in manifest.splits.values())
    already_tokens = sum(split.tokens for split in manifest.splits.values())
    writers = {split: ShardWriter(out, manifest, split, manifest.source["shard_tokens"]) for split in SPLITS}
    document_index = already_documents
    documents_bar = tqdm(
        desc="documents",
        total=manifest.source["documents"],
        initial=already_documents,
        unit="doc",
        unit_scale=True,
        file=sys.stderr,
    )
    tokens_bar = tqdm(desc="tokens", initial=already_tokens, unit="tok", unit_scale=True, file=sys.stderr)
    with documents_bar, tokens_bar, tokenizer_pool(workers) as pool:
        chunks = read_texts(files, skip=already_documents, batch_size=DOCUMENTS_PER_TASK)
        for tokens, lengths in tokenize_in_order(chunks, pool, max_in_flight=2 * workers):
            for document in np.split(tokens, np.cumsum(lengths)[:-1]):
                if document_index == test_start:
                    writers["train"].close()
                writers["train" if document_index < test_start else "test"].add(document)
                document_index += 1
            documents_bar.update(len(lengths))
            tokens_bar.update(int(lengths.sum()) + len(lengths))
    writers["test"].close()


def read_texts(files: list[Path], skip: int, batch_size: int) -> Iterator[pyarrow.Array]:
    """The `text` column in batches of at most `batch_size` documents, after the first `skip` documents."""
    for path in files:
        parquet = open_parquet(path)
        group_rows = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
        first_group = 0
        while first_group < len(group_rows) and skip >= group_rows[first_group]:
            skip -= group_rows[first_group]
            first_group += 1
        row_groups = range(first_group, len(group_rows))
        for batch in parquet.iter_batches(batch_size=batch_size, row_groups=row_groups, columns=["text"]):
            if skip >= batch.num_rows:
                skip -= batch.num_rows
                continue
            yield batch.column(0).slice(skip)
            skip = 0


def tokenize_in_order(chunks: Iterable[pyarrow.Array], pool: Pool, max_in_flight: int) -> Iterator[TokenizedChunk]:
    """`tokenize` over the pool, in input order.

    Unlike `Pool.imap`, which reads its whole input ahead (the entire dataset, when the writer is slower),
    this keeps at most `max_in_flight` chunks in memory.
    """
    pending = deque()
    for chunk in chunks:
        pending.append(pool.apply_async(tokenize, (chunk,)))
        if len(pending) >= max_in_flight:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def tokenize(texts: pyarrow.Array) -> TokenizedChunk:
    """GPT-2 tokens of the texts, packed as (all tokens, tokens per text) to pass cheaply between processes.

    The texts arrive as an Arrow array and become Python strings here, not in the busier main process.
    """
    documents = gpt2_encoding().encode_batch(texts.to_pylist(), num_threads=1, allowed_special={"<|endoftext|>"})
    lengths = np.fromiter(map(len, documents), dtype=np.int64, count=len(documents))
    tokens = np.fromiter(itertools.chain.from_iterable(documents), dtype=TOKEN_DTYPE, count=int(lengths.sum()))
    return tokens, lengths
