"""The report's HellaSwag part: the verdicts on accuracy beside the loss's, each arm's binomial SE, the paired test
on the same examples, and the interventions whose two metrics disagree in direction (blocks for analysis.report).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.accuracy import AccuracyAnalysis

ACCURACY_DECIMALS = 4


def _number(value, decimals: int = ACCURACY_DECIMALS) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.{decimals}f}"


def _interval(low, high) -> str:
    return f"[{_number(low)}, {_number(high)}]" if np.isfinite(low) and np.isfinite(high) else "n/a"


def _p(value) -> str:
    return "<0.0001" if np.isfinite(value) and value < 1e-4 else _number(value)


def accuracy_display(accuracy: AccuracyAnalysis) -> pd.DataFrame:
    """The accuracy ranking as shown: seed-noise verdicts, differences = intervention − baseline (positive = better)."""
    ranking = accuracy.ranking
    return pd.DataFrame(
        {
            "rank": ranking["rank"],
            "intervention": ranking["intervention"],
            "verdict": ranking["verdict"],
            f"baseline {accuracy.metric}": ranking["baseline_score"].map(_number),
            f"intervention {accuracy.metric}": ranking["intervention_score"].map(_number),
            "difference": ranking["difference"].map(_number),
            "CI (t, seed noise)": [_interval(a, b) for a, b in zip(ranking["ci_low"], ranking["ci_high"], strict=True)],
            "p (Holm)": ranking["p_holm"].map(_p),
            "method": ranking["method"],
            "dof": ranking["dof"].map(lambda v: _number(v, 1)),
            "noise ref (SD)": [
                f"{kind} ({_number(sd)})"
                for kind, sd in zip(ranking["noise_reference"], ranking["noise_sd"], strict=True)
            ],
            "warning": ranking["warning"].fillna("").map(lambda text: f"(!) {text}" if text else ""),
        }
    )


def sampling_display(sampling: pd.DataFrame) -> pd.DataFrame:
    """Each arm's binomial SE over the examples, and the paired test on the same examples against the baseline."""
    column = lambda name: sampling[name] if name in sampling else pd.Series(np.nan, index=sampling.index)  # noqa: E731
    return pd.DataFrame(
        {
            "intervention": sampling["intervention"],
            "examples": column("examples").map(lambda v: _number(v, 0)),
            "intervention (binomial SE)": [
                f"{_number(a)} ({_number(se)})"
                for a, se in zip(sampling["intervention_score"], sampling["intervention_se"], strict=True)
            ],
            "baseline (binomial SE)": [
                f"{_number(a)} ({_number(se)})"
                for a, se in zip(sampling["baseline_score"], sampling["baseline_se"], strict=True)
            ],
            "SE, unpaired": sampling["independent_se"].map(_number),
            "paired difference (SE)": [
                f"{_number(d)} ({_number(se)})"
                for d, se in zip(column("paired_difference"), column("paired_se"), strict=True)
            ],
            "paired CI": [
                _interval(a, b) for a, b in zip(column("paired_ci_low"), column("paired_ci_high"), strict=True)
            ],
            "paired p": column("paired_p_value").map(_p),
            "paired dof": column("paired_dof").map(lambda v: _number(v, 0)),
            "McNemar (only int. / only base., p)": [
                f"{int(a)} / {int(b)}, {_p(p)}" if np.isfinite(p) else "n/a (several runs per arm)"
                for a, b, p in zip(
                    column("mcnemar_only_intervention").fillna(0),
                    column("mcnemar_only_baseline").fillna(0),
                    column("mcnemar_p_value"),
                    strict=True,
                )
            ],
            "paired method": sampling["paired_method"],
        }
    )


def disagreement_note(accuracy: AccuracyAnalysis) -> str:
    """A warning naming the interventions that the two metrics move in opposite directions, or ''."""
    agreement = accuracy.agreement
    disagree = agreement[agreement["disagree"]]
    if disagree.empty:
        return ""
    listed = ", ".join(
        f"{row.intervention} (loss {row.direction_loss}, {accuracy.metric} {row.direction_accuracy}"
        f"{'; both verdicts resolved, in opposite directions' if row.verdicts_conflict else ''})"
        for row in disagree.itertuples()
    )
    return f"(!) The metrics disagree in direction for {len(disagree)} of {len(agreement)} interventions: {listed}."


def accuracy_text(accuracy: AccuracyAnalysis) -> str:
    """Plain-text accuracy ranking for the terminal."""
    if accuracy.ranking.empty:
        return "(no interventions besides the baseline)"
    shown = accuracy_display(accuracy).drop(columns=["noise ref (SD)"])
    note = disagreement_note(accuracy)
    return (
        f"verdicts on {accuracy.metric} (positive difference = better)\n"
        + shown.to_string(index=False)
        + (f"\n{note}" if note else "")
    )


def accuracy_blocks(accuracy: AccuracyAnalysis | None, alpha: float) -> list[tuple]:
    """The report's HellaSwag section (nothing when no run is scored on it)."""
    if accuracy is None:
        return []
    confidence = f"{1 - alpha:.0%}"
    blocks = [
        ("h2", f"HellaSwag ({accuracy.metric})"),
        (
            "p",
            f"The same verdicts as for the test loss, on {accuracy.metric} (higher is better): difference = "
            f"intervention - baseline, positive = better, with its {confidence} CI from seed noise (the same "
            "designs, noise estimates, Holm adjustment and dof rules as the loss; the comparison runs on the "
            "negative accuracy and is turned back). The minimum meaningful effect is 0 here (min_effect is in loss "
            "units).",
        ),
    ]
    note = disagreement_note(accuracy)
    if note:
        blocks.append(("warning", note))
    blocks.append(("table", accuracy_display(accuracy)))
    blocks += [
        ("h3", "Sampling noise of the examples (separate from seed noise)"),
        (
            "p",
            "Each arm's binomial SE sqrt(p(1 - p)/n) over its n examples: how much the score of fixed weights would "
            "move on another draw of examples. 'SE, unpaired' combines two arms' SEs as if scored on different "
            "examples. Both arms answer the same examples, so the paired test is tighter: a paired t-test over the "
            "examples of the difference in correctness (each arm averaged over its runs; dof = examples - 1) and, "
            "with one run per arm, the exact McNemar test on the examples only one model gets right. These "
            "intervals say whether the difference between these trained models is beyond the examples' sampling; "
            "the seed-noise verdicts above say whether it would survive retraining.",
        ),
        ("table", sampling_display(accuracy.sampling)),
        ("h3", "The two metrics side by side"),
        ("table", accuracy.agreement),
    ]
    if accuracy.unscored:
        blocks.append(
            (
                "p",
                f"{len(accuracy.unscored)} analysed runs have no {accuracy.metric} and are left out of this section: "
                f"{', '.join(accuracy.unscored)}; score them with `python -m harness evaluate RUN_DIR hellaswag=true`.",
            )
        )
    return blocks


def accuracy_tables(accuracy: AccuracyAnalysis | None) -> dict[str, pd.DataFrame]:
    if accuracy is None:
        return {}
    return {
        f"ranking_{accuracy.metric}.csv": accuracy.ranking,
        f"sampling_{accuracy.metric}.csv": accuracy.sampling,
        "metric_agreement.csv": accuracy.agreement,
    }
