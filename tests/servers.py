"""Real servers on loopback for the tests: PostgreSQL, an MLflow tracking server, a model server.

Each is started as a user would start it (``initdb`` / ``pg_ctl``, ``mlflow server``,
``mlflow models serve``) on a free port of 127.0.0.1 and stopped when the ``with`` block ends.
PostgreSQL refuses to run as root, so as root its commands run as the ``postgres`` user that
Debian's package creates. ``.ci/run`` installs that package where it is missing.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent


def postgres_bin() -> Path | None:
    """The folder holding ``initdb`` and ``pg_ctl`` (Debian keeps them off PATH), or None."""
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    found = versions[-1] if versions else shutil.which("initdb")
    return Path(found).resolve().parent if found else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """Wait until ``url`` answers 200; fail with the server's log if it exits or times out."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited ({proc.returncode}):\n{_tail(log)}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as r:
            if r.status == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer in {timeout:.0f} s:\n{_tail(log)}")


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass(frozen=True)
class Postgres:
    port: int
    user: str
    password: str

    def uri(self, database: str) -> str:
        """SQLAlchemy URI of one database, as ``mlflow server --backend-store-uri`` takes it."""
        return f"postgresql+psycopg2://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"


@contextlib.contextmanager
def postgres(databases: tuple[str, ...]) -> Iterator[Postgres]:
    """A throw-away PostgreSQL cluster on 127.0.0.1 with one password role owning ``databases``."""
    pg = postgres_bin()
    if pg is None:
        raise FileNotFoundError("PostgreSQL is not installed (apt-get install postgresql)")
    # pytest's tmp folders are private to their user; the cluster needs one postgres can own
    root = Path(tempfile.mkdtemp(prefix="cassava-pg-"))
    as_root = os.geteuid() == 0
    prefix = ["runuser", "-u", "postgres", "--"] if as_root else []
    if as_root:
        shutil.chown(root, "postgres", "postgres")

    def run(*cmd: str) -> None:
        proc = subprocess.run([*prefix, *cmd], capture_output=True, text=True, check=False)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")

    port, password = free_port(), secrets.token_hex(12)
    data = root / "data"
    run(str(pg / "initdb"), "-D", str(data), "-U", "postgres", "--auth-local=trust",
        "--auth-host=scram-sha-256", "-E", "UTF8")  # fmt: skip
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1"
    run(str(pg / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start")
    try:
        psql = [str(pg / "psql"), "-h", str(root), "-p", str(port), "-U", "postgres", "-q"]
        run(*psql, "-c", f"CREATE ROLE mlflow LOGIN PASSWORD '{password}'")
        for name in databases:
            run(*psql, "-c", f"CREATE DATABASE {name} OWNER mlflow")
        yield Postgres(port=port, user="mlflow", password=password)
    finally:
        subprocess.run(
            [*prefix, str(pg / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
            capture_output=True,
            check=False,
        )
        shutil.rmtree(root, ignore_errors=True)


@dataclass(frozen=True)
class TrackingServer:
    uri: str
    admin: tuple[str, str]

    def add_user(self, username: str, password: str) -> None:
        """Create a user of the server's basic-auth, as its admin does (MLflow's auth client)."""
        from unittest import mock

        from mlflow.server.auth.client import AuthServiceClient

        user, password_ = self.admin
        admin = {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password_}
        with mock.patch.dict(os.environ, admin):
            AuthServiceClient(self.uri).create_user(username, password)


@contextlib.contextmanager
def mlflow_server(
    db: Postgres | str, workdir: Path, *, auth: bool = False, port: int | None = None
) -> Iterator[TrackingServer]:
    """``mlflow server`` with its runs in PostgreSQL (``auth``: ``--app-name basic-auth``, its
    users in PostgreSQL too), or in the backend store URI ``db`` (``sqlite:///...``); on
    ``port`` (a server started again where it was), or a free one.

    Artifacts are proxied by the server (``--artifacts-destination``): clients upload and
    download them over HTTP and need no access to the folder.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    admin = ("admin", secrets.token_hex(12))
    env = {
        **os.environ,
        # no background job runners (MLflow's GenAI jobs): 15 idle workers on 2 cores otherwise
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    app: list[str] = []
    if auth:
        auth_ini = workdir / "basic_auth.ini"
        auth_ini.write_text(
            "[mlflow]\n"
            "default_permission = READ\n"
            f"database_uri = {db.uri('mlflow_auth')}\n"
            f"admin_username = {admin[0]}\n"
            f"admin_password = {admin[1]}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        )
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(auth_ini)
        env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = secrets.token_hex(16)  # CSRF of the auth app
        app = ["--app-name", "basic-auth"]
    port = port or free_port()
    backend = db.uri("mlflow") if isinstance(db, Postgres) else db
    log = workdir / "mlflow-server.log"
    with open(log, "a") as out:
        proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", *app,
             "--backend-store-uri", backend,
             "--artifacts-destination", str(workdir / "artifacts"),
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=workdir,
        )  # fmt: skip
    try:
        uri = f"http://127.0.0.1:{port}"
        wait_http(f"{uri}/health", proc, log)
        yield TrackingServer(uri=uri, admin=admin)
    finally:
        _stop(proc)


@contextlib.contextmanager
def model_server(model_uri: str, env: dict[str, str], workdir: Path) -> Iterator[str]:
    """``mlflow models serve -m MODEL_URI --env-manager local``: yields its base URL."""
    port = free_port()
    log = workdir / "models-serve.log"
    env = {**env, "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}"}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(BIN / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=workdir,
        )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/ping", proc, log, timeout=180)
        yield url
    finally:
        _stop(proc)


def post_json(url: str, payload: dict) -> dict:
    request = urllib.request.Request(
        url,
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as err:
        raise AssertionError(f"{url}: HTTP {err.code}: {err.read()[:2000]!r}") from err
