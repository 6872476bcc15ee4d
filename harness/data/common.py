"""What both preparations share (FineWeb from parquet in `harness.data.prepare`, the study's published tokens in
`harness.data.tokens`): the held-out fraction, a matching manifest to resume from, damaged shards, disk checks."""

import shutil
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from harness.data.shards import MANIFEST, TOKEN_DTYPE, Manifest, ManifestError, shard_problem

HOLDOUT_FRACTION = 0.01


TOKEN_BYTES = np.dtype(TOKEN_DTYPE).itemsize


class PrepareError(Exception):
    """A preparation that cannot start or continue; the message tells the user what to do."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def describe(manifest: Manifest) -> str:
    return ", ".join(
        f"{name} {split.documents:,} documents / {split.tokens:,} tokens in {len(split.shards)} shards"
        for name, split in manifest.splits.items()
    )


def load_matching_manifest(out: Path, dataset: str, settings: dict) -> Manifest | None:
    """The manifest of an earlier preparation in `out`, if any; refuses one made with other settings."""
    if not (out / MANIFEST).exists():
        return None
    try:
        manifest = Manifest.load(out)
    except ManifestError as error:
        raise PrepareError(f"{error}; move it away to prepare {out} from the start") from None
    recorded = {key: manifest.source.get(key) for key in settings}
    if manifest.dataset == dataset and "encoding" in settings and "encoding" not in manifest.source:
        raise PrepareError(
            f"{out} was prepared by an earlier harness (encode_ordinary, and the last ceil(1%) of documents held out), "
            f"not as the study's prepare_datasets.py did it; its tokens differ from the study's. Delete {out} and "
            "prepare again, or choose another out=DIR"
        )
    if manifest.dataset != dataset or recorded != settings:
        raise PrepareError(
            f"{out} holds a preparation of {manifest.dataset} with {recorded}, not of {dataset} with {settings}; "
            "use the same settings to finish it, or choose another out=DIR"
        )
    return manifest


def written_bytes(manifest: Manifest | None) -> int:
    if manifest is None:
        return 0
    return TOKEN_BYTES * sum(split.tokens for split in manifest.splits.values())


def gigabytes(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:.2f} GB"


def require_disk_space(out: Path, needed_bytes: float, purpose: str) -> None:
    existing = next(directory for directory in (out, *out.parents) if directory.exists())
    free = shutil.disk_usage(existing).free
    if needed_bytes > free:
        raise PrepareError(
            f"not enough disk space for {out}: {purpose} need about {gigabytes(needed_bytes)} "
            f"but only {gigabytes(free)} are free; free some space or choose another out=DIR"
        )


def import_huggingface_hub():
    try:
        import huggingface_hub
    except ImportError:
        raise PrepareError(
            "downloading needs huggingface_hub: pip install -e .[data] "
            "(or pass parquet_dir=DIR with the parquet files already downloaded)"
        ) from None
    return huggingface_hub


def is_downloaded(path: Path, size: int) -> bool:
    return path.exists() and path.stat().st_size == size


def remove_unfinished_shards(out: Path, manifest: Manifest) -> None:
    """Deletes what an interrupted run wrote beyond its manifest, which this run writes again."""
    recorded = {shard.file for split in manifest.splits.values() for shard in split.shards}
    for path in out.glob("*.tmp"):
        path.unlink()
    for path in out.glob("*.bin"):
        if path.name not in recorded:
            path.unlink()  # renamed into place, but the run died before recording it in the manifest


def damaged_shards(out: Path, manifest: Manifest | None) -> list[tuple[str, int]]:
    """(split, index) of each recorded shard that is missing, has the wrong size or fails its checksum."""
    if manifest is None:
        return []
    damaged = []
    shards = [
        (name, index, shard) for name, split in manifest.splits.items() for index, shard in enumerate(split.shards)
    ]
    for name, index, shard in tqdm(
        shards, desc="verifying shards", unit="shard", file=sys.stderr, disable=len(shards) < 10
    ):
        problem = shard_problem(out, shard, verify=True)
        if problem:
            log(f"{problem}: it will be re-created")
            damaged.append((name, index))
    return damaged
