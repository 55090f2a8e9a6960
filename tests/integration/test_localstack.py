"""`flywheel up` / `down` for real: supervisord starts Redis, an MLflow server and Airflow on free
loopback ports under a temporary home; they answer, and `down` leaves no process of ours behind."""

from __future__ import annotations

import json
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import redis

from components import localstack
from components.errors import UsageError
from components.localstack import ServiceStatus, StackError
from components.settings import Settings
from tests.conftest import free_port

pytestmark = pytest.mark.integration


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


def _supervisord_pid(settings: Settings) -> int:
    return json.loads((settings.home / "stack" / "supervisord.json").read_text())["pid"]


def _tree(pid: int) -> list[psutil.Process]:
    """A process and all its descendants."""
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def _assert_all_gone(procs: list[psutil.Process]) -> None:
    # is_running() compares start times, so a recycled PID does not count as ours.
    left = [p.pid for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, f"processes still running: {left}"


@pytest.fixture
def stack_settings(tmp_path: Path) -> Iterator[Settings]:
    """Settings on a fresh home and free ports; whatever the test started is stopped after it."""
    settings = Settings(
        home=tmp_path / "home",
        redis_port=free_port(),
        mlflow_port=free_port(),
        airflow_port=free_port(),
        _env_file=None,
    )
    yield settings
    localstack.down(settings)


def test_up_serves_then_down_leaves_nothing(
    stack_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An empty DAGs folder: this checks the service, not the project's DAGs.
    monkeypatch.setenv("FLYWHEEL_DAGS_FOLDER", str(tmp_path / "dags"))
    (tmp_path / "dags").mkdir()
    (first,) = localstack.up(stack_settings, services=("redis",))
    supervisord = _supervisord_pid(stack_settings)
    # A setting changed for a service that is not running yet reaches the running supervisord.
    settings = stack_settings.model_copy(update={"mlflow_port": free_port()})

    statuses = localstack.up(settings)  # all of them, started together

    assert [s.name for s in statuses] == ["redis", "mlflow", "airflow"]
    assert all(isinstance(s, ServiceStatus) and s.running and s.pid for s in statuses)
    by_name = {s.name: s for s in statuses}
    assert by_name["redis"].pid == first.pid and _supervisord_pid(settings) == supervisord
    assert by_name["redis"].url == f"redis://127.0.0.1:{settings.redis_port}/0"
    assert by_name["mlflow"].url == f"http://127.0.0.1:{settings.mlflow_port}"
    assert redis.Redis.from_url(by_name["redis"].url).ping()
    assert httpx.get(f"{by_name['mlflow'].url}/health", timeout=5).status_code == 200
    health = httpx.get(f"{by_name['airflow'].url}/api/v2/monitor/health", timeout=10).json()
    assert health["metadatabase"]["status"] == "healthy"
    assert (settings.airflow_home / "airflow.db").is_file()
    stack = settings.home / "stack"
    config = (stack / "supervisord.conf").read_text()
    assert all(f"[program:{name}]" in config for name in localstack.SERVICES)
    assert (stack / "logs" / "mlflow.log").is_file()
    # Every process of the stack, taken while it runs: supervisord, the services and their children.
    procs = _tree(supervisord)
    assert {s.pid for s in statuses} <= {p.pid for p in procs}
    assert len(procs) > 6  # Airflow standalone runs its scheduler, API server, … as children
    # Each service leads its own process group, so a stop reaches its children.
    assert all(os.getpgid(s.pid) == s.pid for s in statuses)

    # A second `up` is a no-op for running services: same processes.
    assert [s.pid for s in localstack.up(settings, ["mlflow", "redis"])] == [
        by_name["mlflow"].pid,
        by_name["redis"].pid,
    ]
    assert localstack.status(settings) == statuses

    assert localstack.down(settings) == ["airflow", "mlflow", "redis"]

    _assert_all_gone(procs)
    assert all(_port_free(p) for p in (settings.redis_port, settings.mlflow_port, settings.airflow_port))
    assert not (stack / "supervisord.json").exists() and not (stack / "supervisor.sock").exists()
    assert not any(s.running or s.pid for s in localstack.status(settings))
    assert localstack.down(settings) == []


def test_taken_port_is_a_clear_error(stack_settings: Settings) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", stack_settings.mlflow_port))
        holder.listen()
        with pytest.raises(
            StackError, match=rf"port {stack_settings.mlflow_port} for mlflow is already in use"
        ):
            localstack.up(stack_settings, services=("redis", "mlflow"))
        with pytest.raises(StackError, match="FLYWHEEL_MLFLOW_PORT"):
            localstack.up(stack_settings, services=("mlflow",))
    # The clash is found before anything starts: not even Redis or supervisord.
    assert not any(s.running for s in localstack.status(stack_settings))
    assert not (stack_settings.home / "stack" / "supervisord.json").exists()
    assert _port_free(stack_settings.redis_port)


def test_stack_errors_are_usage_errors(stack_settings: Settings) -> None:
    with pytest.raises(StackError, match="unknown service") as caught:
        localstack.up(stack_settings, services=("redis", "postgres"))
    assert isinstance(caught.value, UsageError) and caught.value.exit_code == 2


def test_a_service_that_dies_at_start_is_reported_and_cleaned_up(stack_settings: Settings) -> None:
    broken = stack_settings.model_copy(update={"mlflow_tracking_uri": "nosuchscheme://nowhere"})

    with pytest.raises(StackError, match=r"mlflow ended .*mlflow\.log"):
        localstack.up(broken, services=("redis", "mlflow"))

    # Redis, started by the same call, was stopped with it.
    assert not any(s.running for s in localstack.status(broken))
    assert _port_free(broken.redis_port)


def test_down_ignores_a_supervisord_it_did_not_start(stack_settings: Settings) -> None:
    # A record naming a live process that is not the one recorded (recycled PID): untouched.
    stack = stack_settings.home / "stack"
    stack.mkdir(parents=True)
    me = psutil.Process()
    record = {"pid": me.pid, "create_time": me.create_time() - 1000.0, "socket": str(stack / "x.sock")}
    (stack / "supervisord.json").write_text(json.dumps(record))
    assert localstack.status(stack_settings)[0].running is False
    assert localstack.down(stack_settings) == []
    assert me.is_running()


def test_foreground_stops_what_it_started_on_ctrl_c(stack_settings: Settings) -> None:
    seen: list[list[ServiceStatus]] = []

    def ready(statuses: list[ServiceStatus]) -> None:
        seen.append(statuses)
        seen.append(_tree(_supervisord_pid(stack_settings)))
        raise KeyboardInterrupt  # what Ctrl-C raises in the waiting `flywheel ui`

    assert localstack.foreground(stack_settings, ["redis"], on_ready=ready) == ["redis"]

    statuses, procs = seen
    assert statuses[0].running
    _assert_all_gone(procs)
    assert not (stack_settings.home / "stack" / "supervisord.json").exists()


def test_foreground_reports_a_service_that_stops(stack_settings: Settings) -> None:
    def kill_redis(statuses: list[ServiceStatus]) -> None:
        os.kill(statuses[0].pid, signal.SIGKILL)

    with pytest.raises(StackError, match=r"redis stopped; see .*redis\.log"):
        localstack.foreground(stack_settings, ["redis"], on_ready=kill_redis, poll_s=0.2)
    assert not (stack_settings.home / "stack" / "supervisord.json").exists()
