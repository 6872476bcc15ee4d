"""Which code ran a trial: the `code_version` tag, by which a study decides whether a FINISHED run still counts."""

import functools
import hashlib
import subprocess
from importlib import metadata

from harness.paths import PROJECT_ROOT

PACKAGE = "llm-intervention-harness"
# Uncommitted files that are code or config; anything else untracked (notes, outputs) does not change a trial.
CODE_SUFFIXES = (".py", ".yaml", ".yml", ".toml")


@functools.cache
def code_version() -> str:
    """`<commit>` for a clean git checkout; `<commit>-dirty.<12 hex>` when it has uncommitted changes (a digest of
    the diff against the commit and of untracked code files, so two different edits never share a version);
    `<package version>` outside git; `unknown` when neither is known. Computed once per process: the code a
    process runs is the code it imported."""
    try:
        commit = git("rev-parse", "HEAD").decode().strip()
    except (OSError, subprocess.CalledProcessError):
        try:
            return metadata.version(PACKAGE)
        except metadata.PackageNotFoundError:
            return "unknown"
    diff = git("diff", "HEAD", "--binary")
    untracked = [
        name
        for name in git("ls-files", "--others", "--exclude-standard", "-z").decode().split("\0")
        if name.endswith(CODE_SUFFIXES)
    ]
    if not diff and not untracked:
        return commit
    changes = hashlib.sha256(diff)
    for name in sorted(untracked):
        changes.update(name.encode() + b"\0" + (PROJECT_ROOT / name).read_bytes())
    return f"{commit}-dirty.{changes.hexdigest()[:12]}"


def git(*arguments: str) -> bytes:
    return subprocess.run(["git", *arguments], cwd=PROJECT_ROOT, capture_output=True, check=True).stdout
