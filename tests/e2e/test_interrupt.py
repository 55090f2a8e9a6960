"""Ctrl-C during `flywheel demo`: exit 130, one line saying what was interrupted, nothing left running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.e2e

FLYWHEEL = str(Path(sys.executable).with_name("flywheel"))


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _training_started(home: Path) -> bool:
    # The training task writes checkpoints under <home>/runs once its loop is going.
    return any((home / "runs").glob("*/checkpoint_*")) if (home / "runs").exists() else False


def test_ctrl_c_during_the_demo_training(tmp_path):
    from mlflow import MlflowClient

    home = tmp_path / "home"
    env = {**os.environ, "FLYWHEEL_SERVE_PORT": str(free_port()), "HF_HUB_OFFLINE": "1"}
    env.pop("FLYWHEEL_HOME", None)
    argv = [FLYWHEEL, "--home", str(home), "demo", "--no-ray", "--workers", "1", "--max-steps", "4000"]
    # A terminal's Ctrl-C reaches the whole foreground process group: start one of our own.
    child = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    deadline = time.monotonic() + 600
    while not _training_started(home):
        assert child.poll() is None, child.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "training never started"
        time.sleep(1)
    descendants = _descendants(child.pid)
    os.killpg(child.pid, signal.SIGINT)
    try:
        _, stderr = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
    assert child.returncode == 130, stderr[-3000:]
    assert "interrupted during train v1" in stderr and "Traceback" not in stderr
    time.sleep(3)
    left = [p for p in descendants if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, [p.cmdline() for p in left]
    client = MlflowClient(f"sqlite:///{home / 'mlflow' / 'mlflow.db'}")
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], "tags.`flywheel.step` = 'train'"
    )
    assert runs and all(r.info.status == "KILLED" for r in runs), [r.info.status for r in runs]
