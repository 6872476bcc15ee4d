"""What `mlflow ui` shows of a study recorded in a real `mlflow server` on 127.0.0.1, read back through
MlflowClient: the experiment's kind and views, the study as one parent run reused by a later execution, its
trials and analysis nested under it, its verdicts in its description, tags and metrics."""

import re

import mlflow
import pytest

from harness.study import store as parents
from tests.conftest import MlflowServer
from tests.e2e.test_study_processes import run_sweep_in_process
from tests.unit.tracking.test_mlflow_ui import CPU, assert_marked


@pytest.fixture
def mlflow_server(tmp_path):
    server = MlflowServer(tmp_path).start()
    yield server.url
    server.kill()


def test_a_study_in_a_real_mlflow_server_reads_as_one_tree_with_its_verdicts(tmp_path, mlflow_server, monkeypatch):
    """`make sweep`, `make analyze`, `make sweep` again, against a real tracking server, read back through
    MlflowClient: kinds, nesting and names."""
    study = [
        "hydra.sweeper.arms=[baseline,no_dropout]",
        "hydra.sweeper.seeds=[1,2]",
        "tracking.system_metrics_interval=0.05",
        "hydra.sweeper.analyze=true",
        f"hydra.sweeper.report_dir={tmp_path / 'report'}",
    ]
    first = run_sweep_in_process(*study, sweep_dir=tmp_path / "first", uri=mlflow_server)
    assert first.returncode == 0, first.stdout + first.stderr
    # the study ends with its analysis: the verdict table in the terminal, no second command
    assert "[study quick] its analysis" in first.stdout and "logged analysis run" in first.stdout
    assert re.search(r"\n\s*1\s+no_dropout\s+(better|worse|inconclusive)\s", first.stdout), first.stdout
    again = run_sweep_in_process(*study, sweep_dir=tmp_path / "again", uri=mlflow_server)
    assert again.returncode == 0, again.stdout + again.stderr

    client = mlflow.MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("harness/smoke")
    assert_marked(experiment)
    assert {e.name for e in client.search_experiments()} == {"harness/smoke", "Default"}
    found = client.search_runs([experiment.experiment_id])
    [parent] = [r for r in found if r.data.tags.get("study_parent") == "true"]
    assert f"reusing parent run {parent.info.run_id} (FINISHED before)" in again.stdout
    assert "4 trials: 4 already FINISHED (skipped)" in again.stdout
    assert "no trial to run: every trial of the study FINISHED" in again.stdout and "all 0 trials" not in again.stdout
    assert f"nothing new ran; its analysis run {parent.data.tags['analysis_run_id']} stands" in again.stdout
    ui = f"{mlflow_server}/#/experiments/{experiment.experiment_id}/runs/{parent.info.run_id}?workflowType=machine_learning"
    assert f"in mlflow ui: {ui}" in first.stdout
    assert (parent.info.run_name, parent.info.status, parent.data.tags["executions"]) == (
        "study quick",
        "FINISHED",
        "2",
    )

    children = [r for r in found if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == len(found) - 1  # everything else is nested under the parent
    trials = [r for r in children if "config_hash" in r.data.tags]
    names = sorted(r.info.run_name for r in trials)
    assert [name.split()[:4] for name in names] == [
        ["quick:", "baseline", "s1", "smoke"],
        ["quick:", "baseline", "s2", "smoke"],
        ["quick:", "no_dropout", "s1", "smoke"],
        ["quick:", "no_dropout", "s2", "smoke"],
    ]
    for name in names:  # the overrides that change the computation, the command line's winning over the study's
        assert {"d_model=32", "max_steps=2"} <= set(name.split()) and "max_steps=40" not in name
    for run in trials:
        assert run.data.params["interventions"] == run.data.tags["intervention"] == run.info.run_name.split()[1]
        assert run.data.metrics["test_loss"] > 0 and CPU in run.data.metrics
    [analysis] = [r for r in children if r.data.tags.get("analysis") == "true"]
    assert analysis.info.run_name == "analysis quick" and parent.data.tags["analysis_run_id"] == analysis.info.run_id

    head, sections = parents.split_note(parent.data.tags["mlflow.note.content"])
    assert head.startswith("baseline, no_dropout and lr_schedule")  # the study's description
    assert f"Analysis run {analysis.info.run_id}" in sections["Verdicts"]
    [row] = [line for line in sections["Verdicts"].splitlines() if line.startswith("| no_dropout |")]
    assert re.search(r"\| (better|worse|inconclusive) \| -?\d\.\d{6} \| \[-?\d\.\d{6}, -?\d\.\d{6}\] \|", row), row
    assert "paired t over 2 init seeds" in row and "| 1.0 |" in row  # the method and its dof
    # the verdict where the runs table shows it: tags and metrics of the parent, and the forest plot beside them
    verdict = parent.data.tags["verdict/no_dropout"]
    assert re.fullmatch(
        r"(better|worse|inconclusive) [+-]\d\.\d{6} \[[+-]\d\.\d{6}, [+-]\d\.\d{6}\] Holm 95%, "
        r"paired t over 2 init seeds[^,]*, "
        r"1\.0 dof \(!\) thin evidence: 1\.0 dof < \d+; mean \d+\.\d{6}, SD \d\.\d{6}, n 2",
        verdict,
    ), verdict
    metrics = parent.data.metrics
    low, high = metrics["verdict/no_dropout/ci_low"], metrics["verdict/no_dropout/ci_high"]
    assert low <= metrics["verdict/no_dropout/difference"] <= high and metrics["verdict/no_dropout/dof"] == 1
    assert (low > 0 or high < 0) == (verdict.split()[0] != "inconclusive")  # the interval the verdict is decided on
    assert parent.data.tags["verdicts"].startswith("difference to baseline, Holm 95% interval: baseline: mean ")
    assert "forest.png" in {f.path for f in client.list_artifacts(parent.info.run_id)}
    assert sections["Trials"].count("| SKIPPED ") == 4  # the latest execution's table
