"""Write an analysis as Markdown, HTML, CSV and figures; log it to MLflow.

The report is a list of blocks (headings, paragraphs, tables, images) that
two small renderers turn into Markdown and HTML, so both say the same thing.
Losses and differences are shown with 6 decimals.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import plots
from analysis.load import mlflow_store
from analysis.noise import noise_table
from analysis.study import StudyAnalysis

LOSS_DECIMALS = 6


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


def ranking_display(ranking: pd.DataFrame) -> pd.DataFrame:
    """The ranking with formatted columns, as shown in the report."""
    return pd.DataFrame({
        "rank": ranking["rank"],
        "intervention": ranking["intervention"],
        "verdict": ranking["verdict"],
        "baseline loss": ranking["baseline_loss"].map(_number),
        "intervention loss": ranking["intervention_loss"].map(_number),
        "difference": ranking["difference"].map(_number),
        "CI (t)": _intervals(ranking["ci_low"], ranking["ci_high"]),
        "CI (bootstrap)": _intervals(ranking["boot_low"], ranking["boot_high"]),
        "p (Holm)": ranking["p_holm"].map(lambda p: _number(p, 4)),
        "P(better)": [f"{_number(p, 2)} {interval}" for p, interval in zip(
            ranking["p_better"],
            _intervals(ranking["p_better_low"], ranking["p_better_high"], 2), strict=True)],
        "noise ref (SD)": [f"{kind} ({_number(sd)})" for kind, sd in zip(
            ranking["noise_reference"], ranking["noise_sd"], strict=True)],
        "effect (SDs)": ranking["effect_in_sd"].map(lambda v: _number(v, 2)),
        "seeds for 80% power": ranking["seeds_needed"].map(_seeds),
        "design (seeds)": [f"{d} ({a}/{b})" for d, a, b in zip(
            ranking["design"], ranking["n_intervention_seeds"], ranking["n_baseline_seeds"],
            strict=True)],
    })


def ranking_text(ranking: pd.DataFrame) -> str:
    """Plain-text ranking for the terminal."""
    if ranking.empty:
        return "(no interventions besides the baseline)"
    shown = ranking_display(ranking).drop(columns=["CI (bootstrap)", "design (seeds)"])
    return shown.to_string(index=False)


def noise_display(analysis: StudyAnalysis) -> pd.DataFrame:
    return pd.DataFrame([{
        "noise": estimate.kind,
        "what varies": estimate.description,
        "SD": _number(estimate.sd),
        "CI": _interval(estimate.ci_low, estimate.ci_high),
        "runs": estimate.n_runs,
        "groups": estimate.n_groups,
        "dof": estimate.dof,
    } for estimate in analysis.noise.values()])


def _blocks(analysis: StudyAnalysis, figures: dict[str, Path], directory: Path) -> list[tuple]:
    settings, study_runs = analysis.settings, analysis.study_runs
    confidence = f"{1 - settings.alpha:.0%}"
    blocks = [
        ("h1", f"Noise analysis: {analysis.study}"),
        ("p", f"Source: {study_runs.source}. {len(study_runs.runs)} finished runs analysed, "
              f"{len(study_runs.excluded)} excluded. alpha = {settings.alpha}, minimum "
              f"meaningful effect = {settings.min_effect}; intervals are {confidence} "
              "confidence intervals."),
        ("h2", "Ranking"),
        ("p", "Difference = intervention - baseline test loss (negative = better). Paired "
              "t-test over init seeds where both arms share seed cells (differences averaged "
              "over the train seeds of each init seed), Welch on per-seed means otherwise. "
              "Verdict: better/worse when the Holm-adjusted p < alpha and "
              "|difference| >= the minimum effect, else inconclusive. The noise reference is "
              "train-seed noise when the intervention keeps the baseline's initial weights "
              "(same init_fingerprint), init-seed noise otherwise. P(better): probability "
              "that an intervention run beats a baseline run. Seeds for 80% power: seeds "
              "needed to resolve the observed difference against the reference noise."),
        ("table", ranking_display(analysis.ranking)),
        ("h3", "Noise reference per intervention"),
        ("table", analysis.ranking[["intervention", "noise_reference", "reference_reason"]]),
        ("h2", "Noise"),
        ("p", f"Pooled SDs (ddof=1) with {confidence} chi-square CIs."),
        ("table", noise_display(analysis)),
    ]
    if analysis.variance_components is not None:
        components = analysis.variance_components.assign(
            variance=lambda t: t["variance"].map(lambda v: _number(v, 8)),
            sd=lambda t: t["sd"].map(_number),
            share=lambda t: t["share"].map(lambda v: _number(v, 3)),
        )
        blocks += [("h3", "Variance components (grid)"), ("p", analysis.variance_note),
                   ("table", components)]
    if analysis.factorial is not None:
        fit = analysis.factorial
        effects = fit.effects.assign(
            estimate=fit.effects["estimate"].map(_number),
            ci=_intervals(fit.effects["ci_low"], fit.effects["ci_high"]),
            p_value=fit.effects["p_value"].map(lambda p: _number(p, 4)),
        ).drop(columns=["ci_low", "ci_high"])
        blocks += [
            ("h2", "Factorial effects"),
            ("p", f"OLS over {fit.n_runs} runs, factors {', '.join(fit.factors)} in effect "
                  f"coding; {'blocked by init seed; ' if fit.blocked_by_seed else ''}"
                  f"residual dof {fit.residual_dof}. Negative = lowers the loss."),
            ("table", effects),
        ]
    elif analysis.factorial_note:
        blocks += [("h2", "Factorial effects"), ("p", analysis.factorial_note)]
    if not study_runs.excluded.empty:
        blocks += [("h2", "Excluded runs"), ("table", study_runs.excluded)]
    if figures:
        blocks.append(("h2", "Figures"))
        blocks += [("image", path.relative_to(directory).as_posix(), caption)
                   for caption, path in figures.items()]
    return blocks


def _markdown_table(table: pd.DataFrame) -> str:
    def cell(value) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in table.columns) + " |",
             "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |"
              for row in table.itertuples(index=False)]
    return "\n".join(lines)


def render_markdown(blocks: list[tuple]) -> str:
    parts = []
    for kind, *content in blocks:
        if kind in ("h1", "h2", "h3"):
            parts.append("#" * int(kind[1]) + " " + content[0])
        elif kind == "p":
            parts.append(content[0])
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
        elif kind == "table":
            parts.append(content[0].to_html(index=False, escape=True, border=0))
        elif kind == "image":
            source, caption = map(html.escape, content)
            parts.append(f'<figure><img src="{source}" alt="{caption}">'
                         f"<figcaption>{caption}</figcaption></figure>")
    style = ("body{font-family:sans-serif;margin:2em;max-width:1400px}"
             "table{border-collapse:collapse;font-size:0.9em}"
             "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}"
             "img{max-width:100%}")
    body = "\n".join(parts)
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}"
            f"</title><style>{style}</style></head>\n<body>\n{body}\n</body></html>\n")


def write_figures(analysis: StudyAnalysis, directory: Path) -> dict[str, Path]:
    """Draw the figures into ``directory/figures``; captions map to paths."""
    folder = directory / "figures"
    drawn = {
        "Training loss per intervention": plots.training_curves(
            analysis.study_runs.histories, analysis.study_runs.runs, folder / "training_loss.png"),
        "Differences to baseline": plots.forest_plot(
            analysis.ranking, analysis.settings.min_effect, folder / "forest.png"),
        "Noise distributions": plots.noise_distributions(
            analysis.noise_residuals, folder / "noise.png"),
    }
    return {caption: path for caption, path in drawn.items() if path is not None}


def write_report(analysis: StudyAnalysis, directory: str | Path) -> ReportFiles:
    """Write report.md, report.html, ranking.csv, the other tables and figures."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    figures = write_figures(analysis, directory)
    blocks = _blocks(analysis, figures, directory)
    files = ReportFiles(directory, directory / "report.md", directory / "report.html",
                        directory / "ranking.csv", figures=list(figures.values()))
    files.markdown.write_text(render_markdown(blocks))
    files.html.write_text(render_html(blocks, f"Noise analysis: {analysis.study}"))
    analysis.ranking.to_csv(files.csv, index=False)
    tables = {
        "noise.csv": noise_table(analysis.noise),
        "variance_components.csv": analysis.variance_components,
        "factorial.csv": analysis.factorial.effects if analysis.factorial else None,
        "excluded.csv": analysis.study_runs.excluded,
    }
    for name, table in tables.items():
        if table is not None:
            table.to_csv(directory / name, index=False)
            files.tables.append(directory / name)
    return files


def log_analysis_run(analysis: StudyAnalysis, files: ReportFiles, tracking_uri: str,
                     experiment_id: str | None) -> str:
    """Log the report as an MLflow run tagged ``analysis=true``; returns its id."""
    ranking = analysis.ranking
    with mlflow_store(tracking_uri) as mlflow, mlflow.start_run(
        experiment_id=experiment_id, run_name=f"analysis-{analysis.study}"
    ) as run:
        mlflow.set_tags({"analysis": "true", "study": analysis.study})
        mlflow.log_params({**vars(analysis.settings), "source": analysis.study_runs.source})
        mlflow.log_metrics({
            "n_runs": len(analysis.study_runs.runs),
            "n_excluded": len(analysis.study_runs.excluded),
            **{f"n_{verdict}": int((ranking["verdict"] == verdict).sum())
               for verdict in ("better", "worse", "inconclusive")},
            **{f"noise_sd_{kind}": estimate.sd for kind, estimate in analysis.noise.items()
               if np.isfinite(estimate.sd)},
        })
        mlflow.log_artifacts(str(files.directory))
    return run.info.run_id
