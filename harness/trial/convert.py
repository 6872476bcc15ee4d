"""`python -m harness.trial.convert STEP_DIR`: rewrite a checkpoint saved before RNG state was stored as tensors.

Such a checkpoint holds pickled numpy and Python objects, which the harness refuses to load (unpickling can run
code). Run this once, and only on a checkpoint whose origin you trust: it unpickles the old files, writes them
again as plain data and re-signs the manifest. docs/records.md has the details.
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch

from harness.trial import checkpoint


def plain_rng(old: dict) -> dict:
    """An old RNG state (Python's tuple, numpy's legacy tuple) as `checkpoint.rng_state` now writes it."""
    version, words, gauss = old["python"]
    name, key, pos, has_gauss, numpy_gauss = old["numpy"]
    state = {
        "python": {"version": version, "state": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "bit_generator": str(name),
            "key": torch.from_numpy(np.asarray(key).astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(numpy_gauss),
        },
        "torch": old["torch"],
    }
    if "cuda" in old:
        state["cuda"] = list(old["cuda"])
    return state


def convert(step_dir: Path) -> list[Path]:
    """Rewrite the checkpoint's torch files as plain data; returns the files rewritten."""
    step_dir = Path(step_dir)
    if not (step_dir / checkpoint.MODEL_FILE).is_file():
        raise FileNotFoundError(f"{step_dir} is not a checkpoint directory (no {checkpoint.MODEL_FILE})")
    checkpoint.verify(step_dir)
    rewritten = []
    for path in [step_dir / checkpoint.STATE_FILE, *sorted(step_dir.glob("rng_rank*.pt"))]:
        try:
            checkpoint.load_plain(path)
            continue
        except checkpoint.CheckpointError:
            pass
        old = torch.load(path, map_location="cpu", weights_only=False)  # the user vouched for this file
        torch.save(plain_rng(old) if path.name.startswith("rng_rank") else old, path)
        checkpoint.load_plain(path)  # what is written is plain data, or this raises
        rewritten.append(path)
    manifest = checkpoint.read_manifest(step_dir)
    if manifest is not None and rewritten:
        for path in rewritten:
            manifest["files"][path.name] = {"sha256": checkpoint.sha256(path), "bytes": path.stat().st_size}
        (step_dir / checkpoint.MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
    return rewritten


def main(arguments: list[str]) -> int:
    if len(arguments) != 1 or arguments[0] in ("-h", "--help"):
        print("usage: python -m harness.trial.convert STEP_DIR (a checkpoint whose origin you trust)", file=sys.stderr)
        return 2
    try:
        rewritten = convert(Path(arguments[0]))
    except (FileNotFoundError, checkpoint.CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"rewrote {', '.join(p.name for p in rewritten)} as plain data" if rewritten else "already plain data")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
