"""What `mlflow ui` shows: an experiment per scale marked as model training, with saved views of the runs table;
runs named by intervention, seeds and scale; system metrics beside the trial's own; a study as one parent run
(reused by later executions of the same plan) with its trials and analyses nested under it and its verdicts in
its description. Real MLflow on sqlite stores; a real `mlflow server`: tests/e2e/test_mlflow_server_ui.py."""

import json
import threading
import time

import mlflow

from analysis.__main__ import main as analysis_main
from analysis.synthetic import PlantedIntervention, generate_study, log_study_to_mlflow
from harness.study import store as parents
from harness.study.design import StudyConf, TrialSpec
from harness.study.outcomes import PlannedTrial
from harness.study.store import StudyStore
from harness.tracking.store import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, VIEW_TAG_PREFIX, VIEWS
from harness.tracking.tracker import SYSTEM_PREFIX, Tracker
from harness.trial import checkpoint
from harness.trial.trainer import Trial as TrainingTrial
from tests.conftest import TINY, compose_config

CPU = SYSTEM_PREFIX + "cpu_utilization_percentage"


def test_each_scale_has_its_own_experiment_unless_one_is_named():
    assert compose_config().tracking.experiment == "harness/smoke"
    assert compose_config("scale=proxy").tracking.experiment == "harness/proxy"
    assert compose_config("scale=gpt2_small").tracking.experiment == "harness/gpt2_small"
    assert compose_config("scale=proxy", "tracking.experiment=mine").tracking.experiment == "mine"


def assert_marked(experiment) -> None:
    """Kind, saved views, and a description linking to them, as the UI reads them."""
    tags = experiment.tags
    assert tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"
    for key in VIEWS:
        view = json.loads(tags[VIEW_TAG_PREFIX + key])
        assert view["selectedColumns"][0] == "tags.`study`"  # no row reads without its study
        assert "study_parent" in view.get("searchFilter", "") or view["groupBy"]["groupByKeys"][0]["groupByData"] == (
            "study"
        )
        link = f"#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={key}"
        assert f"]({link})" in tags["mlflow.note.content"]


def test_a_trial_reads_in_the_ui_and_its_system_metrics_change_nothing(tracking_uri, tmp_path):
    """Two trials of one computation, with and without system metrics: the same weights and test loss."""
    overrides = [*TINY, "trainer.max_steps=2", "+intervention=no_dropout", "seed=7", "train_seed=3"]
    with_metrics = compose_config(*overrides, "tracking.system_metrics_interval=0.05")
    without = compose_config(*overrides, "tracking.system_metrics=false")
    results = [TrainingTrial(cfg, tmp_path / name).run() for cfg, name in ((with_metrics, "on"), (without, "off"))]
    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("harness/smoke")
    assert_marked(experiment)
    on, off = (client.get_run(r["run_id"]) for r in results)
    for run in (on, off):
        assert run.info.run_name == "no_dropout s7 t3 smoke"
        assert run.data.params["interventions"] == "no_dropout" and run.data.tags["intervention"] == "no_dropout"
        assert run.info.experiment_id == experiment.experiment_id
    steps = [m.step for m in client.get_metric_history(on.info.run_id, CPU)]
    assert steps == list(range(len(steps))) and steps, steps
    assert SYSTEM_PREFIX + "system_memory_usage_megabytes" in on.data.metrics
    assert not [key for key in off.data.metrics if key.startswith(SYSTEM_PREFIX)]
    assert on.data.metrics["test_loss"] == off.data.metrics["test_loss"]
    weights = [
        checkpoint.read_manifest(checkpoint.find(tmp_path / name))["files"]["model.safetensors"]["sha256"]
        for name in ("on", "off")
    ]
    assert weights[0] == weights[1]


def test_system_metrics_go_through_the_queue_and_continue_after_a_resume(tracking_uri):
    tracker = Tracker(tracking_uri, "harness/smoke", system_metrics_interval=0.05)
    run_id = tracker.start("sampled", {}, {})
    time.sleep(0.5)
    tracker.end("FINISHED")
    first = [m.step for m in tracker.client.get_metric_history(run_id, CPU)]
    resumed = Tracker(tracking_uri, "harness/smoke", system_metrics_interval=0.05)
    resumed.resume(run_id)
    time.sleep(0.5)
    resumed.end("FINISHED")
    steps = [m.step for m in resumed.client.get_metric_history(run_id, CPU)]
    assert (
        len(first) >= 3
        and steps[: len(first)] == first
        and steps == list(range(len(steps)))
        and len(steps) > len(first)
    )
    time.sleep(0.3)  # nothing is sampled once a run has ended
    assert len(resumed.client.get_metric_history(run_id, CPU)) == len(steps)


def test_a_parent_is_reused_only_by_an_execution_of_the_same_plan_once_it_has_ended(tracking_uri):
    conf = StudyConf(description="two seeds", arms=["baseline"], seeds=[1, 2])
    plan = [PlannedTrial(TrialSpec((), seed, None), [], f"h{seed}") for seed in (1, 2)]

    def start(trials=plan, version="v1"):
        store = StudyStore(tracking_uri, "harness/smoke", "mine", heartbeat_interval=30, code_version=version)
        return store, store.start_parent(conf, trials, [], "basic", "multirun/x", "")

    def end(store, run_id):
        store.stop_heartbeat()
        store.end_parent(run_id, conf, [], "| trial |\n|---|\n| baseline-s1 |", "FINISHED", "")

    first, parent = start()
    client = first.client
    child = client.create_run(first.experiment_id, tags={"study": "mine", "mlflow.parentRunId": parent}).info.run_id
    client.set_terminated(child, "FINISHED")
    end(first, parent)
    parents.write_note(client, parent, Verdicts="| intervention | verdict |\n|---|---|\n| x | better |")

    again, reused = start()  # the same trials and code: the ended parent, RUNNING again
    assert reused == parent and again.execution_number == 2
    run = client.get_run(parent)
    assert run.info.status == "RUNNING" and run.data.tags[parents.EXECUTIONS_TAG] == "2"
    assert again.children(parent) == []  # the first execution's trial is not this one's
    beside, other = start()  # a parent in use is never taken over
    assert other != parent
    end(beside, other)
    end(again, parent)
    note = client.get_run(parent).data.tags["mlflow.note.content"]
    assert note.startswith("two seeds") and "### Verdicts" in note and "| x | better |" in note  # kept
    assert note.index("### Verdicts") < note.index("### Trials")

    changed = [PlannedTrial(TrialSpec((), 3, None), [], "h3"), *plan]
    assert start(trials=changed)[1] not in (parent, other)  # another plan: a parent of its own
    assert start(version="v2")[1] not in (parent, other)  # other code: its trials run again, under a new parent

    # Two executions picking the same ended parent at the same moment: one keeps it, the other starts its own.
    newest = max((client.get_run(i) for i in (parent, other)), key=lambda r: r.info.start_time).info.run_id
    picked = []
    racers = [threading.Thread(target=lambda: picked.append(start()[1])) for _ in range(2)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join()
    assert newest in picked and len(set(picked)) == 2


def test_a_description_is_cut_to_mlflows_limit_trials_first():
    rows = "\n".join(f"| trial-{i} | FINISHED |" for i in range(400))
    note = parents.join_note("head", {"Verdicts": "| a | better |", "Trials": "| trial | status |\n|---|---|\n" + rows})
    assert len(note) <= parents.NOTE_LIMIT and "| a | better |" in note and "| trial-0 |" in note
    assert "| trial-399 |" not in note and "cut to fit" in note
    assert parents.split_note(note)[0] == "head"


def test_the_analysis_refuses_a_study_tag_found_at_two_scales(tracking_uri, tmp_path, capsys):
    study = generate_study([PlantedIntervention("no_dropout", -0.01)], init_seeds=(1, 2))
    for experiment in ("harness/smoke", "harness/proxy"):
        log_study_to_mlflow(study, "twice", experiment, tracking_uri)
    assert analysis_main(["study=twice", f"out={tmp_path}", "resamples=999"]) == 2
    error = capsys.readouterr().err
    assert "study 'twice' has runs in 2 experiments: harness/smoke (10 runs), harness/proxy (10 runs)" in error
    assert (
        analysis_main(["study=twice", "experiment=harness/proxy", f"out={tmp_path}", "resamples=999", "log=false"]) == 0
    )
