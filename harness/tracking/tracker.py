"""A trial's MLflow run as rank 0 writes it: `Tracker` queues every record and one background thread sends them in
order, retrying while the store is unreachable and saving what is still unsent at the end; `SystemMetrics`
samples the machine; `NullTracker` stands in on the other ranks. docs/records.md describes the guarantees."""

import collections
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from harness.paths import default_tracking_uri
from harness.tracking.store import (
    HEARTBEAT_INTERVAL_TAG,
    HEARTBEAT_TAG,
    UNSENT_FILE,
    connect,
    experiment_id,
    git_state,
    normalize_uri,
    public_uri,
    transient,
)

log = logging.getLogger(__name__)


METRICS_PER_REQUEST = 1000  # MLflow's log_batch limit


PARAMS_PER_REQUEST = 100


MAX_BACKOFF = 10.0  # seconds between retries while the store is unreachable


SEND_INTERVAL = 2.0  # seconds between the writer's batches: few requests, few turns taken from the step loop


SYSTEM_PREFIX = "system/"  # MLflow's prefix for system metrics: the UI's "System metrics" charts show these


class UnsentRecords(RuntimeError):
    """The trial ended while the store was unreachable; its records are saved for `python -m harness replay`."""


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
        full_uri = normalize_uri(uri or default_tracking_uri())
        self.client = connect(full_uri, connect_timeout)
        self.uri = public_uri(full_uri)  # what is written anywhere: never a password
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
