"""Statistical analysis of intervention studies.

Reads the trial runs of a study (from MLflow or a CSV), measures the noise
sources (init seed, train seed, run-to-run repeats, checkpoint-to-checkpoint),
compares every intervention with the baseline against the matching noise
reference, and writes a ranking, a Markdown/HTML report, a CSV and figures.

Entry points: ``python -m analysis study=<name>`` (see ``analysis.__main__``),
:func:`analysis.study.analyse` and :func:`analysis.report.write_report`.
"""

from harness.paths import PROJECT_ROOT

__all__ = ["PROJECT_ROOT"]
