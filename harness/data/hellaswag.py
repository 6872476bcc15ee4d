"""HellaSwag's validation split (10,042 examples): download, checks, manifest, and examples as lm-eval builds them.

The source is the original repository's `hellaswag_val.jsonl`, the file that both build-nanogpt and the
Hugging Face dataset `Rowan/hellaswag` (lm-eval's source) are made from. A download is checked (complete, every
line a valid example, 10,042 of them) before it replaces anything; its sha256 is recorded in the manifest and
checked on every load. Each example's context and endings are the text lm-eval's `hellaswag` task scores
(`process_docs` and `preprocess` of lm_eval/tasks/hellaswag/utils.py). See docs/hellaswag.md.
"""

import hashlib
import http.client
import json
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from harness.data.common import PrepareError, log
from harness.paths import PROJECT_ROOT

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
VALIDATION_EXAMPLES = 10_042
DATA_FILE = "hellaswag_val.jsonl"
MANIFEST = "manifest.json"
ENDINGS = 4
DOWNLOAD_TIMEOUT_S = 60
BLOCK_BYTES = 1 << 20
# No checksum of hellaswag_val.jsonl is published; the manifest records the one of the first download.
CHECKSUM_SOURCE = "recorded at first download (no published checksum)"


class HellaswagDataError(ValueError):
    """A HellaSwag file or directory that is not a complete, valid copy; the message says what is wrong."""


@dataclass(frozen=True)
class Example:
    """One HellaSwag example as lm-eval's `hellaswag` task scores it: `context` is its `query`, `endings` its
    `choices` (each scored after a space), `label` its `gold`."""

    ind: int
    context: str
    endings: tuple[str, ...]
    label: int


def preprocess(text: str) -> str:
    """lm-eval's `preprocess` (lm_eval/tasks/hellaswag/utils.py): WikiHow's bracketed markers removed."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def example_from_record(record: dict) -> Example:
    """lm-eval's `process_docs` of one jsonl record (the record's fields are checked first)."""
    for key, kind in (("ind", int), ("activity_label", str), ("ctx_a", str), ("ctx_b", str), ("endings", list)):
        if not isinstance(record.get(key), kind):
            raise HellaswagDataError(f"field {key!r} is {record.get(key)!r}; expected a {kind.__name__}")
    endings = record["endings"]
    if len(endings) != ENDINGS or not all(isinstance(ending, str) for ending in endings):
        raise HellaswagDataError(f"field 'endings' holds {endings!r}; expected {ENDINGS} strings")
    label = record.get("label")
    if isinstance(label, str) and label.isdigit():  # Rowan/hellaswag stores labels as strings
        label = int(label)
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < ENDINGS:
        raise HellaswagDataError(f"field 'label' is {record.get('label')!r}; expected 0 to {ENDINGS - 1}")
    context = record["ctx_a"] + " " + record["ctx_b"].capitalize()
    return Example(
        ind=record["ind"],
        context=preprocess(record["activity_label"] + ": " + context),
        endings=tuple(preprocess(ending) for ending in endings),
        label=label,
    )


def parse_examples(data: bytes, source: str) -> list[Example]:
    """The examples of a jsonl file's bytes; refuses a file with any line that is not a complete example."""
    if not data.endswith(b"\n"):
        raise HellaswagDataError(f"{source} does not end with a newline: the file is truncated")
    examples = []
    for number, line in enumerate(data.split(b"\n")[:-1], start=1):
        try:
            examples.append(example_from_record(json.loads(line)))
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
            raise HellaswagDataError(f"{source} line {number} is not a JSON object ({error})") from None
        except HellaswagDataError as error:
            raise HellaswagDataError(f"{source} line {number}: {error}") from None
    return examples


def load_hellaswag(path: Path | str = PROJECT_ROOT / "data" / "hellaswag") -> list[Example]:
    """The examples of a prepared directory (its file checked against its manifest's sha256 and count) or of
    a jsonl file in HellaSwag's format."""
    path = Path(path)
    if path.is_file():
        return parse_examples(path.read_bytes(), str(path))
    manifest = read_manifest(path)
    data_file = path / manifest["file"]
    if not data_file.is_file():
        raise HellaswagDataError(f"{data_file} is missing; run: python -m harness prepare dataset=hellaswag out={path}")
    data = data_file.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != manifest["sha256"]:
        raise HellaswagDataError(
            f"{data_file} has sha256 {digest}, its manifest records {manifest['sha256']}; "
            f"delete {path} and prepare it again"
        )
    examples = parse_examples(data, str(data_file))
    if len(examples) != manifest["examples"]:
        raise HellaswagDataError(f"{data_file} holds {len(examples)} examples, its manifest {manifest['examples']}")
    return examples


def read_manifest(directory: Path) -> dict:
    manifest_file = directory / MANIFEST
    if not manifest_file.is_file():
        raise HellaswagDataError(
            f"{directory} holds no HellaSwag manifest ({MANIFEST}); run: python -m harness prepare "
            f"dataset=hellaswag out={directory}"
        )
    try:
        manifest = json.loads(manifest_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise HellaswagDataError(f"{manifest_file} is not valid JSON ({error})") from None
    keys = ("dataset", "file", "sha256", "examples")
    if not isinstance(manifest, dict) or manifest.get("dataset") != "hellaswag" or not all(k in manifest for k in keys):
        raise HellaswagDataError(f"{manifest_file} is not a HellaSwag manifest; it needs dataset=hellaswag and {keys}")
    return manifest


def prepare_hellaswag(
    out: Path | str | None = None, url: str = URL, expected_examples: int = VALIDATION_EXAMPLES
) -> Path:
    """Downloads the validation split from `url` into `out` (default <project root>/data/hellaswag), checks it
    and writes its manifest; returns `out`. A download that fails a check is deleted and nothing is replaced.
    Where a manifest remains but its file is gone, the new download must have the sha256 it recorded."""
    out = Path(out) if out is not None else PROJECT_ROOT / "data" / "hellaswag"
    recorded = None  # the sha256 of the first download, when only its file is gone: a new download must match it
    if (out / MANIFEST).exists():
        try:
            recorded = read_manifest(out)["sha256"]
            if (out / DATA_FILE).exists():
                examples = load_hellaswag(out)
                log(f"{out} is already prepared ({len(examples):,} HellaSwag validation examples); nothing to do")
                return out
        except HellaswagDataError as error:
            raise PrepareError(f"{error}") from None
    elif (out / DATA_FILE).exists():
        raise PrepareError(
            f"{out / DATA_FILE} exists without a manifest; move it away, or prepare from it with url=file://PATH"
        )
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    partial = out / f".{DATA_FILE}.part"
    kept = False
    try:
        digest, size = download(url, partial)
        try:
            count = len(parse_examples(partial.read_bytes(), url))
        except HellaswagDataError as error:
            raise PrepareError(f"refused the download: {error}") from None
        if count != expected_examples:
            raise PrepareError(
                f"refused the download from {url}: it holds {count:,} examples, "
                f"HellaSwag's validation split has {expected_examples:,}"
            )
        if recorded is not None and digest != recorded:
            raise PrepareError(
                f"refused the download from {url}: sha256 {digest}, but {out / MANIFEST} recorded {recorded} "
                f"at the first download; delete {out} to accept the new file"
            )
        os.replace(partial, out / DATA_FILE)
        kept = True
    finally:
        partial.unlink(missing_ok=True)
        if created and not kept:
            out.rmdir()  # only the download was in it
    manifest = {
        "dataset": "hellaswag",
        "split": "validation",
        "url": url,
        "file": DATA_FILE,
        "examples": count,
        "bytes": size,
        "sha256": digest,
        "checksum_source": CHECKSUM_SOURCE,
        "downloaded_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    staged = out / f".{MANIFEST}.part"
    staged.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(staged, out / MANIFEST)
    log(f"prepared {out}: {count:,} HellaSwag validation examples, sha256 {digest}")
    return out


def download(url: str, path: Path) -> tuple[str, int]:
    """Streams `url` into `path`; returns its sha256 and size. Refuses fewer bytes than Content-Length."""
    log(f"downloading {url}")
    digest, size = hashlib.sha256(), 0
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(path, "wb") as f:
            expected = response.headers.get("Content-Length")
            for block in iter(lambda: response.read(BLOCK_BYTES), b""):
                f.write(block)
                digest.update(block)
                size += len(block)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
        raise PrepareError(f"could not download {url}: {error}") from None
    if expected is not None and size != int(expected):
        raise PrepareError(f"refused the download from {url}: truncated, {size:,} of {int(expected):,} bytes arrived")
    return digest.hexdigest(), size
