"""The bundled public-domain corpus (`harness/assets/corpus`), tokenized once into the shard format.

The tokens live in a cache under `.cache/data`: one directory per (corpus, holdout fraction). A cache whose
manifest or shards were lost or damaged is rebuilt, never used.
"""

import json
import logging
import lzma
import shutil
import tempfile
from importlib import resources
from pathlib import Path

from harness.data.shards import MANIFEST, DataError, Manifest, ShardWriter, holdout_start, sha256_file, shard_problem
from harness.data.tokenizer import gpt2_encoding
from harness.paths import PROJECT_ROOT

CORPUS_FILE = resources.files("harness.assets").joinpath("corpus", "corpus.jsonl.xz")
BUNDLED_CACHE = PROJECT_ROOT / ".cache" / "data"
log = logging.getLogger(__name__)


def read_documents(path: Path = CORPUS_FILE) -> list[str]:
    with lzma.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def cache_problem(directory: Path, verify: bool = True) -> str | None:
    """Why the cache directory cannot be used as it is, or None."""
    if not (directory / MANIFEST).exists():
        return f"{directory / MANIFEST} is missing"
    try:
        manifest = Manifest.load(directory)
    except DataError as error:
        return str(error)
    if not manifest.complete:
        return f"{directory} is unfinished"
    for split in manifest.splits.values():
        for shard in split.shards:
            problem = shard_problem(directory, shard, verify)
            if problem:
                return problem
    return None


def prepare_bundled(cache_root: Path, holdout_fraction: float, verify: bool = True) -> Path:
    """Tokenize the corpus into `cache_root` once per (corpus, holdout) and return the directory.

    Built in a temporary directory and renamed into place, so concurrent trials never see half a cache; a
    damaged cache (`verify` also checks the shards' checksums) is moved aside and built again.
    """
    corpus_hash = sha256_file(Path(str(CORPUS_FILE)))[:12]
    directory = Path(cache_root) / f"bundled-{corpus_hash}-holdout{holdout_fraction:g}"
    problem = cache_problem(directory, verify)
    if problem is None:
        return directory
    if directory.exists():
        log.warning("the bundled token cache is damaged (%s); building it again", problem)
        discard(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(dir=directory.parent, prefix=".building-"))
    try:
        documents = read_documents()
        first_test = holdout_start(len(documents), holdout_fraction)
        manifest = Manifest(
            dataset="bundled",
            source={"file": str(CORPUS_FILE), "sha256": corpus_hash},
            holdout_fraction=holdout_fraction,
        )
        encoding = gpt2_encoding()
        for split, docs in (("train", documents[:first_test]), ("test", documents[first_test:])):
            writer = ShardWriter(build, manifest, split, shard_tokens=1 << 62)
            for tokens in encoding.encode_ordinary_batch(docs, num_threads=2):
                writer.add(tokens)
            writer.close()
        manifest.complete = True
        manifest.save(build)
        try:
            build.rename(directory)
        except OSError:  # another process finished first; its cache is identical
            pass
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return directory


def discard(directory: Path) -> None:
    """Rename a damaged cache out of the way (atomically: another process may be repairing it too), then delete it."""
    aside = Path(tempfile.mkdtemp(dir=directory.parent, prefix=".damaged-"))
    try:
        directory.rename(aside / directory.name)
    except OSError:  # already moved aside, or already rebuilt, by another process
        pass
    shutil.rmtree(aside, ignore_errors=True)
