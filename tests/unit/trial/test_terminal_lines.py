"""What a trial says about itself: a run name with its study and the overrides that change its computation, one
start line (name, intervention, seeds, scale, steps, UI link) and one end line (test loss, where its study stands)."""

import re

from harness.progress import study_line
from harness.trial.record import computation_overrides, trial_name
from tests.conftest import TINY, compose_config, new_store, run_in_process


def test_a_run_name_says_its_study_and_what_sets_it_apart_beyond_the_seeds():
    cfg = compose_config("+intervention=no_dropout", "seed=42", "study=quick")
    overrides = [
        "trainer.max_steps=40",  # the study's
        "+sweep=quick",
        "trainer.max_steps=10",  # the command line's, which holds
        "tracking.uri=sqlite:///x.db",
        "trainer.progress=false",
        "+intervention=no_dropout",
        "seed=42",
        "train_seed=null",
        "optim.lr=0.001",
    ]
    assert trial_name(cfg, overrides) == "quick: no_dropout s42 smoke max_steps=10 lr=0.001"
    assert trial_name(compose_config("seed=7", "train_seed=3"), []) == "baseline s7 t3 smoke"


def test_bookkeeping_overrides_leave_the_name_alone():
    assert (
        computation_overrides(["tracking.experiment=x", "trainer.sample_prompt=hi", "resume=/d", "scale=proxy"]) == []
    )


def test_a_trial_prints_one_start_line_and_one_end_line(tmp_path):
    uri = new_store(tmp_path / "mlflow.db")
    done = run_in_process(
        *TINY,
        "trainer.max_steps=2",
        "+intervention=no_dropout",
        "seed=5",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
        env_uri=uri,
    )
    printed = done.stdout + done.stderr
    start = re.search(r"\[trial (no_dropout s5 smoke [^\]]*)\] starts: (.*)", printed)
    assert start, printed
    assert start.group(1).startswith("no_dropout s5 smoke d_model=32 n_head=2")
    assert re.fullmatch(
        r"intervention no_dropout; seed 5, train_seed none, data_seed none; scale smoke, 2 steps; "
        r"in mlflow ui: \S+/#/experiments/\d+/runs/[0-9a-f]{32}\?workflowType=machine_learning.*",
        start.group(2),
    ), start.group(2)
    end = re.search(
        r"\[trial no_dropout s5 smoke [^\]]*\] FINISHED: test loss (\d+\.\d{6}) after \S+ of training; (.*)", printed
    )
    assert end, printed
    assert end.group(2).startswith("not part of a study")


def test_a_rerun_with_nothing_to_run_says_so_without_an_eta():
    line = study_line("quick", 0, 0, 0, 0, {}, 3.0)
    assert line == "[study quick] no trial to run: every trial of the study FINISHED in an earlier execution"


def test_a_preempted_trial_is_not_done_while_its_requeued_job_may_resume_it():
    line = study_line("quick", 2, 1, 0, 0, {"FINISHED": 1}, 30.0, preempted=1)
    assert line.startswith("[study quick] trial 2 of 2: 1 done (1 FINISHED), 0 running, 1 preempted (its requeued")
