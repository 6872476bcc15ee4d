"""The bundled public-domain corpus (`harness/assets/corpus`), tokenized once into the shard format."""

import json
import lzma
import shutil
import tempfile
from importlib import resources
from pathlib import Path

from harness.data.shards import MANIFEST, Manifest, ShardWriter, holdout_start, sha256_file
from harness.tokenizer import gpt2_encoding

CORPUS_FILE = resources.files("harness.assets").joinpath("corpus", "corpus.jsonl.xz")


def read_documents(path: Path = CORPUS_FILE) -> list[str]:
    with lzma.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def prepare_bundled(cache_root: Path, holdout_fraction: float) -> Path:
    """Tokenize the corpus into `cache_root` once per (corpus, holdout) and return the directory.

    Built in a temporary directory and renamed into place, so concurrent trials never see half a cache.
    """
    corpus_hash = sha256_file(Path(str(CORPUS_FILE)))[:12]
    directory = Path(cache_root) / f"bundled-{corpus_hash}-holdout{holdout_fraction:g}"
    if (directory / MANIFEST).exists():
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(dir=directory.parent, prefix=".building-"))
    try:
        documents = read_documents()
        first_test = holdout_start(len(documents), holdout_fraction)
        manifest = Manifest(dataset="bundled", source={"file": str(CORPUS_FILE), "sha256": corpus_hash}, holdout_fraction=holdout_fraction)
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
