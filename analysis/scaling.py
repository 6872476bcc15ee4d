"""Benchmark: time and peak memory of one analysis (analyse + report) as the number of arms and seeds grows.

``python -m analysis.scaling [arms=10000] [seeds=3] [resamples=9999]`` (``make bench-analysis``) analyses a synthetic
study of that many arms, each at that many init seeds, and prints seconds and peak resident memory; the measured
numbers are in docs/analysis.md.
"""

from __future__ import annotations

import resource
import sys
import tempfile
import time

from analysis.load import prepare_runs
from analysis.report import write_report
from analysis.study import Settings, analyse
from analysis.synthetic import PlantedIntervention, generate_study


def measure(arms: int, seeds: int, resamples: int = 9999) -> dict[str, float]:
    interventions = [PlantedIntervention(f"arm{i:05d}", 0.0) for i in range(arms)]
    study = generate_study(interventions, init_seeds=tuple(range(seeds)), train_seeds=("none",), baseline_repeats=1)
    start = time.perf_counter()
    study_runs = prepare_runs(study.runs, "scaling", "synthetic", study.histories)
    analysis = analyse(study_runs, Settings(n_resamples=resamples))
    analysed = time.perf_counter()
    with tempfile.TemporaryDirectory() as directory:
        write_report(analysis, directory)
    done = time.perf_counter()
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"analyse_s": analysed - start, "report_s": done - analysed, "total_s": done - start, "peak_mib": peak_mib}


def main(argv: list[str]) -> int:
    options = dict(argument.partition("=")[::2] for argument in argv)
    unknown = set(options) - {"arms", "seeds", "resamples"}
    if unknown:
        print(
            f"scaling: error: unknown key {sorted(unknown)[0]!r}; known keys: arms, seeds, resamples", file=sys.stderr
        )
        return 2
    arms, seeds = int(options.get("arms", 10_000)), int(options.get("seeds", 3))
    result = measure(arms, seeds, int(options.get("resamples", 9999)))
    print(f"{arms} arms x {seeds} seeds: " + ", ".join(f"{key} {value:.1f}" for key, value in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
