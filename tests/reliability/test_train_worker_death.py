"""A Ray Train worker process SIGKILLed from outside after the first checkpoint: the run completes from it.

``components.train.train`` runs a real ``TorchTrainer`` (one CPU worker, 40 steps, a checkpoint
every 10) on a local Ray of this module's own. A watcher in the test reads two things from
outside the training code: the checkpoint Ray has *registered* (its
``checkpoint_manager_snapshot.json``; a checkpoint counts once Ray registered it, which it does
within its ~2 s poll, as ``components.train`` documents) and the step each worker has started
(a step hook that only appends ``step rank pid`` to a file, and paces steps by 0.25 s so the kill
lands mid-interval on any machine). Once the first checkpoint is registered and no later one can
have been reported yet, the worker's PID (checked to be a ``RayTrainWorker`` process of this
Ray) gets SIGKILL. Ray Train's ``FailureConfig(max_failures=1)`` restarts the worker group,
which resumes from the registered checkpoint.

Figures: steps redone (steps the killed worker had started past the checkpoint it resumed
from; goal <= one checkpoint interval), final eval loss against an uninterrupted run of the same
seed (the same loop in-process, which with one worker computes the same thing; goal within
2 %), MLflow runs (goal 1) and registered versions (goal 1, also after a retry through
``pipeline.train_and_register``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

pytestmark = [pytest.mark.reliability]

STEPS = 40
EVERY = 10  # checkpoint interval, in steps
PACE_S = 0.25  # sleep in the step hook: an interval (~3 s) outlasts Ray's ~2 s checkpoint registration
KILL_TIMEOUT_S = 240
TRAIN = dict(
    max_steps=STEPS,
    workers=1,
    batch_size=4,
    max_seq_len=96,
    learning_rate=3e-3,
    warmup_steps=2,
    eval_every=0,
    eval_examples=16,
    checkpoint_every=EVERY,
    max_failures=1,
    seed=0,
)


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """A local Ray of this module's own (another suite's is shut down first), shut down at the end."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    # Ray's Unix socket paths live under the temp dir and must stay under 107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="fw-kill-", dir="/tmp"))
    ray.init(
        num_cpus=max(os.cpu_count() or 1, 2),
        include_dashboard=False,
        _temp_dir=str(temp_dir),
        log_to_driver=False,
    )
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _step_log(path: str, pace_s: float):
    """A step hook that records ``step rank pid`` and sleeps; a closure, so Ray pickles it by value."""

    def hook(step: int, session) -> None:
        import os
        import time

        line = f"{step} {session.world_rank} {os.getpid()}\n".encode()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)  # one small O_APPEND write: lines never interleave
        finally:
            os.close(fd)
        time.sleep(pace_s)

    return hook


def _steps_started(path: Path) -> list[tuple[int, int, int]]:
    """(step, rank, pid) of every step hook call so far."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3:
            rows.append((int(parts[0]), int(parts[1]), int(parts[2])))
    return rows


def _registered_step(runs_dir: Path) -> int | None:
    """The step of the latest checkpoint Ray Train has registered for the (one) run under ``runs_dir``."""
    for snapshot in runs_dir.glob("*/checkpoint_manager_snapshot.json"):
        try:
            latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
        except (OSError, ValueError):  # being rewritten: read it on the next poll
            return None
        if latest and "step" in latest.get("metrics", {}):
            return int(latest["metrics"]["step"])
    return None


def _ray_train_worker(pid: int) -> psutil.Process:
    """The process ``pid``, checked to be a Ray Train worker started under this test process."""
    proc = psutil.Process(pid)
    assert "RayTrainWorker" in " ".join(proc.cmdline()), proc.cmdline()
    assert pid in {p.pid for p in psutil.Process().children(recursive=True)}, "not a process of our Ray"
    return proc


def _kill_after_first_checkpoint(
    runs_dir: Path, log: Path, trainer: threading.Thread
) -> tuple[int, int, float]:
    """SIGKILL the training worker once a checkpoint is registered and no later one was reported.

    A step ``s <= R + EVERY`` has been started but the checkpoint after ``R`` is reported only
    when step ``R + EVERY`` ends, so every checkpoint reported so far is registered.

    Returns:
        (killed pid, registered step at the kill, monotonic time of the kill).
    """
    deadline = time.monotonic() + KILL_TIMEOUT_S
    while time.monotonic() < deadline:
        assert trainer.is_alive(), "training ended before the kill"
        registered = _registered_step(runs_dir)
        started = _steps_started(log)
        if registered and started:
            step, _, pid = started[-1]
            if registered < step < registered + EVERY:
                _ray_train_worker(pid).send_signal(signal.SIGKILL)
                return pid, registered, time.monotonic()
        time.sleep(0.05)
    pytest.fail(f"no registered checkpoint with a step after it within {KILL_TIMEOUT_S} s")


def test_sigkill_of_a_train_worker_resumes_from_the_checkpoint(
    local_ray, tmp_path, base_model_dir, seed_ref, figures
):
    from mlflow import MlflowClient

    from components import pipeline
    from components.registry import list_models, register
    from components.schemas import TrainParams
    from components.settings import Settings
    from components.train import train
    from components.trainloop import fit

    settings = Settings(home=tmp_path / "home", base_model=str(base_model_dir), _env_file=None)
    ref = seed_ref  # the session's snapshot of the default corpus
    params = TrainParams(base_model=str(base_model_dir), **TRAIN)
    log = tmp_path / "steps.log"

    outcome: dict = {}

    def _train() -> None:
        try:
            outcome["result"] = train(ref, params, settings, on_step=_step_log(str(log), PACE_S))
        except BaseException as exc:  # re-raised in the test below
            outcome["error"] = exc

    trainer = threading.Thread(target=_train, name="train-under-fault")
    trainer.start()
    try:
        killed_pid, registered_at_kill, killed_at = _kill_after_first_checkpoint(
            settings.runs_dir, log, trainer
        )
    finally:
        trainer.join(timeout=600)
    assert not trainer.is_alive(), "training did not finish within 600 s of the kill"
    if "error" in outcome:
        raise outcome["error"]
    result = outcome["result"]
    assert not psutil.pid_exists(killed_pid) or psutil.Process(killed_pid).status() == psutil.STATUS_ZOMBIE

    # What the killed worker had started, and where the restarted group picked up.
    started = _steps_started(log)
    before = [step for step, _, pid in started if pid == killed_pid]
    after = [step for step, _, pid in started if pid != killed_pid]
    assert before and after, "no worker trained after the kill"
    resumed_from = after[0] - 1
    redone = max(before) - resumed_from

    client = MlflowClient(settings.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(settings.experiment_name).experiment_id])
    resumed_at = _first_step_time_after(client, result.run_id, resumed_from)

    # The same seed, uninterrupted: the same loop in this process (one worker, so the same batches).
    baseline = fit(ref, params, settings)
    eval_loss, base_loss = result.metrics["eval_loss"], baseline.metrics["eval_loss"]
    drift = abs(eval_loss - base_loss) / base_loss

    # One version, also when the step is retried through the pipeline's entry point.
    version = register(result, settings)
    again = pipeline.train_and_register(settings, ref, params)
    versions = [v.version for v in list_models(settings)]

    figures.record(
        "resumed from step", resumed_from, unit="step", goal=f">= {EVERY}", ok=resumed_from >= EVERY
    )
    figures.record(
        "steps redone after the kill", redone, unit="steps", goal=f"<= {EVERY}", ok=0 < redone <= EVERY
    )
    figures.record(
        "final eval loss vs uninterrupted run", 100 * drift, unit="%", goal="<= 2", ok=drift <= 0.02
    )
    figures.record("MLflow runs", len(runs), goal="1", ok=len(runs) == 1)
    figures.record("registered versions", len(versions), goal="1", ok=versions == [version])
    if resumed_at is not None:
        figures.record("kill to first step logged after resume", resumed_at - killed_at, unit="s")

    assert resumed_from == registered_at_kill >= EVERY  # the checkpoint Ray had registered, not step 0
    assert after == list(range(resumed_from + 1, STEPS + 1)) and result.steps == STEPS
    assert 0 < redone <= EVERY
    assert math.isfinite(eval_loss) and drift <= 0.02, (eval_loss, base_loss)
    (run,) = runs
    assert run.info.run_id == result.run_id and run.info.status == "FINISHED"
    assert int(run.data.tags["resumed_from_step"]) == resumed_from
    assert again.result.reused and again.result.run_id == result.run_id and again.version == version
    assert versions == [version] == ["1"]


def _first_step_time_after(client, run_id: str, step: int) -> float | None:
    """Monotonic-clock time of the first train-loss point logged for ``step + 1`` after the resume.

    MLflow stores wall-clock milliseconds; converted with the current offset between the clocks.
    """
    points = [m for m in client.get_metric_history(run_id, "train_loss") if m.step == step + 1]
    if not points:
        return None
    latest_ms = max(m.timestamp for m in points)  # logged twice when the killed worker flushed it
    return latest_ms / 1000 - (time.time() - time.monotonic())
