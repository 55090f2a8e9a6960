"""Airflow for DAG tests: a migrated SQLite metadata DB in a temp AIRFLOW_HOME, this repo's dags/ folder.

Airflow reads its configuration when first imported, so test modules here import it inside
tests and fixtures, after ``airflow_home`` has set the environment.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from dagtools import DAGS_FOLDER


@pytest.fixture(scope="session")
def airflow_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A temp AIRFLOW_HOME with a migrated metadata DB; the environment is set for the session."""
    if "airflow.configuration" in sys.modules and os.environ.get("AIRFLOW_HOME", "") == "":
        pytest.fail("airflow was imported before the DAG tests configured it")
    home = tmp_path_factory.mktemp("airflow")
    env = {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
    }
    os.environ.update(env)
    airflow = Path(sys.executable).with_name("airflow")
    subprocess.run(
        [str(airflow), "db", "migrate"], check=True, capture_output=True, env=os.environ.copy(), timeout=300
    )
    import logging

    # Importing airflow before great_expectations floods the log with GX INFO lines.
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    return home


@pytest.fixture
def flywheel_env(
    airflow_home: Path, tmp_path: Path, base_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """FLYWHEEL_* for the task bodies dag.test runs in this process: a fresh home, the session base model."""
    home = tmp_path / "flywheel"
    for name in [n for n in os.environ if n.startswith("FLYWHEEL_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("FLYWHEEL_HOME", str(home))
    monkeypatch.setenv("FLYWHEEL_BASE_MODEL", str(base_model_dir))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    return home
