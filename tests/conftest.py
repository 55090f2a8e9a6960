"""Shared fixtures: an isolated flywheel home, the seed corpus and the built base model."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

# Offline and quiet before anything heavy is imported by a test module.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
# Spinning OpenMP threads starve each other when test processes share the two cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

IN_CI = os.environ.get("CI", "").lower() == "true"
REPO_ROOT = Path(__file__).resolve().parents[1]


def require(condition: bool, reason: str) -> None:
    """Skip when a required engine or tool is missing locally; fail in CI (CI=true)."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required in CI: {reason}")
    pytest.skip(reason)


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_up(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a Redis answers PING on ``host:port``."""
    import redis

    try:
        return bool(redis.Redis(host=host, port=port, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


PG_HOST, PG_PORT = "127.0.0.1", 5432
PG_USERS = ("postgres", "root")


@pytest.fixture
def pg_url():
    """A plain ``postgresql://`` URL (as users write it) of a fresh database, dropped afterwards."""
    import uuid

    import psycopg

    admin, user, errors = None, "", []
    for user in PG_USERS:
        try:
            admin = psycopg.connect(
                host=PG_HOST, port=PG_PORT, user=user, dbname="postgres", autocommit=True, connect_timeout=3
            )
            break
        except psycopg.OperationalError as e:
            errors.append(f"{user}: {e}".strip())
    require(admin is not None, f"PostgreSQL at {PG_HOST}:{PG_PORT} unreachable ({'; '.join(errors)})")
    name = f"fw_test_{uuid.uuid4().hex[:12]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://{user}@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture(scope="session", autouse=True)
def _session_tmpdir(tmp_path_factory: pytest.TempPathFactory) -> None:
    # MLflow's load_model and Ray leave temp folders: keep them inside pytest's temp root.
    tmp = tmp_path_factory.mktemp("tmp")
    os.environ["TMPDIR"] = str(tmp)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A fresh flywheel home for one test."""
    return tmp_path / "home"


@pytest.fixture
def settings(home: Path):
    """Settings bound to a fresh home, ignoring the caller's FLYWHEEL_* environment."""
    from components.settings import Settings

    return Settings(home=home, _env_file=None)


@pytest.fixture(scope="session")
def base_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default base model, built once per test session."""
    from components.base_model import init_base

    return init_base(tmp_path_factory.mktemp("base") / "base", seed=0)


@pytest.fixture(scope="session")
def corpus():
    """The default support corpus (policy v1), by split."""
    from components.data import generate_corpus

    return generate_corpus(rows=2400, policy_version="v1", seed=0)


@pytest.fixture(scope="session")
def seed_ref(tmp_path_factory: pytest.TempPathFactory, corpus):
    """A snapshot of the default corpus in a session-wide datasets folder."""
    from components.data import snapshot

    return snapshot(corpus, tmp_path_factory.mktemp("datasets"))


# Measured figures ---------------------------------------------------------------------------
# Reliability and security tests record what they measured; the figures are printed at the end
# of the run and, with FLYWHEEL_FIGURES set to a file, appended there as JSON lines
# (benchmarks/reliability.py collects them into benchmarks/results/reliability.json).

FIGURES_ENV = "FLYWHEEL_FIGURES"
_FIGURES: list[dict] = []


class Figures:
    """One test's measured figures: ``figures.record("failed requests", 0, goal="0", ok=True)``."""

    def __init__(self, test: str) -> None:
        self.test = test

    def record(
        self, name: str, value: float | int | str, *, unit: str = "", goal: str = "", ok: bool | None = None
    ) -> None:
        """Keep one figure; ``ok`` says whether it met its goal (None: no goal)."""
        import json

        if isinstance(value, float):
            value = round(value, 4)
        row = {"test": self.test, "name": name, "value": value, "unit": unit, "goal": goal, "ok": ok}
        _FIGURES.append(row)
        if path := os.environ.get(FIGURES_ENV):
            with open(path, "a", encoding="utf-8") as out:
                out.write(json.dumps(row) + "\n")


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Figures:
    """Record the figures this test measured (printed in the run's summary)."""
    return Figures(request.node.nodeid)


def pytest_terminal_summary(terminalreporter) -> None:
    if not _FIGURES:
        return
    terminalreporter.section("measured figures")
    for row in _FIGURES:
        verdict = {True: "ok", False: "MISSED", None: ""}[row["ok"]]
        goal = f"(goal {row['goal']})" if row["goal"] else ""
        test = row["test"].split("::")[-1]
        terminalreporter.write_line(
            f"{test:<44} {row['name']:<40} {row['value']!s:>10} {row['unit']:<6} {goal} {verdict}".rstrip()
        )
