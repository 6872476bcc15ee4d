"""Checkpoint disk arithmetic, without torch: what one checkpoint takes, how many a trial holds under its
retention setting (`trainer.keep_checkpoints`), and byte counts as people read them. The trial's own disk check
(`harness.trial.checkpoint.disk_plan`) and the planner (`python -m harness plan`) both count with these."""


def checkpoint_size(weight_bytes: int) -> int:
    """About what one checkpoint takes: the weights (a tied matrix once) and AdamW's two moments of each, plus
    the state's small parts (history, periods, RNG)."""
    return 3 * weight_bytes + (1 << 20)


def _checkpoints(max_steps: int, interval: int, keep_every: int | None) -> tuple[int, int]:
    """(checkpoints a trial writes, extra ones every keep_every-th keeps). As the reference code, a trial writes
    one after steps 1, interval+1, 2·interval+1, … and one after its last step."""
    periodic = -(-max_steps // interval)
    count = periodic + (1 if (max_steps - 1) % interval else 0)
    return count, (-(-periodic // keep_every) if keep_every else 0)


def kept_at_most(max_steps: int, interval: int, keep_every: int | None) -> int:
    """Checkpoints a trial can hold at once: the pointed-at ones and every keep_every-th, plus one staged."""
    count, extra = _checkpoints(max_steps, interval, keep_every)
    return count if keep_every is None else min(count, 2 + extra + 1)


def kept_at_end(max_steps: int, interval: int, keep_every: int | None) -> int:
    """Checkpoints a finished trial leaves: latest and best and every keep_every-th (or every one)."""
    count, extra = _checkpoints(max_steps, interval, keep_every)
    return count if keep_every is None else min(count, 2 + extra)


def retention(keep_every: int | None) -> str:
    return (
        "every checkpoint"
        if keep_every is None
        else "latest and best" + (f" and every {keep_every}th" if keep_every else "")
    )


def format_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000:
            return f"{count:.1f} {unit}" if unit != "B" else f"{count:.0f} B"
        count /= 1000
    return f"{count:.1f} TB"
