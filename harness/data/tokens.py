"""The study's own tokens: the Hugging Face dataset `gpjt/fineweb-gpt2-tokens`, converted into the shard format.

The reference code trains on `train.safetensors` (10,248,871,837 tokens) and tests on `validation.safetensors`
(102,163,003 tokens), each one uint16 tensor `tokens` with end-of-text after every document; they become the
`train` and `test` splits, token for token. The files are read in memory-mapped blocks (train is 19 GiB), each
shard ends at the first end-of-text at or after `shard_tokens` tokens, and an interrupted conversion resumes
after its last completed shard and ends byte-identical to an uninterrupted one."""

import hashlib
import json
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
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
from harness.data.shards import SPLITS, TOKEN_DTYPE, Manifest, Shard
from harness.data.tokenizer import END_OF_TEXT
from harness.paths import PROJECT_ROOT

REPO = "gpjt/fineweb-gpt2-tokens"
FILES = {"train": "train.safetensors", "test": "validation.safetensors"}  # split -> file
PUBLISHED_TOKENS = {"train": 10_248_871_837, "test": 102_163_003}
TENSOR, DTYPE = "tokens", "U16"  # safetensors' name for uint16
VOCAB_SIZE = 50_257
BLOCK_TOKENS = 1 << 25  # 64 MB read, checked and written at a time
MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit


@dataclass
class TokenFile:
    """One safetensors file holding a single 1-D uint16 tensor `tokens`."""

    path: Path
    data_offset: int  # byte offset of the first token in the file
    tokens: int

    def read(self, start: int, stop: int) -> np.ndarray:
        """tokens[start:stop] (clipped to the file), copied out of a memory map of that range alone, which is
        unmapped again at once: memory stays one block, whatever the file's size."""
        stop = min(stop, self.tokens)
        view = np.memmap(
            self.path, dtype="<u2", mode="r", offset=self.data_offset + TOKEN_BYTES * start, shape=(stop - start,)
        )
        block = np.array(view, dtype=TOKEN_DTYPE)
        del view
        return block


def read_header(path: Path) -> TokenFile:
    """Parses the safetensors header (8-byte little-endian length, then JSON) and checks the layout."""
    if not path.is_file():
        raise PrepareError(f"{path} is missing")
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        header_bytes = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else None
        if header_bytes is None or header_bytes > min(MAX_HEADER_BYTES, size - 8):
            raise PrepareError(f"{path} is not a safetensors file (no valid header length)")
        try:
            header = json.loads(f.read(header_bytes))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise PrepareError(f"{path} is not a safetensors file (its header is not JSON: {error})") from None
    tensors = {name: spec for name, spec in header.items() if name != "__metadata__"}
    if set(tensors) != {TENSOR}:
        raise PrepareError(f"{path} holds the tensors {sorted(tensors)}; expected exactly one named {TENSOR!r}")
    spec = tensors[TENSOR]
    if spec.get("dtype") != DTYPE or len(spec.get("shape", ())) != 1:
        raise PrepareError(
            f"{path}: tensor {TENSOR!r} is {spec.get('dtype')} of shape {spec.get('shape')}; "
            f"expected a 1-D {DTYPE} (uint16) tensor of GPT-2 token ids"
        )
    tokens = spec["shape"][0]
    begin, end = spec["data_offsets"]
    data_start = 8 + header_bytes
    if end - begin != tokens * 2 or data_start + end > size:
        raise PrepareError(
            f"{path} is truncated or inconsistent: {tokens:,} tokens need bytes {data_start + begin:,}"
            f"…{data_start + begin + 2 * tokens:,} of a {size:,}-byte file"
        )
    return TokenFile(path, data_start + begin, tokens)


def prepare_tokens(
    dataset: str, out: Path | str | None, shard_tokens: int, safetensors_dir: Path | str | None = None
) -> Path:
    """Converts (or finishes converting) the study's token files into `out` and returns `out`.

    Downloads them from the Hub unless `safetensors_dir` already holds train.safetensors and
    validation.safetensors.
    """
    out = Path(out) if out is not None else PROJECT_ROOT / "data" / dataset
    settings = {"repo": REPO, "shard_tokens": shard_tokens}
    manifest = load_matching_manifest(out, dataset, settings)
    damaged = damaged_shards(out, manifest)
    if manifest is not None and manifest.complete and not damaged:
        log(f"{out} is already prepared ({describe(manifest)}); nothing to do")
        return out
    written = written_bytes(manifest)
    if safetensors_dir is None:
        safetensors_dir = download(out / "download", out, written)
    files = {split: read_header(Path(safetensors_dir) / name) for split, name in FILES.items()}
    source = {
        **settings,
        "files": {
            FILES[split]: {"tokens": file.tokens, "bytes": file.path.stat().st_size} for split, file in files.items()
        },
    }
    if manifest is None:
        manifest = Manifest(dataset, source, HOLDOUT_FRACTION)
    elif without_safetensors_dir(manifest.source) != source:
        raise PrepareError(f"the token files differ from those {out} was started with; delete {out} to start over")
    # Where the files are, so that the repair command a damaged shard prints is complete (not compared on resume).
    downloaded = Path(safetensors_dir) == out / "download"
    manifest.source["safetensors_dir"] = None if downloaded else str(Path(safetensors_dir).resolve())
    for split, file in files.items():
        if file.tokens != PUBLISHED_TOKENS[split]:
            log(
                f"warning: {file.path} holds {file.tokens:,} tokens, the published {FILES[split]} "
                f"{PUBLISHED_TOKENS[split]:,}: these are not the study's tokens"
            )
    total = sum(file.tokens for file in files.values())
    require_disk_space(out, TOKEN_BYTES * total - written, "the token shards")

    out.mkdir(parents=True, exist_ok=True)
    remove_unfinished_shards(out, manifest)
    for split, index in damaged:
        recreate_shard(files[split], out, manifest, split, index)
    if not manifest.complete:
        with tqdm(
            desc="tokens", total=total, initial=written // TOKEN_BYTES, unit="tok", unit_scale=True, file=sys.stderr
        ) as bar:
            for split in SPLITS:
                convert_split(files[split], out, manifest, split, shard_tokens, bar)
        manifest.complete = True
    manifest.save(out)
    log(f"prepared {out}: {describe(manifest)}")
    return out


def download(local_dir: Path, out: Path, written: int) -> Path:
    """Downloads the two token files of REPO into `local_dir` (huggingface_hub resumes a partial download)."""
    hub = import_huggingface_hub()
    tree = hub.HfApi().list_repo_tree(REPO, repo_type="dataset")
    sizes = {entry.path: getattr(entry, "size", None) for entry in tree}  # folders have no size
    missing = [name for name in FILES.values() if sizes.get(name) is None]
    if missing:
        raise PrepareError(f"{REPO} has no {', '.join(missing)}")
    download_bytes = sum(sizes[name] for name in FILES.values() if not is_downloaded(local_dir / name, sizes[name]))
    shard_bytes = sum(sizes[name] for name in FILES.values()) - written
    require_disk_space(out, download_bytes + shard_bytes, "the download and the token shards")
    log(f"downloading {gigabytes(download_bytes)} of {REPO}")
    hub.snapshot_download(repo_id=REPO, repo_type="dataset", allow_patterns=list(FILES.values()), local_dir=local_dir)
    return local_dir


def convert_split(source: TokenFile, out: Path, manifest: Manifest, split: str, shard_tokens: int, bar: tqdm) -> None:
    """Copies the file's tokens after those already in the split's shards into further shards."""
    position = manifest.splits[split].tokens
    while position < source.tokens:
        end = shard_end(source, position, shard_tokens)
        write_shard(source, position, end, out, manifest, split)
        bar.update(end - position)
        position = end


def shard_end(source: TokenFile, start: int, shard_tokens: int) -> int:
    """One past the first end-of-text at or after `start + shard_tokens − 1` (the end of the file if none)."""
    position = start + shard_tokens - 1
    while position < source.tokens:
        block = source.read(position, position + BLOCK_TOKENS)
        ends = np.flatnonzero(block == END_OF_TEXT)
        if ends.size:
            return position + int(ends[0]) + 1
        position += len(block)
    return source.tokens


def write_shard(source: TokenFile, start: int, end: int, out: Path, manifest: Manifest, split: str) -> None:
    """tokens[start:end] as the split's next shard (written to a temporary name, checked, renamed, recorded)."""
    record = manifest.splits[split]
    name = f"{split}_{len(record.shards):06d}.bin"
    documents, sha256 = copy_tokens(source, start, end, out / (name + ".tmp"))
    os.replace(out / (name + ".tmp"), out / name)
    record.shards.append(Shard(name, documents, end - start, sha256))
    record.documents += documents
    record.tokens += end - start
    manifest.save(out)


def copy_tokens(source: TokenFile, start: int, end: int, path: Path) -> tuple[int, str]:
    """Writes tokens[start:end] to `path`, checking each is a GPT-2 token id; returns (documents, sha256)."""
    digest, documents = hashlib.sha256(), 0
    with open(path, "wb") as f:
        for first in range(start, end, BLOCK_TOKENS):
            block = source.read(first, min(end, first + BLOCK_TOKENS))
            if int(block.max()) >= VOCAB_SIZE:
                bad = int(np.argmax(block >= VOCAB_SIZE))
                raise PrepareError(
                    f"{source.path}: token {first + bad:,} is {int(block[bad]):,}, outside GPT-2's "
                    f"vocabulary of {VOCAB_SIZE:,}; these are not GPT-2 tokens"
                )
            documents += int(np.count_nonzero(block == END_OF_TEXT))
            digest.update(block)
            block.tofile(f)
    return documents, digest.hexdigest()


def recreate_shard(source: TokenFile, out: Path, manifest: Manifest, split: str, index: int) -> None:
    """Copies a damaged shard's tokens from the source file again; the new file must have the recorded checksum."""
    shards = manifest.splits[split].shards
    shard, start = shards[index], sum(s.tokens for s in shards[:index])
    tmp = out / (shard.file + ".tmp")
    _, sha256 = copy_tokens(source, start, start + shard.tokens, tmp)
    if sha256 != shard.sha256:
        tmp.unlink()
        raise PrepareError(
            f"re-created {out / shard.file} does not match its recorded checksum: {source.path} is not "
            f"the file it was prepared from; delete {out} to start over"
        )
    os.replace(tmp, out / shard.file)
    log(f"re-created {out / shard.file} ({shard.tokens:,} tokens, checksum as recorded)")


def without_safetensors_dir(source: dict) -> dict:
    return {key: value for key, value in source.items() if key != "safetensors_dir"}
