"""MLflow tracking: one store for every run, written by rank 0 only, never in the training step's way.

`Tracker` is a trial's run. The first contact with the store is bounded (`tracking.connect_timeout`), so a
dead store fails a trial in seconds. After that every write is queued and sent, in order, by one
background thread: metrics in batches, tags, artifacts, texts, the final status. When the store is
unreachable the thread keeps the records and retries with backoff while training goes on; it also writes a
heartbeat tag every `tracking.heartbeat_interval` seconds, so other processes can tell a live trial from one
whose process died (`harness.tracking.records`). At the end a trial waits up to `tracking.flush_timeout` seconds for
the queue; whatever is still unsent is saved to `<run dir>/unsent_records.jsonl` and the trial fails with
the command that replays it (`python -m harness replay <run dir>`). MLflow's system metrics (CPU, memory, disk,
network, GPUs) are sampled on a thread of their own and go through the same queue.

Every experiment the harness writes to is marked as classic model training (`mlflow.experimentKind`), so
`mlflow ui` opens it on its runs table, and gets two saved views of that table (`VIEWS`) linked from its
description.
"""

import collections
import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from harness.paths import default_tracking_uri
from harness.tracking.version import git

log = logging.getLogger(__name__)

HEARTBEAT_TAG = "heartbeat"  # unix time of the run's last sign of life
HEARTBEAT_INTERVAL_TAG = "heartbeat_interval"  # seconds between heartbeats: how soon silence means death
UNSENT_FILE = "unsent_records.jsonl"
METRICS_PER_REQUEST = 1000  # MLflow's log_batch limit
PARAMS_PER_REQUEST = 100
MAX_BACKOFF = 10.0  # seconds between retries while the store is unreachable
SEND_INTERVAL = 2.0  # seconds between the writer's batches: few requests, few turns taken from the step loop
# The writer retries on its own; MLflow's own retries (minutes of backoff per request) would only delay it.
WRITER_REQUEST_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
SYSTEM_PREFIX = "system/"  # MLflow's prefix for system metrics: the UI's "System metrics" charts show these

# What MLflow 3's UI calls classic model training (its ExperimentKind enum). MLflow 3.17's UI opens an experiment
# by a global "GenAI / Model training" switch instead (default GenAI, remembered by the browser once clicked, or
# `workflowType=machine_learning` in the address), so every link the harness gives carries that too.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
UI_MODE = "workflowType=machine_learning"
VIEW_TAG_PREFIX = "mlflow.sharedViewState."  # `…/runs?viewStateShareKey=KEY` opens the runs table with that view
ANSWER_COLUMNS = [
    "tags.`intervention`",
    "tags.`seed`",
    "tags.`train_seed`",
    "tags.`study`",
    "metrics.`test_loss`",
    "metrics.`test_loss_amp`",
    "metrics.`train_seconds`",
]
VIEWS = {  # key: (link text, the runs table's state: columns, order, grouping)
    "harness-answer": (
        "runs with their test loss",
        {"selectedColumns": ANSWER_COLUMNS, "orderByKey": "metrics.`test_loss`", "orderByAsc": True},
    ),
    "harness-by-intervention": (
        "mean test loss by intervention and study",
        {
            "selectedColumns": ANSWER_COLUMNS,
            "orderByKey": "metrics.`test_loss`",
            "orderByAsc": True,
            "columnWidths": {"attributes.`Run Name`": 380},
            "groupBy": {
                "aggregateFunction": "average",
                "groupByKeys": [
                    {"mode": "tag", "groupByData": "intervention"},
                    {"mode": "tag", "groupByData": "study"},
                ],
            },
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
        return f"{uri}/{ui_link(experiment_id, run_id)}"
    return f"{UI_ADDRESS}/{ui_link(experiment_id, run_id)} (after make ui)"


class TrackingUnavailable(RuntimeError):
    """The store did not answer the first contact."""


class UnsentRecords(RuntimeError):
    """The trial ended while the store was unreachable; its records are saved for `python -m harness replay`."""


def normalize_uri(uri: str) -> str:
    """One spelling per store: sqlite paths made absolute, no trailing slash."""
    if uri.startswith("sqlite:///"):
        return f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    return uri.rstrip("/")


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

    started = time.monotonic()
    try:
        with request_limits(retries=0, timeout=timeout):
            ensure_store(uri)
            client = mlflow.MlflowClient(uri)
            client.search_experiments(max_results=1)
    except Exception as error:
        raise TrackingUnavailable(
            f"the tracking store {uri} did not answer ({type(error).__name__}: {str(error).splitlines()[0][:300]}) "
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
        "its analyses nested under it; the parent's description holds the verdicts.\n\n"
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


def send(client, run_id: str, kind: str, payload) -> None:
    """Apply one record to the store; replaying one twice changes nothing (metrics are deduplicated)."""
    from mlflow.entities import Metric, RunTag

    if kind == "metrics":
        for start in range(0, len(payload), METRICS_PER_REQUEST):
            client.log_batch(run_id, metrics=[Metric(*m) for m in payload[start : start + METRICS_PER_REQUEST]])
    elif kind == "tags":
        client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in payload.items()])
    elif kind == "artifact":
        client.log_artifact(run_id, payload["path"], payload["artifact_path"])
    elif kind == "text":
        client.log_text(run_id, payload["text"], payload["artifact_file"])
    elif kind == "end":
        client.set_terminated(run_id, payload["status"], payload["end_time"])
    else:
        raise ValueError(f"unknown record kind {kind!r}")


class SystemMetrics:
    """MLflow's system metrics of this machine, sampled every `interval` seconds by MLflow's own monitors (CPU
    utilisation and memory, disk, network, and per GPU utilisation, memory and power where NVML finds one; the
    UI's "System metrics" charts) on a thread of their own, and queued on the tracker like every other record,
    so an outage keeps them and `replay` sends them. Step = sample number, continued on resume."""

    def __init__(self, tracker: "Tracker", interval: float, first_step: int = 0):
        from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
        from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
        from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

        self.tracker, self.interval, self.step = tracker, interval, first_step
        self.monitors = [CPUMonitor(), DiskMonitor(), NetworkMonitor(), *gpu_monitors()]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="system-metrics", daemon=True)

    def start(self) -> "SystemMetrics":
        self.collect()  # psutil's CPU percentage counts from its previous call: the first one only starts it
        for monitor in self.monitors:
            monitor.clear_metrics()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def collect(self) -> None:
        for monitor in self.monitors:
            monitor.collect_metrics()

    def _sample(self) -> None:
        try:
            while not self._stop.wait(self.interval):
                self.collect()
                metrics = {}
                for monitor in self.monitors:
                    metrics.update(monitor.aggregate_metrics())
                    monitor.clear_metrics()
                self.tracker.log_metrics({SYSTEM_PREFIX + k: v for k, v in metrics.items()}, self.step)
                self.step += 1
        except Exception:  # a monitor that fails must not take the trial with it
            log.exception("system metrics of run %s stopped", self.tracker.run_id)


def gpu_monitors() -> list:
    """MLflow's NVIDIA monitor (every GPU on this node, through nvidia-ml-py), else its AMD one, else none."""
    from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor
    from mlflow.system_metrics.metrics.rocm_monitor import ROCMMonitor

    for monitor in (GPUMonitor, ROCMMonitor):
        try:
            return [monitor()]
        except Exception as error:  # no driver, no library, no device
            log.debug("no %s: %s", monitor.__name__, error)
    return []


def last_system_step(client, run) -> int:
    """The step of a run's last system-metrics sample (every sample has the CPU's), -1 when it has none."""
    key = SYSTEM_PREFIX + "cpu_utilization_percentage"
    return (
        max((m.step for m in client.get_metric_history(run.info.run_id, key)), default=-1)
        if key in run.data.metrics
        else -1
    )


class Tracker:
    """A run in the store, written asynchronously (see the module docstring). Methods that record something
    return at once; `end` waits for the queue (up to `flush_timeout`)."""

    def __init__(
        self,
        uri: str | None = None,
        experiment: str = "harness",
        *,
        connect_timeout: float = 10.0,
        heartbeat_interval: float = 30.0,
        flush_timeout: float = 60.0,
        unsent_dir: Path | None = None,
        system_metrics_interval: float | None = None,
    ):
        """`system_metrics_interval`: seconds between system-metrics samples; None records none."""
        self.uri = normalize_uri(uri or default_tracking_uri())
        self.client = connect(self.uri, connect_timeout)
        self.experiment_id = experiment_id(self.client, experiment, self.uri)
        self.heartbeat_interval, self.flush_timeout = heartbeat_interval, flush_timeout
        self.unsent_dir = Path(unsent_dir) if unsent_dir else Path.cwd()
        self.run_id: str | None = None
        # Called by the writer after each heartbeat; a returned text asks the trial to stop (it lost its claim).
        self.watch: Callable[[], str | None] | None = None
        self.stop_reason: str | None = None
        self._ending = False  # the final status is queued: no more heartbeats or watching
        self._records: collections.deque = collections.deque()  # (kind, payload), removed once sent
        self._wake = threading.Condition()
        self._closing, self._abandon = threading.Event(), threading.Event()
        self._down_since: float | None = None
        self._thread: threading.Thread | None = None
        self.system_metrics_interval = system_metrics_interval
        self._system: SystemMetrics | None = None

    # --- opening the run (synchronous: the trial needs the run id) ---------------------------------------
    def start(self, run_name: str, tags: dict[str, str], params: dict) -> str:
        from mlflow.entities import Param

        commit, dirty = git_state()
        if commit:
            tags = {**tags, "mlflow.source.git.commit": commit, "git_dirty": str(dirty).lower()}
        tags = {**tags, **self._heartbeat_tags()}
        self.run_id = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags).info.run_id
        items = [Param(k, "None" if v is None else str(v)) for k, v in params.items()]
        for start in range(0, len(items), PARAMS_PER_REQUEST):
            self.client.log_batch(self.run_id, params=items[start : start + PARAMS_PER_REQUEST])
        self._start_writer()
        self._start_system_metrics(0)
        return self.run_id

    def resume(self, run_id: str) -> None:
        """Continue a trial's existing run (after `resume=`); its params are already logged."""
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            raise FileNotFoundError(
                f"the trial's MLflow run {run_id} is not in {self.uri}: resume with the store the trial logged to"
            ) from None
        self.run_id = run_id
        self.client.update_run(run_id, "RUNNING")
        self.client.log_batch(run_id, tags=[_tag(k, v) for k, v in self._heartbeat_tags().items()])
        self._start_writer()
        self._start_system_metrics(last_system_step(self.client, run) + 1)

    def discard(self) -> None:
        """Delete the run (a claim given up before anything was computed)."""
        self._stop_system_metrics()
        self._stop_writer()
        self.client.delete_run(self.run_id)

    # --- recording (asynchronous) -------------------------------------------------------------------------
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self._queue("metrics", [(k, float(v), now, step) for k, v in metrics.items()])

    def set_tags(self, tags: dict[str, str]) -> None:
        self._queue("tags", {k: str(v) for k, v in tags.items()})

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._queue("artifact", {"path": str(Path(path).resolve()), "artifact_path": artifact_path})

    def log_text(self, text: str, artifact_file: str) -> None:
        self._queue("text", {"text": text, "artifact_file": artifact_file})

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every record so far is sent (at most `timeout` seconds); whether they were."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._wake:
            self._wake.notify_all()  # send now rather than at the next interval
            while self._records:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._wake.wait(remaining)
        return True

    def end(self, status: str, tags: dict[str, str] | None = None) -> None:
        """status: FINISHED, FAILED or KILLED. Raises UnsentRecords when the store stays unreachable."""
        self._stop_system_metrics()
        if tags:
            self.set_tags(tags)
        self._ending = True
        self._queue("end", {"status": status, "end_time": int(time.time() * 1000)})
        sent = self.flush(self.flush_timeout)
        self._stop_writer()
        if not sent:
            path, count = self.save_unsent()
            down = (
                "is not answering"
                if self._down_since is None
                else f"has been unreachable for {time.monotonic() - self._down_since:.0f} s"
            )
            raise UnsentRecords(
                f"the tracking store {self.uri} {down}: {count} unsent records of run {self.run_id} (final status {status}) are saved in {path}; the run "
                f"directory and its checkpoints are intact. When the store answers again, send them with: "
                f"python -m harness replay {path.parent}"
            )

    def save_unsent(self) -> tuple[Path, int]:
        """Append the unsent records to `<unsent_dir>/unsent_records.jsonl` (one JSON object a line)."""
        path = self.unsent_dir / UNSENT_FILE
        records = list(self._records)
        new = not path.exists()
        with open(path, "a") as f:
            if new:
                f.write(
                    json.dumps({"run_id": self.run_id, "uri": self.uri, "experiment_id": self.experiment_id}) + "\n"
                )
            for kind, payload in records:
                f.write(json.dumps({"kind": kind, "payload": payload}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return path, len(records)

    def _start_system_metrics(self, first_step: int) -> None:
        if self.system_metrics_interval is None:
            return
        try:
            self._system = SystemMetrics(self, self.system_metrics_interval, first_step).start()
        except ImportError as error:  # psutil is a dependency; a trial never fails for its bookkeeping
            log.warning(
                "no system metrics for run %s: %s (pip install psutil, or tracking.system_metrics=false)",
                self.run_id,
                error,
            )

    def _stop_system_metrics(self) -> None:
        if self._system is not None:
            self._system.stop()

    # --- the writer thread --------------------------------------------------------------------------------
    def _heartbeat_tags(self) -> dict[str, str]:
        return {HEARTBEAT_TAG: f"{time.time():.3f}", HEARTBEAT_INTERVAL_TAG: f"{self.heartbeat_interval:g}"}

    def _queue(self, kind: str, payload) -> None:
        with self._wake:
            self._records.append((kind, payload))

    def _start_writer(self) -> None:
        self._thread = threading.Thread(target=self._write, name=f"tracker-{self.run_id[:8]}", daemon=True)
        self._thread.start()

    def _stop_writer(self) -> None:
        self._closing.set()
        self._abandon.set()  # leave a request that keeps failing; what it held is still in self._records
        with self._wake:
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _write(self) -> None:
        try:
            self._write_until_closed()
        except Exception:  # a bug here must not pass silently: the records stay queued and end() saves them
            log.exception("the tracking writer of run %s stopped", self.run_id)

    def _write_until_closed(self) -> None:
        """Send what is queued every SEND_INTERVAL seconds, at once while a backlog lasts or when `flush` asks.
        Queueing never wakes this thread, so it takes turns with the step loop as rarely as it can."""
        next_beat, backlog = time.monotonic() + self.heartbeat_interval, False
        while True:
            with self._wake:
                if not backlog and not self._closing.is_set():
                    self._wake.wait(max(0.0, min(SEND_INTERVAL, next_beat - time.monotonic())))
                if self._closing.is_set() and (not self._records or self._abandon.is_set()):
                    return
                batch = self._next_batch()
            if time.monotonic() >= next_beat:
                self._beat()
                next_beat = time.monotonic() + self.heartbeat_interval
            if batch and not self._deliver(batch):
                return
            backlog = bool(batch) and bool(self._records)

    def _next_batch(self) -> list:
        """The first record, with the same-kind metric or tag records right behind it."""
        if not self._records:
            return []
        kind = self._records[0][0]
        if kind not in ("metrics", "tags"):
            return [self._records[0]]
        batch, size = [], 0
        for record in self._records:
            if record[0] != kind or (batch and size + len(record[1]) > METRICS_PER_REQUEST):
                break
            batch.append(record)
            size += len(record[1])
        return batch

    def _deliver(self, batch: list) -> bool:
        """Send a batch, retrying while the store is unreachable; False once the trial gave up waiting."""
        kind = batch[0][0]
        if kind == "metrics":
            payload = [m for _, metrics in batch for m in metrics]
        elif kind == "tags":
            payload = {k: v for _, tags in batch for k, v in tags.items()}
        else:
            payload = batch[0][1]
        delay = 0.5
        while True:
            try:
                send(self.client, self.run_id, kind, payload)
                break
            except Exception as error:
                if not transient(error):
                    log.warning(
                        "the tracking store refused %s records of run %s (%s): dropped", kind, self.run_id, error
                    )
                    break
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    log.warning(
                        "the tracking store %s is unreachable (%s); training goes on and its records are "
                        "kept and retried",
                        self.uri,
                        str(error).splitlines()[0][:200],
                    )
                if self._abandon.wait(delay):
                    return False
                delay = min(2 * delay, MAX_BACKOFF)
        with self._wake:
            for _ in batch:
                self._records.popleft()
            self._wake.notify_all()
        if self._down_since is not None:
            log.warning(
                "the tracking store %s answers again after %.0f s; sending the kept records",
                self.uri,
                time.monotonic() - self._down_since,
            )
            self._down_since = None
        return True

    def _beat(self) -> None:
        if self._ending:
            return
        try:
            self.client.set_tag(self.run_id, HEARTBEAT_TAG, f"{time.time():.3f}")
            if self.watch is not None and self.stop_reason is None:
                self.stop_reason = self.watch()
        except Exception as error:  # the store is down: the queued records notice and report it
            log.debug("heartbeat of run %s failed: %s", self.run_id, error)


def _tag(key: str, value: str):
    from mlflow.entities import RunTag

    return RunTag(key, value)


class NullTracker:
    """What ranks other than 0 hold: only rank 0 talks to MLflow."""

    run_id = None
    stop_reason = None

    def __getattr__(self, name):
        return lambda *args, **kwargs: None
