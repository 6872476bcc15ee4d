"""Fixtures for tests against real cluster services: a single-node SLURM and PostgreSQL, which
`bash .ci/services.sh start` installs and starts (docs/cluster.md). Where to find them comes from the file that
script writes (HARNESS_SERVICES_ENV, default /var/tmp/harness-test-services.env) or the same variables in the
environment. A missing service skips its tests, except under CI=true, where it fails them: in CI a broken service
setup must not pass for a skipped test."""

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.conftest import MlflowServer, free_port

SERVICES_ENV = Path(os.environ.get("HARNESS_SERVICES_ENV", "/var/tmp/harness-test-services.env"))
IN_CI = os.environ.get("CI", "").lower() == "true"


def service_settings() -> dict[str, str]:
    """The services file's KEY=VALUE lines, overridden by the same keys in the environment."""
    settings = {}
    if SERVICES_ENV.is_file():
        for line in SERVICES_ENV.read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep and not key.startswith("#"):
                settings[key.strip()] = value.strip()
    return settings | {k: v for k, v in os.environ.items() if k.startswith("HARNESS_TEST_")}


def unavailable(service: str, why: str):
    message = f"{service} unavailable: {why}; `bash .ci/services.sh start` (as root) sets it up"
    if IN_CI:
        pytest.fail(f"CI=true: {message}", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def slurm_partition() -> str:
    """The default partition of a SLURM whose node is ready for jobs."""
    if service_settings().get("HARNESS_TEST_SLURM") != "1":
        unavailable("SLURM", f"HARNESS_TEST_SLURM is not 1 (in the environment or {SERVICES_ENV})")
    try:
        states = subprocess.run(
            ["sinfo", "-h", "-o", "%P %T"], capture_output=True, text=True, timeout=30, check=True
        ).stdout.split()
    except (OSError, subprocess.SubprocessError) as error:
        unavailable("SLURM", f"sinfo failed: {error}")
    partitions = dict(zip(states[::2], states[1::2]))
    default = next((p for p in partitions if p.endswith("*")), None)
    if default is None or partitions[default] not in ("idle", "mixed"):
        unavailable("SLURM", f"no default partition with an idle node (sinfo: {partitions})")
    return default.rstrip("*")


def postgres_admin():
    """An autocommit connection to the services' PostgreSQL as HARNESS_TEST_POSTGRES_URI's role (which may
    create databases), and that URI; skips (fails under CI=true) where there is none."""
    admin_uri = service_settings().get("HARNESS_TEST_POSTGRES_URI")
    if not admin_uri:
        unavailable("PostgreSQL", f"HARNESS_TEST_POSTGRES_URI is not set (in the environment or {SERVICES_ENV})")
    try:
        import psycopg2
    except ImportError as error:
        unavailable("PostgreSQL", f"{error} (the test extras: pip install -e '.[test]')")
    try:
        admin = psycopg2.connect(libpq_uri(admin_uri), connect_timeout=10)
    except psycopg2.OperationalError as error:
        unavailable("PostgreSQL", f"cannot connect to {redact(admin_uri)}: {str(error).strip()}")
    admin.autocommit = True
    return admin, admin_uri


def database_uri(admin_uri: str, database: str) -> str:
    return urlunsplit(urlsplit(admin_uri)._replace(path=f"/{database}"))


@pytest.fixture(scope="session")
def postgres_uri() -> str:
    """A fresh PostgreSQL database for this test session (dropped at its end), as a SQLAlchemy URI that names
    its driver (postgresql+psycopg2://): SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3."""
    admin, admin_uri = postgres_admin()
    try:
        with new_database(admin) as database:
            yield database_uri(admin_uri, database)
    finally:
        admin.close()


@contextlib.contextmanager
def new_database(admin, prefix: str = "harness_test", template: str | None = None):
    """A new PostgreSQL database (a copy of `template`, if named) for the block; its name. Dropped after it."""
    database = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with admin.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {database}" + (f" TEMPLATE {template}" if template else ""))
    try:
        yield database
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f"DROP DATABASE {database} WITH (FORCE)")


@pytest.fixture(scope="session")
def postgres_mlflow_template(tmp_path_factory):
    """A PostgreSQL database holding MLflow's tables (created once per session, as a server creates them), closed
    to connections so that CREATE DATABASE ... TEMPLATE can copy it; the admin connection and its name."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    admin, admin_uri = postgres_admin()
    try:
        with new_database(admin, "harness_template") as template:
            artifacts = tmp_path_factory.mktemp("postgres_mlflow_template")
            SqlAlchemyStore(database_uri(admin_uri, template), str(artifacts)).engine.dispose()
            with admin.cursor() as cursor:
                cursor.execute(f"ALTER DATABASE {template} ALLOW_CONNECTIONS false")
                cursor.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s "
                    "AND pid <> pg_backend_pid()",
                    (template,),
                )
            yield admin, admin_uri, template
    finally:
        admin.close()


@pytest.fixture
def fresh_postgres_mlflow_uri(postgres_mlflow_template) -> str:
    """A PostgreSQL database of this test alone with MLflow's tables and no runs (a copy of the session's
    template, well under a second), dropped after the test; its SQLAlchemy URI."""
    admin, admin_uri, template = postgres_mlflow_template
    with new_database(admin, template=template) as database:
        yield database_uri(admin_uri, database)


@pytest.fixture
def backend_store_uri(request, tmp_path) -> str:
    """A test's MLflow backend store by its parameter: "sqlite", a file in tmp_path; "postgresql", a fresh
    PostgreSQL database with MLflow's tables."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert request.param == "postgresql", f"backend_store_uri={request.param!r}; allowed: sqlite, postgresql"
    return request.getfixturevalue("fresh_postgres_mlflow_uri")


@pytest.fixture
def backend_tracking_uri(backend_store_uri, tmp_path) -> str:
    """Where a test's processes track on its backend: the sqlite file itself, or a real `mlflow server` on the
    PostgreSQL database (the way a cluster uses one), its URL."""
    if backend_store_uri.startswith("sqlite:"):
        yield backend_store_uri
        return
    (tmp_path / "server").mkdir()
    server = MlflowServer(tmp_path / "server", backend_store_uri).start()
    try:
        yield server.url
    finally:
        server.kill()


def libpq_uri(uri: str) -> str:
    """A SQLAlchemy URI (postgresql+psycopg2://...) as libpq reads it (postgresql://...)."""
    return urlunsplit(urlsplit(uri)._replace(scheme="postgresql"))


def redact(uri: str) -> str:
    parts = urlsplit(uri)
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")))


@pytest.fixture(scope="session")
def postgres_mlflow_server(postgres_uri, tmp_path_factory) -> str:
    """A real `mlflow server` on 127.0.0.1 and a free port, its backend store the session's PostgreSQL database;
    its URL. `timeout` ends it even if the test process dies."""
    directory = tmp_path_factory.mktemp("postgres_mlflow_server")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = directory / "server.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            ["timeout", "900", sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
            + ["--backend-store-uri", postgres_uri, "--artifacts-destination", str(directory / "artifacts")]
            + ["--workers", "1"],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                if process.poll() is not None or time.time() > deadline:
                    pytest.fail(f"mlflow server on {redact(postgres_uri)} did not start:\n{log_path.read_text()}")
                time.sleep(0.25)
        yield url
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
