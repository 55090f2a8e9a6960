"""`flywheel train` as a user runs it, interrupted and killed: nothing outlives it, the re-run resumes.

Each test drives the real CLI in a subprocess on a fresh home (local Ray, SQLite MLflow).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.integration

FLYWHEEL = Path(sys.executable).with_name("flywheel")
# Tiny steps; a checkpoint every 5 of 40 steps: the first comes early, and a kill leaves steps to resume.
PARAMS = {"batch_size": 4, "eval_examples": 8, "warmup_steps": 1, "checkpoint_every": 5, "eval_every": 0}
STEPS = 40


def _env(base_model_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    # The session's base model: the CLI would otherwise build one under every home.
    env.update(FLYWHEEL_BASE_MODEL=str(base_model_dir), RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1")
    return env


def _flywheel(
    home: Path, *args: str, env: dict[str, str], timeout: float = 300
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(FLYWHEEL), "--home", str(home), *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _seeded_home(home: Path, env: dict[str, str]) -> Path:
    done = _flywheel(home, "data", "seed", "--rows", "600", env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    params = home.parent / "params.json"
    params.write_text(json.dumps(PARAMS))
    return params


def _train_cmd(home: Path, params: Path, *extra: str) -> list[str]:
    return [str(FLYWHEEL), "--home", str(home), "train", "--params", str(params), *extra]


def _start(cmd: list[str], env: dict[str, str], log_file: Path) -> subprocess.Popen:
    """Start a command in its own process group, its output in a file (a pipe could fill and block it)."""
    with log_file.open("w") as out:
        proc = subprocess.Popen(
            cmd, env=env, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    proc.log_file = log_file  # type: ignore[attr-defined]
    return proc


def _runs(home: Path) -> list:
    from mlflow import MlflowClient

    from components.settings import Settings

    settings = Settings(home=home, _env_file=None)
    client = MlflowClient(settings.tracking_uri)
    experiment = client.get_experiment_by_name(settings.experiment_name)
    return client.search_runs([experiment.experiment_id]) if experiment else []


def _wait_for_checkpoint_and_ray(home: Path, proc: subprocess.Popen, timeout: float = 240) -> dict:
    """The owner record of the running train once it has recorded its Ray session and made a checkpoint."""
    from components.procs import read_record

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = proc.log_file.read_text()[-3000:]  # type: ignore[attr-defined]
        assert proc.poll() is None, f"train ended early ({proc.returncode}): {log}"
        for owner_file in (home / "runs").glob("*/owner.json"):
            record = read_record(owner_file)
            if not record or not record.get("ray_session_dir"):
                continue
            # A checkpoint Ray registered (a crash in the ~2 s before that loses it, by design), and
            # registered by this process's Ray session (newer than its record), not an earlier one.
            snapshot = owner_file.parent / "checkpoint_manager_snapshot.json"
            if snapshot.exists() and snapshot.stat().st_mtime > owner_file.stat().st_mtime:
                registered = read_record(snapshot) or {}
                if registered.get("latest_checkpoint_result"):
                    return record
        time.sleep(0.3)
    pytest.fail(f"no checkpoint within {timeout} s")


def _survivors(record: dict) -> list[str]:
    """Live processes of the recorded Ray session, or naming the home's Ray temp dir."""
    import psutil

    from components.procs import session_processes

    found = {p.pid for p in session_processes(record["ray_session_dir"], record.get("ray_pids", []))}
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        if proc.info["status"] != psutil.STATUS_ZOMBIE and record["ray_temp_dir"] in " ".join(
            proc.info["cmdline"] or ()
        ):
            found.add(proc.info["pid"])
    alive = []
    for pid in sorted(found):
        try:
            alive.append(f"{pid} {' '.join(psutil.Process(pid).cmdline())[:120]}")
        except psutil.Error:
            continue
    return alive


def _wait_until_gone(record: dict, seconds: float) -> list[str]:
    deadline = time.monotonic() + seconds
    while (left := _survivors(record)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def _cleanup(proc: subprocess.Popen | None, records: list[dict]) -> None:
    """Whatever happened in the test, leave nothing of ours running."""
    from components.procs import kill_session

    if proc is not None and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    for record in records:
        kill_session(record["ray_session_dir"], record.get("ray_pids", []))


def test_sigterm_and_kill_9_leave_nothing_running_and_the_rerun_resumes(tmp_path, base_model_dir):
    from components.settings import Settings
    from components.train import reap_stale

    home = tmp_path / "home"
    env = _env(base_model_dir)
    params = _seeded_home(home, env)
    cmd = _train_cmd(home, params, "--workers", "1", "--max-steps", str(STEPS))
    records: list[dict] = []
    proc = None
    try:
        # 1. SIGTERM (what a supervisor or `kill` sends): exit 130, the run KILLED, Ray gone.
        proc = _start(cmd, env, tmp_path / "train-1.log")
        records.append(_wait_for_checkpoint_and_ray(home, proc))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) in (130, 128 + signal.SIGTERM)  # interrupted, not an error exit
        assert _wait_until_gone(records[-1], 5) == []
        (run,) = _runs(home)
        assert run.info.status == "KILLED"

        # 2. kill -9 (no chance to clean up): its watchdog stops local Ray within seconds.
        proc = _start(cmd, env, tmp_path / "train-2.log")
        records.append(_wait_for_checkpoint_and_ray(home, proc))
        assert records[-1]["run_id"] == run.info.run_id  # the KILLED run was reopened, not a new one
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert _wait_until_gone(records[-1], 8) == []
        # The run it left RUNNING is marked failed by the next command (or by reap_stale).
        assert reap_stale(Settings(home=home, _env_file=None)) == [run.info.run_id]
        (run,) = _runs(home)
        assert run.info.status == "FAILED"
        assert not list((home / "runs").glob("*/owner.json"))

        # 3. The same command again resumes from the last checkpoint and finishes the one run.
        done = subprocess.run(
            [*cmd, "--json"], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr[-3000:]
        (run,) = _runs(home)
        assert run.info.status == "FINISHED" and json.loads(done.stdout)["run_id"] == run.info.run_id
        assert int(run.data.tags["resumed_from_step"]) >= PARAMS["checkpoint_every"]  # not from step 0
        assert json.loads(done.stdout)["steps"] == STEPS
        assert _wait_until_gone(records[-1], 1) == []
    finally:
        _cleanup(proc, records)


@pytest.fixture
def odd_home():
    """A short home whose path has a space and a non-ASCII letter (short: Ray would use it as is)."""
    parent = Path(tempfile.mkdtemp(prefix="fw é ", dir="/tmp"))
    try:
        yield parent / "my home é"
    finally:
        shutil.rmtree(parent, ignore_errors=True)


@pytest.mark.parametrize("runner", ["--no-ray", "--ray"])
def test_a_home_with_a_space_and_an_accent_trains(odd_home, base_model_dir, runner):
    env = _env(base_model_dir)
    params = _seeded_home(odd_home, env)
    steps = "3" if runner == "--no-ray" else "4"
    done = subprocess.run(
        [*_train_cmd(odd_home, params, "--workers", "1", "--max-steps", steps, runner), "--json"],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["steps"] == int(steps)
    (run,) = _runs(odd_home)
    assert run.info.status == "FINISHED"
