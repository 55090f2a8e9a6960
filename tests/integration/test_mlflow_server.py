"""The registry through a real MLflow tracking server on PostgreSQL, artifacts proxied by the server."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port, require

pytestmark = pytest.mark.integration

PG_HOST, PG_PORT = "127.0.0.1", 5432
PG_USERS = ("postgres", "root")


def _admin_connection():
    """An autocommit connection to the maintenance database, as the first user that works."""
    import psycopg

    errors = []
    for user in PG_USERS:
        try:
            conn = psycopg.connect(
                host=PG_HOST, port=PG_PORT, user=user, dbname="postgres", autocommit=True, connect_timeout=3
            )
            return conn, user
        except psycopg.OperationalError as exc:
            errors.append(f"{user}: {exc}".strip())
    require(False, f"PostgreSQL at {PG_HOST}:{PG_PORT} unreachable ({'; '.join(errors)})")
    raise AssertionError("unreachable")  # require() skipped or failed


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, uniquely named PostgreSQL database for this test, dropped afterwards."""
    from psycopg import sql

    conn, user = _admin_connection()
    name = f"flywheel_mlflow_{uuid.uuid4().hex[:12]}"
    with conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            yield f"postgresql://{user}@{PG_HOST}:{PG_PORT}/{name}"
        finally:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def mlflow_server(pg_url: str, tmp_path: Path) -> Iterator[str]:
    """``mlflow server`` on a free loopback port (one worker, no job runner); stopped by process group."""
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log_file = (tmp_path / "mlflow-server.log").open("wb")
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", pg_url,
        "--artifacts-destination", str(tmp_path / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"mlflow server exited ({proc.returncode}): {_tail(tmp_path / 'mlflow-server.log')}"
                )
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server not healthy in 120 s: {_tail(tmp_path / 'mlflow-server.log')}")
            time.sleep(0.5)
        yield url
    finally:
        _stop_group(proc)
        log_file.close()


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (its workers included); SIGKILL what is left after 20 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        proc.poll()
        try:
            os.killpg(proc.pid, 0)  # anyone left in the group?
        except ProcessLookupError:
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def _tail(path: Path, chars: int = 2000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


@pytest.fixture
def restore_global_tracking_uri() -> Iterator[None]:
    """``train`` sets MLflow's process-global tracking URI: put it back for the tests after this one."""
    import mlflow

    before = mlflow.get_tracking_uri()
    yield
    mlflow.set_tracking_uri(before)


def test_register_and_promote_through_a_tracking_server(
    mlflow_server, restore_global_tracking_uri, seed_ref, base_model_dir, tmp_path
):
    from mlflow import MlflowClient

    from components import predict, registry
    from components.evaluate import evaluate
    from components.schemas import PromotionGate, TrainParams
    from components.settings import Settings
    from components.tracking import experiment_id
    from components.train import train

    settings = Settings(
        home=tmp_path / "home",
        mlflow_tracking_uri=mlflow_server,
        base_model=str(base_model_dir),
        model_name="flywheel-it",
        _env_file=None,
    )
    client = MlflowClient(mlflow_server, mlflow_server)
    # Created first, without a local artifact root: the server picks it (proxied artifacts).
    exp = client.get_experiment(experiment_id(client, settings))
    assert exp.artifact_location.startswith("mlflow-artifacts:")

    params = TrainParams(max_steps=3, batch_size=8, workers=1, eval_examples=16, checkpoint_every=3)
    result = train(seed_ref, params, settings, use_ray=False)
    version = registry.register(result, settings)
    assert registry.register(result, settings) == version
    assert client.get_registered_model(settings.model_name).aliases == {"challenger": version}

    report = evaluate(
        f"models:/{settings.model_name}/{version}", None, seed_ref, None, settings, max_examples=16
    )
    assert report.candidate.version == version and report.run_id
    registry.record_evaluation(version, report, settings)
    decision = registry.promote(
        version, PromotionGate(min_fact_accuracy=0, min_behavioural_pass_rate=0), settings
    )
    assert decision.promoted, decision.reasons
    assert registry.promote(version, PromotionGate(), settings).checks == {"already_champion": True}

    champion = registry.resolve("champion", settings)
    assert champion.version == version and champion.download_uri.startswith("mlflow-artifacts:")
    assert [m.aliases for m in registry.list_models(settings)] == [["champion"]]
    tags = client.get_model_version(settings.model_name, version).tags
    assert tags[registry.TAG_DATASET_SHA] == seed_ref.sha256 and tags[registry.TAG_PROMOTED] == "true"
    card = client.download_artifacts(result.run_id, registry.MODEL_CARD_ARTIFACT, str(tmp_path))
    assert "## Known limitations" in Path(card).read_text()

    # Serving's path: the champion's files come through the server, not from a local folder.
    predictor = predict.load(f"models:/{settings.model_name}@champion", settings)
    assert predictor.model.num_parameters() > 0 and predictor.version == version
