"""The on-disk token format every data source is prepared into, and its reader.

A prepared dataset is a directory with `manifest.json` and raw little-endian uint16 shard files
(`<split>_<index:06d>.bin`, no header): GPT-2 token ids, each document followed by end-of-text.
Splits are `train` and `test` (the held-out documents). Shards are written to a temporary name and
renamed when complete, so a shard that exists is whole; the manifest is rewritten (atomically) after
every shard, so an interrupted preparation knows exactly what it has.
"""

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from harness.data.tokenizer import END_OF_TEXT

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKEN_DTYPE = np.uint16
SPLITS = ("train", "test")


@dataclass
class Shard:
    file: str
    documents: int
    tokens: int
    sha256: str


@dataclass
class Split:
    documents: int = 0
    tokens: int = 0
    shards: list[Shard] = field(default_factory=list)


@dataclass
class Manifest:
    dataset: str
    source: dict
    holdout_fraction: float
    tokenizer: str = "gpt2"
    eot: int = END_OF_TEXT
    dtype: str = "uint16"
    format: int = FORMAT_VERSION
    complete: bool = False
    splits: dict[str, Split] = field(default_factory=lambda: {s: Split() for s in SPLITS})

    @classmethod
    def load(cls, directory: Path) -> "Manifest":
        path = Path(directory) / MANIFEST
        try:
            raw = json.loads(path.read_text())
            splits = {
                name: Split(s["documents"], s["tokens"], [Shard(**sh) for sh in s["shards"]])
                for name, s in raw.pop("splits").items()
            }
            return cls(**raw, splits=splits)
        except (ValueError, KeyError, TypeError, AttributeError) as error:  # not JSON, or not a manifest
            reason = f"{type(error).__name__}: {error}" if not isinstance(error, ValueError) else str(error)
            raise ManifestError(
                f"{path} is not a valid manifest ({reason}); it was changed or damaged after "
                f"preparation, so the shards beside it cannot be trusted"
            ) from None

    def save(self, directory: Path) -> None:
        path = Path(directory) / MANIFEST
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.replace(tmp, path)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


class ShardWriter:
    """Appends tokenized documents to one split, cutting a shard every `shard_tokens` tokens.

    Documents are never split across shards. Call `close()` to flush the last partial shard.
    """

    def __init__(self, directory: Path, manifest: Manifest, split: str, shard_tokens: int):
        self.directory = Path(directory)
        self.manifest = manifest
        self.split = split
        self.shard_tokens = shard_tokens
        self._pending: list[np.ndarray] = []
        self._pending_tokens = 0

    def add(self, document_tokens: list[int] | np.ndarray) -> None:
        tokens = np.asarray(document_tokens, dtype=np.int64)
        if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(TOKEN_DTYPE).max):
            raise ValueError("token id outside the uint16 range")
        self._pending.append(np.append(tokens, END_OF_TEXT).astype(TOKEN_DTYPE))
        self._pending_tokens += tokens.size + 1
        if self._pending_tokens >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        split = self.manifest.splits[self.split]
        name = f"{self.split}_{len(split.shards):06d}.bin"
        tmp = self.directory / (name + ".tmp")
        np.concatenate(self._pending).tofile(tmp)
        os.replace(tmp, self.directory / name)
        split.shards.append(Shard(name, len(self._pending), self._pending_tokens, sha256_file(self.directory / name)))
        split.documents += len(self._pending)
        split.tokens += self._pending_tokens
        self.manifest.save(self.directory)
        self._pending, self._pending_tokens = [], 0

    close = flush


def holdout_start(n_documents: int, holdout_fraction: float) -> int:
    """Index of the first held-out document: the last `holdout_fraction` of documents (at least one)."""
    n_test = max(1, int(np.ceil(n_documents * holdout_fraction)))
    if n_test >= n_documents:
        raise ValueError(f"{n_documents} documents are too few to hold out {holdout_fraction:.0%} for testing")
    return n_documents - n_test


class DataError(RuntimeError):
    """Prepared data that cannot be read as recorded; the message names the file and the command that repairs it."""


class ManifestError(DataError):
    pass


class ChecksumError(DataError):
    pass


def prepare_command(directory: Path, manifest: Manifest) -> str:
    """The command that finishes or repairs `directory`'s preparation, with the settings it was made with."""
    options = [f"dataset={manifest.dataset}", f"out={directory}"]
    for key in ("shard_tokens", "max_files", "parquet_dir", "safetensors_dir"):
        if manifest.source.get(key) is not None:
            options.append(f"{key}={manifest.source[key]}")
    return "python -m harness.data prepare " + " ".join(options)


def shard_problem(directory: Path, shard: Shard, verify: bool) -> str | None:
    """Why the shard file does not hold what its manifest records (missing, wrong size, wrong checksum), or None."""
    path = Path(directory) / shard.file
    if not path.is_file():
        return f"shard {path} is missing"
    expected = shard.tokens * np.dtype(TOKEN_DTYPE).itemsize
    if path.stat().st_size != expected:
        return f"shard {path} has {path.stat().st_size:,} bytes, not the {expected:,} its manifest records"
    if verify and not verified(path, shard.sha256):
        return f"shard {path} does not match its manifest checksum"
    return None


_verified: set[tuple] = set()


def verified(path: Path, sha256: str) -> bool:
    """Whether the file's sha256 is `sha256`; a file verified in this process and unchanged since is not read again."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino, sha256)
    if key not in _verified:
        if sha256_file(path) != sha256:
            return False
        _verified.add(key)
    return True


def open_split(directory: Path, split: str, verify: bool = True) -> np.ndarray:
    """The whole split as one read-only token array (memory-mapped shards, concatenated lazily if one)."""
    directory = Path(directory)
    manifest = Manifest.load(directory)
    if not manifest.complete:
        raise DataError(
            f"{directory} holds an unfinished preparation; finish it with `{prepare_command(directory, manifest)}`"
        )
    arrays = []
    for shard in manifest.splits[split].shards:
        problem = shard_problem(directory, shard, verify)
        if problem:
            raise ChecksumError(f"{problem}; re-create it with `{prepare_command(directory, manifest)}`")
        arrays.append(np.memmap(directory / shard.file, dtype=TOKEN_DTYPE, mode="r"))
    if not arrays:
        raise DataError(f"{directory} has no {split} tokens")
    return arrays[0] if len(arrays) == 1 else ConcatenatedTokens(arrays)


class ConcatenatedTokens:
    """Slices across several memory-mapped shards as if they were one array."""

    def __init__(self, arrays: list[np.ndarray]):
        self.arrays = arrays
        self.starts = np.cumsum([0] + [len(a) for a in arrays])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: slice) -> np.ndarray:
        start, stop, _ = index.indices(len(self))
        first = int(np.searchsorted(self.starts, start, side="right") - 1)
        pieces, position = [], start
        for k in range(first, len(self.arrays)):
            if position >= stop:
                break
            local = position - self.starts[k]
            take = min(stop - position, len(self.arrays[k]) - local)
            pieces.append(self.arrays[k][local : local + take])
            position += take
        return np.concatenate(pieces) if len(pieces) != 1 else pieces[0]
