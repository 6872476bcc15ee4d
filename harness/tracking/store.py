"""MLflow tracking stores: URIs, the bounded first contact (`connect`, `probe`), experiment ids and the UI's links
and saved views. A trial's run is written by `harness.tracking.tracker`; docs/records.md describes both."""

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import subprocess
import tempfile
import time
import urllib.parse
from pathlib import Path

from harness.tracking.version import git

log = logging.getLogger(__name__)

HEARTBEAT_TAG = "heartbeat"  # unix time of the run's last sign of life
HEARTBEAT_INTERVAL_TAG = "heartbeat_interval"  # seconds between heartbeats: how soon silence means death
UNSENT_FILE = "unsent_records.jsonl"
# The writer retries on its own; MLflow's own retries (minutes of backoff per request) would only delay it.
WRITER_REQUEST_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}

# What MLflow 3's UI calls classic model training (its ExperimentKind enum). MLflow 3.17's UI opens an experiment
# by a global "GenAI / Model training" switch instead (default GenAI, remembered by the browser once clicked, or
# `workflowType=machine_learning` in the address), so every link the harness gives carries that too.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
UI_MODE = "workflowType=machine_learning"
VIEW_TAG_PREFIX = "mlflow.sharedViewState."  # `…/runs?viewStateShareKey=KEY` opens the runs table with that view
ANSWER_COLUMNS = [
    "tags.`study`",
    "tags.`intervention`",
    "tags.`seed`",
    "tags.`train_seed`",
    "metrics.`test_loss`",
    "tags.`scale`",
    "metrics.`train_seconds`",
]
VERDICT_COLUMNS = ["tags.`study`", "tags.`verdicts`"]
VIEWS = {  # key: (link text, the runs table's state: filter, columns, order, grouping)
    "harness-verdicts": (
        "each study's verdicts: difference, Holm interval, mean, SD and n per arm",
        {
            "searchFilter": "tags.study_parent = 'true'",
            "selectedColumns": VERDICT_COLUMNS,
            "orderByKey": "attributes.start_time",
            "orderByAsc": False,
            "columnWidths": {"attributes.`Run Name`": 120, "tags.`study`": 80, "tags.`verdicts`": 2400},
        },
    ),
    "harness-answer": (
        "runs with their test loss, grouped by study",
        {
            "selectedColumns": ANSWER_COLUMNS,
            "orderByKey": "metrics.`test_loss`",
            "orderByAsc": True,
            "columnWidths": {"attributes.`Run Name`": 420},
            "groupBy": {"aggregateFunction": "min", "groupByKeys": [{"mode": "tag", "groupByData": "study"}]},
        },
    ),
}
UI_ADDRESS = "http://127.0.0.1:5000"  # where `make ui` serves a sqlite store


def ui_link(experiment_id: str, run_id: str | None = None, view: str | None = None) -> str:
    """The UI's address (a fragment) of an experiment's runs table (with a saved view) or of one run."""
    if run_id:
        return f"#/experiments/{experiment_id}/runs/{run_id}?{UI_MODE}"
    return f"#/experiments/{experiment_id}/runs?{UI_MODE}" + (f"&viewStateShareKey={view}" if view else "")


def ui_url(uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """Where to see it: on the tracking server itself, or in `make ui` for a sqlite store."""
    if uri.startswith(("http://", "https://")):
        return f"{public_uri(uri)}/{ui_link(experiment_id, run_id)}"
    return f"{UI_ADDRESS}/{ui_link(experiment_id, run_id)} (after make ui)"


class TrackingUnavailable(RuntimeError):
    """The store did not answer the first contact."""


def normalize_uri(uri: str) -> str:
    """One spelling per store: sqlite paths made absolute, no trailing slash."""
    if uri.startswith("sqlite:///"):
        return f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    return uri.rstrip("/")


def public_uri(uri: str) -> str:
    """The URI without the user name and password a URI may carry (`http://user:password@host`): what the harness
    writes anywhere (params, config files, logs, links). Credentials reach MLflow only from the environment."""
    parts = urllib.parse.urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def has_credentials(uri: str) -> bool:
    return public_uri(uri) != uri


def ensure_store(uri: str) -> None:
    """Create a new sqlite store's tables once, under a lock. MLflow creates them unlocked, so two
    processes opening a fresh store at the same moment break each other's schema migration."""
    if not uri.startswith("sqlite:"):
        return
    import mlflow

    lock_path = Path(tempfile.gettempdir()) / f"harness-mlflow-{hashlib.sha256(uri.encode()).hexdigest()[:16]}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        mlflow.MlflowClient(uri).search_experiments(max_results=1)  # the store, cached for this process


def git_state() -> tuple[str | None, bool]:
    try:
        commit, status = git("rev-parse", "HEAD"), git("status", "--porcelain")
    except (OSError, subprocess.CalledProcessError):
        return None, False
    return commit.decode().strip(), bool(status.strip())


@contextlib.contextmanager
def request_limits(retries: int, timeout: float):
    """MLflow's HTTP retry count and per-request timeout (read from the environment at each request) for
    the calls made inside the block."""
    limits = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries),
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, math.ceil(timeout))),
    }
    previous = {name: os.environ.get(name) for name in limits}
    os.environ.update(limits)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def connect(uri: str, timeout: float):
    """A client for the store after a first contact that takes at most about `timeout` seconds."""
    import mlflow

    if has_credentials(uri):  # MLflow prints its run links with the URI's password: the harness prints its own
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    started = time.monotonic()
    try:
        with request_limits(retries=0, timeout=timeout):
            ensure_store(uri)
            client = mlflow.MlflowClient(uri)
            client.search_experiments(max_results=1)
    except Exception as error:
        raise TrackingUnavailable(
            f"the tracking store {public_uri(uri)} did not answer ({type(error).__name__}: {str(error).splitlines()[0][:300]}) "
            f"after {time.monotonic() - started:.1f} s (tracking.connect_timeout={timeout:g}); start it, or point "
            f"tracking.uri / MLFLOW_TRACKING_URI at a store that answers"
        ) from None
    for name, value in WRITER_REQUEST_LIMITS.items():
        os.environ.setdefault(name, value)
    return client


def probe(uri: str, timeout: float) -> None:
    """The first contact with a tracking server, bounded by `timeout`; a sqlite store (a file, created on first
    use) needs none."""
    if not normalize_uri(uri).startswith("sqlite:"):
        connect(normalize_uri(uri), timeout)


def experiment_id(client, name: str, uri: str) -> str:
    """The experiment's id, created if missing (a sqlite store keeps artifacts beside its database file), and
    marked for the UI (`mark_experiment`)."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        location = (
            (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
            if uri.startswith("sqlite:///")
            else None
        )
        try:
            client.create_experiment(name, artifact_location=location)
        except MlflowException:
            pass  # another process created it first
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise MlflowException(f"experiment {name!r} could not be created in {uri}")
    mark_experiment(client, experiment)
    return experiment.experiment_id


def experiment_tags(experiment_id: str) -> dict[str, str]:
    """The tags that make `mlflow ui` show an experiment as the harness's: its kind, its saved views of the runs
    table, and a description linking to them."""
    links = " · ".join(f"[{text}]({ui_link(experiment_id, view=key)})" for key, (text, _) in VIEWS.items())
    description = (
        "Trials of the LLM intervention harness. A trial's answer is its `test_loss` (metric), beside its "
        "`intervention`, `seed`, `train_seed` and `study` (tags). A study is a parent run with its trials and "
        "its analyses nested under it; the parent's `verdicts` and `verdict/<arm>` tags and `verdict/<arm>/...` "
        "metrics hold each arm's verdict, difference and Holm-adjusted interval, and its forest.png draws them.\n\n"
        f"Open the runs table with these columns: {links}."
    )
    return {
        EXPERIMENT_KIND_TAG: EXPERIMENT_KIND,
        "mlflow.note.content": description,
        **{VIEW_TAG_PREFIX + key: json.dumps(view) for key, (_, view) in VIEWS.items()},
    }


def mark_experiment(client, experiment) -> None:
    """Set the experiment tags it lacks (`experiment_tags`); a kind or description someone set stays, and the
    views are brought up to date."""
    for key, value in experiment_tags(experiment.experiment_id).items():
        current = experiment.tags.get(key)
        if current is None or (key.startswith(VIEW_TAG_PREFIX) and current != value):
            try:
                client.set_experiment_tag(experiment.experiment_id, key, value)
            except Exception as error:  # a store that refuses it (permissions) still records trials
                log.warning("could not tag experiment %s with %s: %s", experiment.name, key, error)


def transient(error: BaseException) -> bool:
    """Whether a failed write may succeed later (the store is down or busy) rather than being refused."""
    from mlflow.exceptions import MlflowException

    if isinstance(error, MlflowException):
        status = error.get_http_status_code()
        return not (400 <= status < 500) or status in (408, 429)
    return True
