"""Training charts (loss with min–max band, best step and HellaSwag acc_norm when scored, gradient norm with the
clip line, LR).

Non-finite values are drawn as markers along the top edge instead of breaking the axis scale.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _plot_finite(ax, steps, values, label, **style):
    values = np.asarray(values, dtype=float)
    steps = np.asarray(steps)
    finite = np.isfinite(values)
    ax.plot(steps, np.where(finite, values, np.nan), label=label, **style)
    if not finite.all():
        ax.plot(
            steps[~finite],
            np.full((~finite).sum(), 1.0),
            "rx",
            transform=ax.get_xaxis_transform(),
            clip_on=False,
            label=f"{label}: non-finite",
        )


def write_charts(history: dict, periods: list[dict], out_dir: Path, grad_clip: float | None) -> list[Path]:
    """history: per-step lists `step`, `loss`, `grad_norm`, `lr` (and, when scored, `hellaswag_step` and
    `hellaswag_acc_norm`); periods: one dict per checkpoint period."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []

    fig, ax = plt.subplots(figsize=(8, 4.5))
    _plot_finite(ax, history["step"], history["loss"], "train loss", lw=0.6, alpha=0.6)
    if periods:
        ends = [p["step"] for p in periods]
        ax.fill_between(
            ends,
            [p["train_loss_min"] for p in periods],
            [p["train_loss_max"] for p in periods],
            alpha=0.2,
            label="period min–max",
        )
        ax.plot(ends, [p["train_loss_avg"] for p in periods], "o-", label="period average")
        bests = [p for p in periods if p.get("is_best")]  # the trainer's rule; charts of bare statistics: the lowest
        best = bests[-1] if bests else min(periods, key=lambda p: p["train_loss_avg"])
        ax.plot(
            best["step"], best["train_loss_avg"], "*", ms=14, color="gold", mec="k", label=f"best (step {best['step']})"
        )
    ax.set(xlabel="step", ylabel="cross-entropy", title="Training loss")
    handles, labels = ax.get_legend_handles_labels()
    if history.get("hellaswag_step"):
        accuracy = ax.twinx()
        accuracy.plot(history["hellaswag_step"], history["hellaswag_acc_norm"], "s-", color="tab:green", ms=4)
        accuracy.set_ylabel("HellaSwag acc_norm (chance 0.25)")
        handles += accuracy.get_lines()
        labels.append("HellaSwag acc_norm")
    ax.legend(handles, labels)
    paths.append(_save(fig, out_dir / "loss.png"))

    fig, ax = plt.subplots(figsize=(8, 4.5))
    _plot_finite(ax, history["step"], history["grad_norm"], "pre-clip gradient norm", lw=0.6)
    if grad_clip is not None:
        ax.axhline(grad_clip, color="r", ls="--", label=f"clip at {grad_clip}")
    if np.isfinite(np.asarray(history["grad_norm"], dtype=float)).any():
        ax.set_yscale("log")
    ax.set(xlabel="step", ylabel="L2 norm", title="Global gradient norm (before clipping)")
    ax.legend()
    paths.append(_save(fig, out_dir / "grad_norm.png"))

    fig, ax = plt.subplots(figsize=(8, 3))
    ax.plot(history["step"], history["lr"])
    ax.set(xlabel="step", ylabel="learning rate", title="Learning rate")
    paths.append(_save(fig, out_dir / "lr.png"))
    return paths


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
