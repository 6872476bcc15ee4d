"""Figures of a study (seaborn on the non-interactive Agg backend).

Every function drops non-finite values before plotting, writes one PNG and
returns its path, or returns None when nothing finite is left to draw.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

MAX_CURVE_POINTS = 200
MARKED_POINTS = 30  # fewer steps than this are drawn with a marker each
FINAL_FRACTION = 0.3
VERDICT_COLOURS = {"better": "tab:green", "worse": "tab:red", "inconclusive": "tab:gray"}


def _finite(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    values = frame[columns].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    return frame[np.isfinite(values).all(axis=1)]


def _save(figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path


def training_curves(histories: pd.DataFrame, runs: pd.DataFrame, path: Path) -> Path | None:
    """Mean training loss per intervention with a +-1 SD band across seeds.

    Left: the whole run (log scale); right: the final 30% of steps, where the
    interventions differ.  Per-step histories are averaged into at most 200
    step bins per run.
    """
    curves = _finite(histories.merge(runs[["run_id", "intervention"]], on="run_id"), ["step", "value"])
    if curves.empty:
        return None
    curves = curves.assign(step=curves["step"].astype(float), value=curves["value"].astype(float))
    if curves["step"].nunique() > MAX_CURVE_POINTS:
        edges = np.linspace(curves["step"].min(), curves["step"].max(), MAX_CURVE_POINTS + 1)
        centres = (edges[:-1] + edges[1:]) / 2
        bins = np.clip(np.searchsorted(edges, curves["step"], side="right") - 1, 0, MAX_CURVE_POINTS - 1)
        curves = (
            curves.assign(step=centres[bins])
            .groupby(["intervention", "run_id", "step"], as_index=False)["value"]
            .mean()
        )
    final_start = curves["step"].min() + (1 - FINAL_FRACTION) * np.ptp(curves["step"])
    steps = np.sort(curves["step"].unique())
    final_start = min(final_start, steps[-min(len(steps), 2)])  # at least two points, so a line can be drawn
    sns.set_theme(style="whitegrid")
    figure, (whole, final) = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, data in ((whole, curves), (final, curves[curves["step"] >= final_start])):
        sns.lineplot(
            data=data,
            x="step",
            y="value",
            hue="intervention",
            errorbar="sd",
            marker="o" if data["step"].nunique() <= MARKED_POINTS else None,
            ax=ax,
            legend=ax is final,
        )
        ax.set_ylabel("training loss")
    if (curves["value"] > 0).all():
        whole.set_yscale("log")
    whole.set_title("training loss (mean +- SD across seeds)")
    final.set_title(f"from step {final_start:g} (at least the final {FINAL_FRACTION:.0%} of steps)")
    if final.get_legend():
        sns.move_legend(final, "upper left", bbox_to_anchor=(1.02, 1))
    return _save(figure, path)


def forest_plot(ranking: pd.DataFrame, min_effect: float, path: Path) -> Path | None:
    """Difference to baseline with the Holm-adjusted interval that decides its verdict (thick) and the unadjusted
    t interval (thin), over the +-1 noise-SD band; each row is labelled with its verdict and difference."""
    rows = ranking.reset_index(drop=True)
    drawable = _finite(rows, ["difference", "ci_low", "ci_high"])
    if drawable.empty:
        return None
    adjusted = _finite(rows, ["holm_low", "holm_high"]) if "holm_low" in rows else rows.iloc[:0]
    sns.set_theme(style="whitegrid")
    figure, ax = plt.subplots(figsize=(9, 1.6 + 0.55 * len(rows)))
    band = _finite(rows, ["noise_sd"])
    ax.barh(
        band.index,
        2 * band["noise_sd"],
        left=-band["noise_sd"],
        height=0.6,
        color="tab:blue",
        alpha=0.15,
        label="+-1 noise SD (reference)",
    )
    confidence = f"{adjusted['holm_confidence'].min():.1%}" if not adjusted.empty else ""
    if not adjusted.empty:
        ax.hlines(
            adjusted.index,
            adjusted["holm_low"],
            adjusted["holm_high"],
            color="black",
            lw=3.5,
            label="Holm-adjusted interval (decides the verdict)",
        )
    ax.hlines(
        drawable.index,
        drawable["ci_low"],
        drawable["ci_high"],
        color="tab:orange",
        lw=1.2,
        zorder=2,
        label="unadjusted t interval (this row alone)",
    )
    sns.scatterplot(
        data=drawable.assign(row=drawable.index),
        x="difference",
        y="row",
        hue="verdict",
        palette=VERDICT_COLOURS,
        s=70,
        zorder=3,
        ax=ax,
    )
    ax.axvline(0, color="black", lw=0.8)
    if min_effect > 0:
        for edge in (-min_effect, min_effect):
            ax.axvline(edge, color="tab:orange", ls="--", lw=0.8)
    labels = [f"{row.intervention}\n{row.verdict} {row.difference:+.4f}" for row in rows.itertuples()]
    ax.set_yticks(rows.index, labels)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlabel(
        "test loss difference to baseline (negative = better)"
        + (f"; Holm intervals at per-row confidence >= {confidence}" if confidence else "")
    )
    ax.set_ylabel("")
    ax.set_title("Which intervention beats the baseline (verdict: Holm-adjusted p < alpha)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1))
    return _save(figure, path)


def noise_distributions(residuals: pd.DataFrame, path: Path) -> Path | None:
    """Deviations of single runs from their group mean, per noise kind."""
    finite = _finite(residuals, ["deviation"])
    if finite.empty:
        return None
    sns.set_theme(style="whitegrid")
    figure, ax = plt.subplots(figsize=(7, 4))
    sns.violinplot(data=finite, x="kind", y="deviation", inner=None, cut=0, color="0.92", ax=ax)
    sns.stripplot(data=finite, x="kind", y="deviation", hue="kind", legend=False, alpha=0.7, ax=ax)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xlabel("noise source")
    ax.set_ylabel("test loss - group mean")
    ax.set_title("test-loss noise by source")
    return _save(figure, path)
