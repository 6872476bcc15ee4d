"""Write an analysis as Markdown, HTML, CSV and figures; log it to MLflow.

The report is a list of blocks (headings, paragraphs, tables, images) that
two small renderers turn into Markdown and HTML, so both say the same thing.
Losses and differences are shown with 6 decimals.
"""

from __future__ import annotations

import html
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import plots
from analysis.accuracy_report import accuracy_blocks, accuracy_tables
from analysis.load import AnalysisInputError, mlflow_store
from analysis.noise import noise_table
from analysis.stats import THIN_DOF
from analysis.study import StudyAnalysis

LOSS_DECIMALS = 6
MAX_LISTED_ARMS = 40  # a one-line note names at most this many interventions
MAX_FIGURE_ARMS = 40  # beyond this, one line or row per arm is unreadable: those figures are left out, with a note


@dataclass
class ReportFiles:
    directory: Path
    markdown: Path
    html: Path
    csv: Path
    tables: list[Path] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)


def _number(value, decimals: int = LOSS_DECIMALS) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.{decimals}f}"


def _interval(low, high, decimals: int = LOSS_DECIMALS) -> str:
    if not (np.isfinite(low) and np.isfinite(high)):
        return "n/a"
    return f"[{low:.{decimals}f}, {high:.{decimals}f}]"


def _intervals(lows, highs, decimals: int = LOSS_DECIMALS) -> list[str]:
    return [_interval(low, high, decimals) for low, high in zip(lows, highs, strict=True)]


def _seeds(value) -> str:
    if not np.isfinite(value):
        return "n/a" if np.isnan(value) else "> 10000"
    return str(int(value))


def _dof(value) -> str:
    return _number(value, 1)


def _p(value) -> str:
    return "<0.0001" if np.isfinite(value) and value < 1e-4 else _number(value, 4)


def ranking_display(ranking: pd.DataFrame) -> pd.DataFrame:
    """The ranking with formatted columns, as shown in the report."""
    return pd.DataFrame(
        {
            "rank": ranking["rank"],
            "intervention": ranking["intervention"],
            "verdict": ranking["verdict"],
            "baseline loss": ranking["baseline_loss"].map(_number),
            "intervention loss": ranking["intervention_loss"].map(_number),
            "difference": ranking["difference"].map(_number),
            "CI (Holm)": _intervals(ranking["holm_low"], ranking["holm_high"]),
            "CI (t)": _intervals(ranking["ci_low"], ranking["ci_high"]),
            "CI (bootstrap)": _intervals(ranking["boot_low"], ranking["boot_high"]),
            "p": ranking["p_value"].map(_p),
            "p (Holm)": ranking["p_holm"].map(_p),
            "method": ranking["method"],
            "dof": ranking["dof"].map(_dof),
            "P(better)": [
                f"{_number(p, 2)} {interval}"
                for p, interval in zip(
                    ranking["p_better"], _intervals(ranking["p_better_low"], ranking["p_better_high"], 2), strict=True
                )
            ],
            "noise ref (SD)": [
                f"{kind} ({_number(sd)})"
                for kind, sd in zip(ranking["noise_reference"], ranking["noise_sd"], strict=True)
            ],
            "effect (SDs)": ranking["effect_in_sd"].map(lambda v: _number(v, 2)),
            "seeds for 80% power": ranking["seeds_needed"].map(_seeds),
            "baseline runs": ranking["baseline_runs"],
            "warning": ranking["warning"].fillna("").map(lambda text: f"(!) {text}" if text else ""),
        }
    )


def thin_evidence_note(ranking: pd.DataFrame) -> str:
    """A warning naming the rows that rest on fewer than THIN_DOF dof, or ''."""
    thin = ranking[ranking["thin_evidence"].astype(bool)]
    if thin.empty:
        return ""
    listed = ", ".join(
        f"{row.intervention} ({row.warning.removeprefix('thin evidence: ')})"
        for row in thin.head(MAX_LISTED_ARMS).itertuples()
    )
    if len(thin) > MAX_LISTED_ARMS:
        listed += f" and {len(thin) - MAX_LISTED_ARMS} more (ranking.csv: thin_evidence)"
    return (
        f"(!) Thin evidence: {len(thin)} of {len(ranking)} verdicts rest on fewer than "
        f"{THIN_DOF} degrees of freedom: {listed}. Such a verdict can move with one more run; "
        "add init seeds (or train seeds, for train-seed noise) before trusting it."
    )


def ranking_text(ranking: pd.DataFrame) -> str:
    """Plain-text ranking for the terminal."""
    if ranking.empty:
        return "(no interventions besides the baseline)"
    shown = ranking_display(ranking).drop(columns=["intervention loss", "CI (t)", "CI (bootstrap)", "P(better)"])
    note = thin_evidence_note(ranking)
    return shown.to_string(index=False) + (f"\n{note}" if note else "")


def noise_display(analysis: StudyAnalysis) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "noise": estimate.kind,
                "what varies": estimate.description,
                "SD": _number(estimate.sd),
                "CI": _interval(estimate.ci_low, estimate.ci_high),
                "runs": estimate.n_runs,
                "groups": estimate.n_groups,
                "dof": _dof(estimate.dof),
                "nominal dof": estimate.nominal_dof,
            }
            for estimate in analysis.noise.values()
        ]
    )


def noise_levels_display(levels: pd.DataFrame) -> pd.DataFrame:
    return levels.assign(
        mean=levels["mean"].map(_number),
        sd=levels["sd"].map(_number),
        population_sd=levels["population_sd"].map(_number),
    ).rename(columns={"sd": "SD (ddof=1)", "population_sd": "population SD (ddof=0)"})


METHODS_TEXT = (
    "How each intervention is compared. Difference = intervention - baseline test loss "
    "(negative = better). An intervention judged against train-seed noise (it keeps the "
    "baseline's initial weights) is only compared with baseline runs at the same init seed and "
    "data seed, pairing exact (seed, train seed) cells first; other init seeds are never "
    "averaged in. With at least two such init seeds, 'paired t': a t-test over init seeds of the "
    "per-seed differences (dof = seeds - 1). With fewer, 'prediction t', the principled form of "
    "the seeds' 3-SD rule: t = (mean of the intervention's m runs - mean of the n matching "
    "baseline runs) / (SD * sqrt(1/m + 1/n)), with SD the pooled noise SD of the reference and "
    "the dof of that estimate. For train-seed noise the matching baseline runs are the "
    "baseline's train seeds at the same init seed; for init-seed noise (the intervention draws "
    "its own initial weights) they are the baseline's init seeds at the intervention's "
    "train-seed level, each a fresh draw of initial weights as the intervention's run is. "
    "'Welch t' compares per-seed means when nothing can be paired. p-values are Holm-adjusted "
    "across all rows, whatever their method. 'CI (Holm)' is the interval the verdict is decided on: the t "
    "interval at confidence 1 - alpha x p / p (Holm), which excludes zero exactly when the Holm-adjusted p is "
    "below alpha; 'CI (t)' is the unadjusted interval of the row alone."
)
VERDICTS_TEXT = (
    "Verdict: 'better' ('worse') when the Holm-adjusted p < alpha and the difference is at least "
    "the minimum effect below (above) zero: the difference is resolved against the noise of the "
    "whole study. 'inconclusive' otherwise: not shown to differ, which is not the same as shown "
    "equal (read the interval). The noise reference is declared in the intervention registry if "
    "it says so, else train-seed noise when the intervention's init_fingerprint equals the "
    "baseline's, else init-seed noise; the 'rule' column says which decided. P(better): "
    "probability that a fresh intervention run beats a fresh baseline run. Seeds for 80% power: "
    "init seeds (one run per arm each, paired where the initial weights are shared) needed to "
    "resolve the observed difference against the reference noise."
)


def _noise_text(analysis: StudyAnalysis, confidence: str) -> str:
    return (
        f"Pooled SDs of a single run (ddof=1) with {confidence} chi-square CIs. Train-seed noise "
        "pools the spread over train seeds within each init seed; init-seed noise pools the "
        "spread over init seeds within each train-seed level, so both use every run with a "
        "partner. Init-seed levels re-use the same initial weights (seed 42 at two train seeds "
        "starts from the same draw), so their residuals are not independent: the init dof "
        "count each distinct init draw once (the conservative end of Satterthwaite's effective "
        "dof; 'nominal dof' counts every residual). The levels behind each pooled SD are listed "
        "below; population SD (ddof=0) is what a hand calculation over n runs gives "
        "(SD = population SD x sqrt(n / (n - 1)))."
    )


def _blocks(analysis: StudyAnalysis, figures: dict[str, Path], directory: Path) -> list[tuple]:
    settings, study_runs = analysis.settings, analysis.study_runs
    confidence = f"{1 - settings.alpha:.0%}"
    ranking = analysis.ranking
    blocks = [
        ("h1", f"Noise analysis: {analysis.study}"),
        (
            "p",
            f"Source: {study_runs.source}. {len(study_runs.runs)} finished runs analysed, "
            f"{len(study_runs.excluded)} excluded. alpha = {settings.alpha}, minimum "
            f"meaningful effect = {settings.min_effect}; intervals are {confidence} "
            "confidence intervals.",
        ),
        ("h2", "Ranking"),
    ]
    blocks += [("warning", warning) for warning in study_runs.warnings]
    note = thin_evidence_note(ranking)
    if note:
        blocks.append(("warning", note))
    blocks += [
        ("table", ranking_display(ranking)),
        ("p", METHODS_TEXT),
        ("p", VERDICTS_TEXT),
        ("h3", "Runs and noise reference per intervention"),
        (
            "table",
            ranking[
                [
                    "intervention",
                    "method",
                    "dof",
                    "intervention_runs",
                    "baseline_runs",
                    "noise_reference",
                    "reference_rule",
                    "reference_reason",
                ]
            ]
            .assign(dof=ranking["dof"].map(_dof))
            .rename(columns={"reference_rule": "rule"}),
        ),
        ("h2", "Noise"),
        ("p", _noise_text(analysis, confidence)),
        ("table", noise_display(analysis)),
    ]
    if not analysis.noise_levels.empty:
        blocks += [("h3", "Levels behind the pooled SDs"), ("table", noise_levels_display(analysis.noise_levels))]
    if analysis.variance_components is not None:
        components = analysis.variance_components.assign(
            variance=lambda t: t["variance"].map(lambda v: _number(v, 8)),
            sd=lambda t: t["sd"].map(_number),
            share=lambda t: t["share"].map(lambda v: _number(v, 3)),
        )
        blocks += [
            ("h3", "Variance components (grid)"),
            (
                "p",
                f"{analysis.variance_note}. The init component is the init-seed part "
                "alone; the pooled init SD above is a single run's SD across init "
                "seeds, train noise included.",
            ),
            ("table", components),
        ]
    if analysis.factorial is not None:
        fit = analysis.factorial
        effects = fit.effects.assign(
            estimate=fit.effects["estimate"].map(_number),
            ci=_intervals(fit.effects["ci_low"], fit.effects["ci_high"]),
            p_value=fit.effects["p_value"].map(lambda p: _number(p, 4)),
        ).drop(columns=["ci_low", "ci_high"])
        blocks += [
            ("h2", "Factorial effects"),
            (
                "p",
                f"OLS over {fit.n_runs} runs, factors {', '.join(fit.factors)} in effect "
                f"coding; {'blocked by init seed; ' if fit.blocked_by_seed else ''}"
                f"residual dof {fit.residual_dof}. Negative = lowers the loss.",
            ),
            ("table", effects),
        ]
    elif analysis.factorial_note:
        blocks += [("h2", "Factorial effects"), ("p", analysis.factorial_note)]
    blocks += accuracy_blocks(analysis.accuracy, settings.alpha)
    if not study_runs.excluded.empty:
        blocks += [("h2", "Excluded runs"), ("table", study_runs.excluded)]
    if len(ranking) > MAX_FIGURE_ARMS:
        blocks += [
            ("h2", "Figures"),
            (
                "p",
                f"{len(ranking)} interventions: the training-loss and forest figures (one line or row per "
                f"intervention) are drawn only up to {MAX_FIGURE_ARMS}; ranking.csv holds every row.",
            ),
        ]
    elif figures:
        blocks.append(("h2", "Figures"))
    if figures:
        blocks += [("image", path.relative_to(directory).as_posix(), caption) for caption, path in figures.items()]
    return blocks


def _markdown_table(table: pd.DataFrame) -> str:
    def cell(value) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def render_markdown(blocks: list[tuple]) -> str:
    parts = []
    for kind, *content in blocks:
        if kind in ("h1", "h2", "h3"):
            parts.append("#" * int(kind[1]) + " " + content[0])
        elif kind == "p":
            parts.append(content[0])
        elif kind == "warning":
            parts.append(f"> **{content[0]}**")
        elif kind == "table":
            parts.append(_markdown_table(content[0]))
        elif kind == "image":
            parts.append(f"![{content[1]}]({content[0]})")
    return "\n\n".join(parts) + "\n"


def render_html(blocks: list[tuple], title: str) -> str:
    parts = []
    for kind, *content in blocks:
        if kind in ("h1", "h2", "h3"):
            parts.append(f"<{kind}>{html.escape(content[0])}</{kind}>")
        elif kind == "p":
            parts.append(f"<p>{html.escape(content[0])}</p>")
        elif kind == "warning":
            parts.append(f'<p class="warning"><strong>{html.escape(content[0])}</strong></p>')
        elif kind == "table":
            parts.append(content[0].to_html(index=False, escape=True, border=0))
        elif kind == "image":
            source, caption = map(html.escape, content)
            parts.append(f'<figure><img src="{source}" alt="{caption}"><figcaption>{caption}</figcaption></figure>')
    style = (
        "body{font-family:sans-serif;margin:2em;max-width:1400px}"
        "table{border-collapse:collapse;font-size:0.9em}"
        "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}"
        "img{max-width:100%}"
        ".warning{background:#fff3cd;border-left:4px solid #d39e00;padding:6px 10px}"
    )
    body = "\n".join(parts)
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}'
        f"</title><style>{style}</style></head>\n<body>\n{body}\n</body></html>\n"
    )


def write_figures(analysis: StudyAnalysis, directory: Path) -> dict[str, Path]:
    """Draw the figures into ``directory/figures``; captions map to paths."""
    folder = directory / "figures"
    drawn = {"Noise distributions": plots.noise_distributions(analysis.noise_residuals, folder / "noise.png")}
    if len(analysis.ranking) <= MAX_FIGURE_ARMS:
        drawn = {
            "Training loss per intervention": plots.training_curves(
                analysis.study_runs.histories, analysis.study_runs.runs, folder / "training_loss.png"
            ),
            "Differences to baseline": plots.forest_plot(
                analysis.ranking, analysis.settings.min_effect, folder / "forest.png"
            ),
        } | drawn
    return {caption: path for caption, path in drawn.items() if path is not None}


def write_report(analysis: StudyAnalysis, directory: str | Path, reports_root: Path | None = None) -> ReportFiles:
    """Write report.md, report.html, ranking.csv, the other tables and figures.

    With ``reports_root`` the directory must resolve (links followed) to a folder directly inside it.
    """
    directory = Path(directory)
    if reports_root is not None and directory.resolve().parent != reports_root.resolve():
        raise AnalysisInputError(
            f"report directory {directory} resolves to {directory.resolve()}, outside {reports_root}; "
            f"only a folder directly inside {reports_root} is allowed"
        )
    directory.mkdir(parents=True, exist_ok=True)
    figures = write_figures(analysis, directory)
    blocks = _blocks(analysis, figures, directory)
    files = ReportFiles(
        directory,
        directory / "report.md",
        directory / "report.html",
        directory / "ranking.csv",
        figures=list(figures.values()),
    )
    files.markdown.write_text(render_markdown(blocks))
    files.html.write_text(render_html(blocks, f"Noise analysis: {analysis.study}"))
    analysis.ranking.to_csv(files.csv, index=False)
    tables = {
        "noise.csv": noise_table(analysis.noise),
        "noise_levels.csv": analysis.noise_levels,
        "variance_components.csv": analysis.variance_components,
        "factorial.csv": analysis.factorial.effects if analysis.factorial else None,
        "excluded.csv": analysis.study_runs.excluded,
        **accuracy_tables(analysis.accuracy),
    }
    for name, table in tables.items():
        if table is not None:
            table.to_csv(directory / name, index=False)
            files.tables.append(directory / name)
    return files


def verdicts_markdown(analysis: StudyAnalysis, run_id: str) -> str:
    """The verdict table for the study parent's description: each verdict with its interval, method and dof."""
    ranking, settings = analysis.ranking, analysis.settings
    confidence = f"{1 - settings.alpha:.0%}"
    head = (
        f"{len(analysis.study_runs.runs)} runs analysed ({len(analysis.study_runs.excluded)} excluded), "
        f"alpha {settings.alpha}, minimum effect {settings.min_effect}; difference = intervention - "
        f"baseline test loss (negative = better), with its Holm-adjusted interval (the one the verdict is "
        f"decided on; {confidence} family-wise). Analysis run {run_id} holds the report (report.md, report.html, "
        "figures); forest.png here draws the intervals."
    )
    if ranking.empty:
        return head + "\n\n(no interventions besides the baseline)"
    shown = ranking_display(ranking)[
        ["intervention", "verdict", "difference", "CI (Holm)", "p (Holm)", "method", "dof", "warning"]
    ]
    note = thin_evidence_note(ranking)
    return "\n\n".join(filter(None, [head, _markdown_table(shown), note and f"**{note}**"]))


def log_analysis_run(
    analysis: StudyAnalysis,
    files: ReportFiles,
    tracking_uri: str,
    experiment_id: str | None,
    parent_run_id: str | None = None,
) -> str:
    """Log the report as an MLflow run tagged ``analysis=true``; returns its id. With ``parent_run_id`` (the
    study's parent run) it is nested under the parent, and the parent's description gets its verdicts."""
    ranking = analysis.ranking
    with (
        mlflow_store(tracking_uri) as mlflow,
        mlflow.start_run(
            experiment_id=experiment_id,
            run_name=f"analysis {analysis.study}",
            tags={"mlflow.parentRunId": parent_run_id} if parent_run_id else None,
        ) as run,
    ):
        thin = analysis.thin_evidence
        mlflow.set_tags(
            {
                "analysis": "true",
                "study": analysis.study,
                "thin_evidence": str(bool(thin)).lower(),
                "thin_evidence_interventions": ", ".join(thin) or "none",
            }
        )
        mlflow.log_params({**vars(analysis.settings), "source": analysis.study_runs.source})
        mlflow.log_metrics(
            {
                "n_runs": len(analysis.study_runs.runs),
                "n_excluded": len(analysis.study_runs.excluded),
                **{
                    f"n_{verdict}": int((ranking["verdict"] == verdict).sum())
                    for verdict in ("better", "worse", "inconclusive")
                },
                "n_thin_evidence": len(thin),
                **{
                    f"noise_{stat}_{kind}": value
                    for kind, estimate in analysis.noise.items()
                    if np.isfinite(estimate.sd)
                    for stat, value in (("sd", estimate.sd), ("dof", estimate.dof))
                },
            }
        )
        mlflow.log_artifacts(str(files.directory))
    if parent_run_id:
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        from harness.study.store import write_note

        client = MlflowClient(tracking_uri)
        write_note(client, parent_run_id, Verdicts=verdicts_markdown(analysis, run.info.run_id))
        client.set_tag(parent_run_id, "analysis_run_id", run.info.run_id)
        for key, value in verdict_tags(analysis).items():
            client.set_tag(parent_run_id, key, value)
        client.log_batch(
            parent_run_id,
            metrics=[
                Metric(key, value, int(time.time() * 1000), 0) for key, value in verdict_metrics(analysis).items()
            ],
        )
        forest = files.directory / "figures" / "forest.png"
        if forest.is_file():
            client.log_artifact(parent_run_id, str(forest))
    return run.info.run_id


def metric_arm(intervention: str) -> str:
    """An arm's name as MLflow allows it in a metric or tag key: `a+b` becomes `a and b`."""
    return intervention.replace("+", " and ")


def _signed(value: float) -> str:
    return "n/a" if not np.isfinite(value) else f"{value:+.{LOSS_DECIMALS}f}"


def arm_summaries(analysis: StudyAnalysis) -> dict[str, str]:
    """Per arm (baseline included), `mean 7.340000, SD 0.012000, n 2` of its analysed runs' test losses."""
    losses = analysis.study_runs.runs.groupby("intervention")["test_loss"]
    return {
        arm: f"mean {_number(mean)}, SD {_number(sd)}, n {n}"
        for arm, mean, sd, n in zip(losses.mean().index, losses.mean(), losses.std(ddof=1), losses.count(), strict=True)
    }


def verdict_tags(analysis: StudyAnalysis) -> dict[str, str]:
    """Tags for the parent run, readable as columns of the runs table. `verdict/<arm>`: `better -0.012345
    [-0.020000, -0.004000] Holm 95%, paired t, 4.0 dof; mean …, SD …, n …`; `verdicts`: every arm's verdict,
    difference and interval, the baseline's mean, SD and n first."""
    confidence = f"{1 - analysis.settings.alpha:.0%}"
    summaries = arm_summaries(analysis)
    tags, parts = {}, []
    baseline = [arm for arm in summaries if arm not in set(analysis.ranking["intervention"])]
    parts += [f"{arm}: {summaries[arm]}" for arm in baseline]
    for row in analysis.ranking.itertuples():
        interval = (
            f"[{_signed(row.holm_low)}, {_signed(row.holm_high)}]" if np.isfinite(row.holm_low) else "no interval"
        )
        thin = f" (!) {row.warning}" if row.warning else ""
        verdict = f"{row.verdict} {_signed(row.difference)} {interval}"
        tags[f"verdict/{metric_arm(row.intervention)}"] = (
            f"{verdict} Holm {confidence}, {row.method}, {_dof(row.dof)} dof{thin}; {summaries.get(row.intervention, '')}"
        )
        parts.append(
            f"{row.intervention}: {verdict} ({_dof(row.dof)} dof{thin}; {summaries.get(row.intervention, '')})"
        )
    tags["verdicts"] = (
        f"difference to baseline, Holm {confidence} interval: " + " | ".join(parts)
        if len(analysis.ranking)
        else "no interventions besides the baseline"
    )
    return tags


def verdict_metrics(analysis: StudyAnalysis) -> dict[str, float]:
    """Per arm, `verdict/<arm>/difference`, `…/ci_low`, `…/ci_high` (the Holm-adjusted interval), `…/dof`; the
    finite ones (MLflow stores no NaN the runs table can sort)."""
    metrics = {}
    for row in analysis.ranking.itertuples():
        for name, value in (
            ("difference", row.difference),
            ("ci_low", row.holm_low),
            ("ci_high", row.holm_high),
            ("dof", row.dof),
        ):
            if np.isfinite(value):
                metrics[f"verdict/{metric_arm(row.intervention)}/{name}"] = float(value)
    return metrics
