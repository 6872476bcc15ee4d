"""Data commands: `python -m harness.data prepare dataset=NAME [key=value ...]` (see USAGE)."""

import contextlib
import importlib
import sys

from harness.arguments import split
from harness.data.prepare import DATASETS, DEFAULT_SHARD_TOKENS, PrepareError, prepare

USAGE = f"""\
usage: python -m harness.data prepare dataset=NAME
           [out=DIR] [workers=N] [shard_tokens=N] [max_files=N] [parquet_dir=DIR] [safetensors_dir=DIR] [url=URL]

fineweb, fineweb_edu: downloads NAME's sample/10BT parquet files and tokenizes them into GPT-2 uint16 shards
with a manifest, as the study's prepare_datasets.py did (last 1% of documents held out).
fineweb_gpt2_tokens: the study's own published tokens (Hugging Face gpjt/fineweb-gpt2-tokens, ~19 GiB),
converted into the same shards; the data of scale=gpt2_small and scale=proxy.
hellaswag: HellaSwag's validation split (10,042 examples, hellaswag_val.jsonl), checked, with a manifest.
Rerun the same command to resume an interrupted preparation.

  dataset         one of: {", ".join(DATASETS)}
  out             output directory (default: <project root>/data/NAME)
  workers         tokenizer processes (default: CPU cores - 1; parquet only)
  shard_tokens    tokens per shard file (default: {DEFAULT_SHARD_TOKENS:_})
  max_files       use only the first N parquet files (sorted by name)
  parquet_dir     use the parquet files already in DIR instead of downloading
  safetensors_dir use train.safetensors and validation.safetensors already in DIR instead of downloading
  url             hellaswag only: download the jsonl file from URL instead (http, https or file)
"""

INTEGER_OPTIONS = {"workers", "shard_tokens", "max_files"}
TEXT_OPTIONS = {"dataset", "out", "parquet_dir", "safetensors_dir", "url"}


def parse_options(arguments: list[str]) -> dict:
    known_keys = INTEGER_OPTIONS | TEXT_OPTIONS
    given, options = split(arguments, known_keys), {}
    if given.rest:
        raise PrepareError(
            f"unexpected argument {given.rest[0]!r}; expected key=value, key one of: {', '.join(sorted(known_keys))}"
        )
    for key, value in given.settings.items():
        if key in INTEGER_OPTIONS:
            try:
                value = int(value)
            except ValueError:
                raise PrepareError(f"{key} must be an integer, got {value!r}") from None
        options[key] = value
    if "dataset" not in options:
        raise PrepareError(f"missing dataset=NAME; known datasets: {', '.join(DATASETS)}")
    return options


def main(arguments: list[str]) -> int:
    if not arguments or arguments[0] in ("-h", "--help", "help"):
        print(USAGE, end="", file=sys.stdout if arguments else sys.stderr)
        return 0 if arguments else 2
    command, *rest = arguments
    try:
        if command != "prepare":
            raise PrepareError(f"unknown command {command!r}; the only command is: prepare")
        print(prepare(**parse_options(rest)))
    except PrepareError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except transfer_errors() as error:  # offline, or the host refused: one line, not the client's traceback
        print(f"error: {unreachable_message(rest, error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; run the same command again to continue", file=sys.stderr)
        return 130
    return 0


def transfer_errors() -> tuple[type[BaseException], ...]:
    """What a download raises when the network or the disk fails: OSError (urllib, requests, the Hub's offline
    mode) and the HTTP client's transport errors."""
    errors: list[type[BaseException]] = [OSError]
    for module in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError):
            errors.append(importlib.import_module(module).TransportError)
    return tuple(errors)


def unreachable_message(arguments: list[str], error: BaseException) -> str:
    dataset = split(arguments, {"dataset"}).settings.get("dataset", "?")
    detail = (str(error).strip().splitlines() or [""])[0][:300]
    return (
        f"dataset={dataset}: could not fetch or write its files ({type(error).__name__}: {detail}); "
        "without a network, prepare from local copies: parquet_dir=DIR, safetensors_dir=DIR or url=file:///PATH"
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
