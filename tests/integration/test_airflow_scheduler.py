"""The SFT dataset asset really starts `training_pipeline` under a running scheduler.

`flywheel up airflow` on a temp home and a free port; an asset event is posted through the REST
API, as `feedback_loop`'s `publish` outlet would make one. The scheduler must create an
asset-triggered run whose `snapshot` task takes the snapshot the event names (not the newest one
on disk). The run is bounded by a rejection: `FLYWHEEL_MIN_TRAIN_ROWS` is set beyond the
dataset's size, so `validate` refuses it with its one-line reason and nothing trains (an
asset-triggered run uses the DAG's default params: a full-size training). `down` then leaves no
process of this Airflow behind.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from components import localstack, pipeline
from components.schemas import DatasetRef
from components.settings import Settings
from tests.conftest import free_port, require
from tests.integration.airflow_api import AirflowAPI, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

DAG_ID = "training_pipeline"
SFT_URI = "flywheel://datasets/sft"
REPLAY_URI = "file:///feedback/replay/0123abcd"  # passed through by snapshot, not opened


def _processes_of(airflow_home: Path) -> list[psutil.Process]:
    """Live processes whose environment names this AIRFLOW_HOME: every Airflow process of the stack."""
    found = []
    for proc in psutil.process_iter(["pid", "status"]):
        if proc.info["status"] == psutil.STATUS_ZOMBIE or proc.pid == os.getpid():
            continue
        try:
            if proc.environ().get("AIRFLOW_HOME") == str(airflow_home):
                found.append(proc)
        except psutil.Error:  # gone, or another user's: not ours
            continue
    return found


@pytest.fixture
def airflow_stack(
    tmp_path: Path, base_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Settings, AirflowAPI, DatasetRef, DatasetRef]]:
    """Local Airflow on a temp home with two seeded snapshots; the stack is stopped after the test."""
    require(Path(sys.executable).with_name("airflow").is_file(), "the airflow CLI is not installed")
    for name in [n for n in os.environ if n.startswith(("FLYWHEEL_", "AIRFLOW"))]:
        monkeypatch.delenv(name)
    # supervisord, and through it Airflow and every task process, inherit this environment.
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FLYWHEEL_AIRFLOW_PORT", str(free_port()))
    monkeypatch.setenv("FLYWHEEL_BASE_MODEL", str(base_model_dir))
    # Far beyond the seeded rows: validate rejects the dataset, so the run ends without training.
    monkeypatch.setenv("FLYWHEEL_MIN_TRAIN_ROWS", "100000")
    settings = Settings()
    named = pipeline.seed(settings, rows=600)
    # A newer snapshot: the one a run would take without the event's sha256.
    newest = pipeline.seed(settings, rows=600, seed=1)
    assert pipeline.resolve_dataset(settings, None).sha256 == newest.sha256 != named.sha256
    api = None
    try:
        (status,) = localstack.up(settings, ["airflow"])
        api = AirflowAPI(status.url, settings.airflow_home)
        api.login()
        # The API server builds its Execution API on the first request to it (10-30 s on two busy
        # cores, answering nothing meanwhile); the first task's start call would spend its retries
        # on that. Built here once, as `flywheel up` should do (see benchmarks/pipeline.py).
        httpx.get(f"{status.url}/execution/health", timeout=180).raise_for_status()
        yield settings, api, named, newest
    finally:
        if api is not None:
            api.close()
        localstack.down(settings)
    left = _processes_of(settings.airflow_home)
    assert not left, f"Airflow processes left after down: {[(p.pid, p.name()) for p in left]}"


def test_asset_event_starts_training_pipeline(airflow_stack) -> None:
    settings, api, named, newest = airflow_stack
    dags = api.wait_for_dags([DAG_ID, "feedback_loop"], timeout_s=120)
    assert dags[DAG_ID]["is_paused"]  # created paused: nothing ran before we asked
    api.unpause(DAG_ID)
    asset_id = api.asset_id(SFT_URI)
    assert api.runs(DAG_ID) == []

    event = api.create_asset_event(asset_id, {"sha256": named.sha256, "replay_uri": REPLAY_URI})

    runs: list[dict] = []

    def triggered() -> bool:
        runs[:] = api.runs(DAG_ID)
        return bool(runs)

    wait_until(triggered, timeout_s=60, what="the scheduler to create a run from the asset event")
    (run,) = runs
    assert run["run_type"] == "asset_triggered"
    run_id = run["dag_run_id"]

    finished = api.wait_for_run(DAG_ID, run_id, timeout_s=240)

    # Asked once the run has started: Airflow 3.3.2 answers 500 while it is queued (no start_date).
    consumed = api.get(f"/dags/{DAG_ID}/dagRuns/{run_id}/upstreamAssetEvents")["asset_events"]
    assert [e["id"] for e in consumed] == [event["id"]]

    states = {task_id: ti["state"] for task_id, ti in api.task_instances(DAG_ID, run_id).items()}
    assert states["snapshot"] == "success", states
    snap = api.xcom(DAG_ID, run_id, "snapshot")
    # The event's snapshot, not the newest one on disk; the replay set passed on as named.
    assert snap["dataset"]["sha256"] == named.sha256
    assert snap["replay"] == REPLAY_URI
    # validate got that snapshot and refused it with one line; nothing trained, the run failed.
    assert states["validate"] == "failed", states
    assert states["train"] == "upstream_failed" and states["deploy"] == "upstream_failed", states
    assert finished["state"] == "failed"
    log = api.log(DAG_ID, run_id, "validate")
    assert f"REJECTED dataset {named.sha256[:12]}" in log
    assert "Traceback" not in log
    assert not (settings.home / "runs").exists() or not any((settings.home / "runs").iterdir())
