"""Statistical analysis of intervention studies.

Reads a study's trial runs (from MLflow or a CSV), measures the noise sources (init seed, train seed, repeats,
checkpoint to checkpoint), compares every intervention with the baseline against the matching noise reference,
and writes a ranking, a Markdown/HTML report, a CSV and figures. Entry points: ``python -m analysis study=<name>``,
:func:`analysis.study.analyse` and :func:`analysis.report.write_report`.
"""
