"""`flywheel up` / `down` for real: Redis and an MLflow server start on free loopback ports under a
temporary home, answer, and leave nothing behind; a taken port fails with a clear error."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import redis

from components import localstack
from components.localstack import ServiceStatus, StackError
from components.settings import Settings

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


def _group(pgid: int) -> list[psutil.Process]:
    members = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(proc)
        except (ProcessLookupError, PermissionError):
            continue
    return members


@pytest.fixture
def stack_settings(tmp_path: Path) -> Iterator[Settings]:
    """Settings on a fresh home and free ports; whatever the test started is stopped after it."""
    settings = Settings(
        home=tmp_path / "home",
        redis_port=_free_port(),
        mlflow_port=_free_port(),
        airflow_port=_free_port(),
        _env_file=None,
    )
    yield settings
    localstack.down(settings)


def test_up_serves_then_down_leaves_nothing(stack_settings: Settings) -> None:
    statuses = localstack.up(stack_settings, services=("redis", "mlflow"))

    assert [s.name for s in statuses] == ["redis", "mlflow"]
    assert all(isinstance(s, ServiceStatus) and s.running and s.pid for s in statuses)
    by_name = {s.name: s for s in statuses}
    assert redis.Redis.from_url(by_name["redis"].url).ping()
    assert httpx.get(f"{by_name['mlflow'].url}/health", timeout=5).status_code == 200
    stack = stack_settings.home / "stack"
    assert (stack / "redis.pid").is_file() and (stack / "logs" / "mlflow.log").is_file()

    # A second `up` is a no-op for running services: same processes.
    again = localstack.up(stack_settings, services=("redis", "mlflow"))
    assert [s.pid for s in again] == [s.pid for s in statuses]
    assert {s.name: s.running for s in localstack.status(stack_settings)} == {
        "redis": True,
        "mlflow": True,
        "airflow": False,
    }

    pids = [s.pid for s in statuses]
    assert sorted(localstack.down(stack_settings)) == ["mlflow", "redis"]

    for pid in pids:
        assert not _group(pid), f"process group {pid} still has members"
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert _port_free(stack_settings.redis_port) and _port_free(stack_settings.mlflow_port)
    assert not list(stack.glob("*.pid"))
    assert not any(s.running for s in localstack.status(stack_settings))
    assert localstack.down(stack_settings) == []


def test_taken_port_is_a_clear_error(stack_settings: Settings) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", stack_settings.redis_port))
        holder.listen()
        with pytest.raises(
            StackError, match=rf"port {stack_settings.redis_port} for redis is already in use"
        ):
            localstack.up(stack_settings, services=("redis", "mlflow"))
    # The clash is found before anything starts: MLflow was not started either.
    assert not any(s.running for s in localstack.status(stack_settings))
    assert _port_free(stack_settings.mlflow_port)


def test_unknown_service_is_refused(stack_settings: Settings) -> None:
    with pytest.raises(StackError, match="unknown service"):
        localstack.up(stack_settings, services=("redis", "postgres"))


def test_down_ignores_processes_it_did_not_start(stack_settings: Settings) -> None:
    # A PID file naming a live process that is not the one recorded (recycled PID): untouched.
    stack = stack_settings.home / "stack"
    stack.mkdir(parents=True)
    me = psutil.Process()
    record = {
        "pid": me.pid,
        "pgid": me.pid,
        "create_time": me.create_time() - 1000.0,
        "port": 1,
        "url": "x",
        "command": [],
    }
    (stack / "redis.pid").write_text(json.dumps(record))
    assert localstack.status(stack_settings)[0].running is False
    assert localstack.down(stack_settings) == []
    assert me.is_running()


def test_airflow_standalone_up_and_down(
    stack_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An empty DAGs folder: this checks the service, not the project's DAGs.
    monkeypatch.setenv("FLYWHEEL_DAGS_FOLDER", str(tmp_path / "dags"))
    (tmp_path / "dags").mkdir()

    (airflow,) = localstack.up(stack_settings, services=("airflow",))

    health = httpx.get(f"{airflow.url}/api/v2/monitor/health", timeout=10).json()
    assert health["metadatabase"]["status"] == "healthy"
    assert (stack_settings.airflow_home / "airflow.db").is_file()
    assert localstack.down(stack_settings) == ["airflow"]
    assert not _group(airflow.pid)
    assert _port_free(stack_settings.airflow_port)
