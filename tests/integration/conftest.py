"""Integration fixtures: a real local Ray head with its dashboard and Jobs API."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port

# Ray start, on two busy cores, takes 5-15 s; a head that is not up in this long is broken.
_HEAD_START_TIMEOUT_S = 90
_HEAD_STOP_TIMEOUT_S = 5


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the head's process group, then SIGKILL what is left (never ``ray stop``: it kills every Ray)."""
    for sig, wait_s in ((signal.SIGTERM, _HEAD_STOP_TIMEOUT_S), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
        # The leader is gone; children of the group may still be exiting.
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


@pytest.fixture(scope="session")
def ray_jobs_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of the Jobs API of a local Ray head (1 CPU, token auth off), started for this session.

    Every port is a free one (the machine's Redis holds 6379, other test sessions run their own
    heads); the head runs ``flywheel`` from this venv, so jobs run this checkout's code.
    """
    bin_dir = Path(sys.executable).parent
    # Ray's Unix socket paths live under the temp dir and must stay under 107 bytes: keep it short.
    temp_dir = Path(tempfile.mkdtemp(prefix="fwray-", dir="/tmp"))
    log_file = tmp_path_factory.mktemp("ray-head") / "head.log"
    dashboard_port = free_port()
    ports = {
        "--port": free_port(),
        "--dashboard-port": dashboard_port,
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--ray-client-server-port": free_port(),
        "--node-manager-port": free_port(),
        "--object-manager-port": free_port(),
        "--runtime-env-agent-port": free_port(),
        "--metrics-export-port": free_port(),
    }
    command = [str(bin_dir / "ray"), "start", "--head", "--block", "--include-dashboard", "true"]
    command += ["--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1"]
    command += ["--temp-dir", str(temp_dir), "--num-cpus", "1", "--disable-usage-stats"]
    for flag, port in ports.items():
        command += [flag, str(port)]
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    url = f"http://127.0.0.1:{dashboard_port}"
    with open(log_file, "wb") as log:
        proc = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + _HEAD_START_TIMEOUT_S
        while not _answers(f"{url}/api/version"):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"Ray head did not come up:\n{log_file.read_text(errors='replace')[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        _stop_group(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)
