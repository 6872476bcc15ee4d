import atexit
import contextlib
import functools
import os

# One intra-op thread per process: a tiny model gains nothing from more, and the suite's workers and the trials
# they start share 2 cores. A test that needs another count sets OMP_NUM_THREADS for its own process.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import shutil  # noqa: E402
import signal  # noqa: E402
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from hydra import compose, initialize_config_dir
from scipy import stats

from harness.config.compose import compose_trial
from harness.paths import PROJECT_ROOT

# Every process a test starts imports the code under test (this checkout), never another installed copy: a study
# resumed in-process must see the same code version as the process it resumes.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """Kill what a test started and did not end (a failed assertion skips its cleanup): a trial left behind would
    train on, taking a core from every later test. Fixtures' processes start before the call and are kept, and so
    is multiprocessing's resource tracker, which serves this whole process."""
    this = psutil.Process()
    before = {child.pid for child in this.children(recursive=True)}
    try:
        return (yield)
    finally:
        left = []
        for child in this.children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                if child.pid not in before and "multiprocessing.resource_tracker" not in " ".join(child.cmdline()):
                    child.kill()
                    left.append(child)
        psutil.wait_procs(left, timeout=10)


# A trial small enough for a few seconds on 2 CPU cores, through every real code path.
TINY = [
    "model.d_model=32",
    "model.n_head=2",
    "model.n_layer=1",
    "model.context_length=32",
    "trainer.global_batch_size=4",
    "trainer.micro_batch_size=2",
    "trainer.max_steps=4",
    "trainer.checkpoint_interval=2",
    "data.test_tokens=256",
    "data.eval_batch_size=4",
    "trainer.progress=false",
    "trainer.sample_tokens=4",
    "tracking.log_interval=2",
]


def compose_config(*overrides: str):
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    return compose_trial(cfg, list(overrides))


@functools.cache
def store_template() -> Path:
    """An empty MLflow sqlite store made once per test process by the harness (`ensure_store`): `new_store` copies
    it, since MLflow's schema migrations cost about a second per new store. Tests of making a store (a study's
    processes creating one together, a URI that must not be created) name a file that does not exist yet."""
    import sqlite3

    from harness.tracking.store import ensure_store

    directory = Path(tempfile.mkdtemp(prefix="harness-store-template-"))
    atexit.register(shutil.rmtree, directory, True)
    made = directory / "made.db"
    ensure_store(f"sqlite:///{made}")
    template = directory / "mlflow.db"
    with contextlib.closing(sqlite3.connect(made)) as source, contextlib.closing(sqlite3.connect(template)) as copy:
        source.backup(copy)
    return template


def new_store(path: Path) -> str:
    """A new, empty MLflow store at `path` (a copy of `store_template()`); its URI."""
    shutil.copyfile(store_template(), path)
    return f"sqlite:///{path}"


@pytest.fixture
def tracking_uri(tmp_path, monkeypatch) -> str:
    uri = new_store(tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One MLflow store for a whole test module (MLFLOW_TRACKING_URI points at it)."""
    uri = new_store(tmp_path_factory.mktemp("store") / "mlflow.db")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        yield uri


def final_weights(run_dir) -> dict:
    """The weights of a run directory's latest checkpoint (or of a checkpoint directory), tensor by name."""
    from safetensors.torch import load_file

    from harness.trial import checkpoint

    return load_file(str(checkpoint.find(run_dir) / checkpoint.MODEL_FILE))


def rewrite_state(checkpoint_dir: Path, **changes) -> None:
    """Change entries of a checkpoint's state.pt and re-sign its manifest: a consistent checkpoint of another
    trial, not a corrupt one."""
    import json

    import torch

    from harness.trial import checkpoint

    state_file = Path(checkpoint_dir) / checkpoint.STATE_FILE
    torch.save({**torch.load(state_file, weights_only=True), **changes}, state_file)
    manifest = checkpoint.read_manifest(checkpoint_dir)
    manifest["files"][checkpoint.STATE_FILE] = {
        "sha256": checkpoint.sha256(state_file),
        "bytes": state_file.stat().st_size,
    }
    (Path(checkpoint_dir) / checkpoint.MANIFEST_FILE).write_text(json.dumps(manifest | changes, indent=1))


def run_harness(*args: str, cwd: Path, env_uri: str, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m harness ARGS` as a user runs it, in a fresh process."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": env_uri, "HYDRA_FULL_ERROR": "0"}
    result = subprocess.run(
        [sys.executable, "-m", "harness", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    if check and result.returncode:
        raise AssertionError(f"harness failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def run_in_process(
    *args: str, cwd: Path = PROJECT_ROOT, env_uri: str | None = None, env: dict | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    """`python -m harness ARGS` through `harness.__main__.main` in this process: the same code a user's command
    runs, without a fresh interpreter's start-up. Captures stdout/stderr, turns SystemExit (or an escaping
    exception, as an interpreter would) into the exit status; `env` adds environment variables. It restores what a command may change in the
    process: cwd, sys.argv, os.environ, Hydra's global state, logging, signal handlers, MLflow's tracking URI and
    active run, a resume's run lock, torch's determinism, thread count and default dtype."""
    import contextlib
    import io
    import logging
    import traceback

    import mlflow
    import torch
    from hydra.core.global_hydra import GlobalHydra
    from mlflow.tracking._tracking_service import utils as tracking_utils

    from harness.__main__ import main
    from harness.trial import checkpoint

    held_locks = set(checkpoint._HELD_LOCKS)  # a resume's run lock, held for its process's life
    saved = {
        "cwd": os.getcwd(),
        "argv": list(sys.argv),
        "environ": dict(os.environ),
        "handlers": {
            number: signal.getsignal(number)
            for number in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
        },
        "tracking_uri": tracking_utils._tracking_uri,
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "threads": torch.get_num_threads(),
        "dtype": torch.get_default_dtype(),
    }
    root = logging.getLogger()
    saved_logging = (list(root.handlers), root.level, logging.root.manager.disable)
    stdout, stderr = io.StringIO(), io.StringIO()
    GlobalHydra.instance().clear()
    os.environ.update({"HYDRA_FULL_ERROR": "0", **(env or {})})
    if env_uri is not None:
        os.environ["MLFLOW_TRACKING_URI"] = env_uri
    os.chdir(cwd)
    status = 0
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                main(list(args))
            except SystemExit as exit_:
                code = exit_.code
                status = code if isinstance(code, int) else (0 if code is None else 1)
                if isinstance(code, str):
                    print(code, file=sys.stderr)
            except BaseException:  # noqa: BLE001 -- what an interpreter does with an uncaught exception
                traceback.print_exc()
                status = 1
    finally:
        while mlflow.active_run():
            mlflow.end_run()
        for path in set(checkpoint._HELD_LOCKS) - held_locks:  # released as the command's process would end
            checkpoint._HELD_LOCKS.pop(path).close()
        GlobalHydra.instance().clear()
        os.chdir(saved["cwd"])
        sys.argv[:] = saved["argv"]
        os.environ.clear()
        os.environ.update(saved["environ"])
        for number, handler in saved["handlers"].items():
            signal.signal(number, handler)
        tracking_utils._tracking_uri = saved["tracking_uri"]
        torch.use_deterministic_algorithms(saved["deterministic"])
        torch.backends.cudnn.deterministic = saved["cudnn_deterministic"]
        torch.set_num_threads(saved["threads"])
        torch.set_default_dtype(saved["dtype"])
        for handler in set(root.handlers) - set(saved_logging[0]):
            handler.close()
        root.handlers[:] = saved_logging[0]
        root.setLevel(saved_logging[1])
        logging.disable(saved_logging[2])
    result = subprocess.CompletedProcess(
        ["python", "-m", "harness", *args], status, stdout.getvalue(), stderr.getvalue()
    )
    if check and result.returncode:
        raise AssertionError(f"harness failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1, its backend store `backend_store_uri` (default: a sqlite file in
    `directory`), which a test may freeze, kill and restart on the same port and database. `timeout` ends it even
    if the test process dies."""

    def __init__(self, directory: Path, backend_store_uri: str | None = None):
        self.directory, self.port = Path(directory), free_port()
        self.backend_store_uri = backend_store_uri or f"sqlite:///{self.directory / 'server.db'}"
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = None

    def start(self) -> "MlflowServer":
        log = open(self.directory / "server.log", "a")
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job runner: a faster start
        self.process = subprocess.Popen(
            [
                "timeout",
                "900",
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--backend-store-uri",
                self.backend_store_uri,
                "--artifacts-destination",
                str(self.directory / "artifacts"),
                "--workers",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
        log.close()
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2)
                return self
            except OSError:
                assert self.process.poll() is None and time.time() < deadline, (
                    self.directory / "server.log"
                ).read_text()
                time.sleep(0.25)

    def signal(self, number: int) -> None:
        os.killpg(self.process.pid, number)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.signal(signal.SIGKILL)
            self.process.wait()


def assert_rate(hits: int, trials: int, rate: float, band: float = 0.999) -> None:
    """`hits` of `trials` is within the central `band` of Binomial(trials, rate)."""
    low = stats.binom.ppf((1 - band) / 2, trials, rate)
    high = stats.binom.isf((1 - band) / 2, trials, rate)
    assert low <= hits <= high, f"{hits}/{trials} outside [{low:.0f}, {high:.0f}] for rate {rate}"


def assert_at_most(hits: int, trials: int, rate: float, band: float = 0.999) -> None:
    high = stats.binom.isf(1 - band, trials, rate)
    assert hits <= high, f"{hits}/{trials} above {high:.0f} for rate {rate}"


def flip_a_byte(path: Path, offset: int = 100) -> None:
    """A damaged file of the same size: one byte's lowest bit flipped, so only its checksum tells."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 1]))


def start_harness(*args: str, cwd: Path, uri: str) -> subprocess.Popen:
    """`python -m harness ARGS` in the background, in its own session (so a test can SIGKILL its whole group)."""
    return subprocess.Popen(
        [sys.executable, "-m", "harness", *args],
        cwd=cwd,
        env={**os.environ, "MLFLOW_TRACKING_URI": uri, "HYDRA_FULL_ERROR": "0"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
