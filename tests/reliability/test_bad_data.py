"""Bad data pushed through ``training_pipeline``: every corruption kind stops before training, by name.

The table is ``tests/reliability/badfiles.py``: 16 kinds of corrupted rows (nulls, an empty
split, over-size prompt and response, duplicate rows, PII of each kind, eval overlap, a wrong
schema, wrong types, unknown intent and policy labels, mojibake), snapshotted as the feedback
loop would, and 4 files as a user hands them over (Latin-1 bytes, a truncated copy, a JSON array
instead of JSON Lines, and a UTF-8 file with a BOM and CRLF line ends, which is fine).

Every kind runs through the real DAG (``dag.test()`` of ``training_pipeline``, Airflow's SQLite
metadata DB in a temp home, tasks in this process) on one flywheel home whose champion was set
first by a clean run of the same DAG (two optimizer steps, a lax gate). A rejected kind must:
fail the run before ``train`` (``validate`` for the row kinds, with exactly the expectations the
table names in its one-line ``REJECTED`` reason; the step that reads the file for the file
kinds, with the reader's error), register nothing and leave ``champion`` where it was. The PII
kinds must also be reported as their own kind (the validation report the DAG's step builds). The
fine file must pass validation.

Figures: kinds stopped by name (goal: all), versions registered by bad data (goal 0), champion
moves (goal 0).
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.reliability.badfiles import FILE_KINDS, ROW_KINDS, FileKind, RowKind, corrupted

pytestmark = [pytest.mark.reliability]

# The tiniest full run (as tests/dags): two optimizer steps in the task's process.
TINY = {
    "max_steps": 2,
    "workers": 1,
    "batch_size": 4,
    "use_ray": False,
    "max_examples": 6,
    "train": {
        "warmup_steps": 0,
        "eval_every": 0,
        "eval_examples": 8,
        "checkpoint_every": 2,
        "max_seq_len": 96,
    },
}
LAX_GATE = {"min_fact_accuracy": 0.0, "min_behavioural_pass_rate": 0.0}
_REJECTED = re.compile(r"REJECTED dataset \w+: dataset \w+ failed validation: (?P<failed>.*)$")


@pytest.fixture(scope="module")
def airflow_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Airflow with a migrated SQLite metadata DB; the session's, when another suite configured it first."""
    dags_folder = Path(__file__).resolve().parents[2] / "dags"
    if "airflow.configuration" in sys.modules:
        # Airflow reads its configuration once, when imported: reuse the home it was given.
        home = os.environ.get("AIRFLOW_HOME", "")
        if not home or os.environ.get("AIRFLOW__CORE__DAGS_FOLDER") != str(dags_folder):
            pytest.fail("airflow was imported before a test configured it")
        return Path(home)
    home = tmp_path_factory.mktemp("airflow")
    os.environ.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder),
            "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        }
    )
    airflow = Path(sys.executable).with_name("airflow")
    subprocess.run(
        [str(airflow), "db", "migrate"], check=True, capture_output=True, env=os.environ.copy(), timeout=300
    )
    # Importing airflow before great_expectations floods the log with GX INFO lines.
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    return home


@pytest.fixture(scope="module")
def pipeline_home(airflow_home, tmp_path_factory, base_model_dir) -> Iterator[Path]:
    """FLYWHEEL_* for the task bodies dag.test runs in this process: one home for the module."""
    home = tmp_path_factory.mktemp("bad-data") / "flywheel"
    with pytest.MonkeyPatch.context() as env:
        for name in [n for n in os.environ if n.startswith("FLYWHEEL_")]:
            env.delenv(name)
        env.setenv("FLYWHEEL_HOME", str(home))
        env.setenv("FLYWHEEL_BASE_MODEL", str(base_model_dir))
        env.setenv("RAY_AUTH_MODE", "disabled")
        yield home


@pytest.fixture(scope="module")
def dag(airflow_home):
    from tests.dags.dagtools import load_dag

    return load_dag("training_pipeline")


@pytest.fixture(scope="module")
def clean_rows(corpus) -> dict[str, list[dict]]:
    return {split: [row.model_dump(mode="json") for row in rows] for split, rows in corpus.items()}


@pytest.fixture(scope="module")
def champion(pipeline_home, dag, clean_rows) -> str:
    """The champion version, set by a clean run of the real DAG on the same home."""
    from components.data import snapshot
    from components.registry import resolve
    from components.settings import Settings

    settings = Settings()
    ref = snapshot(clean_rows, settings.datasets_dir)
    run = dag.test(run_conf={**TINY, "dataset": ref.sha256, "gate": LAX_GATE})
    assert run.state == "success", _states(run)
    return resolve("champion", settings).version


@pytest.fixture(scope="module")
def stopped() -> dict[str, bool]:
    """Kind name -> whether it stopped as the table says (collected for the summary figures)."""
    return {}


def _states(run) -> dict[str, str | None]:
    from tests.dags.dagtools import task_states

    return task_states(run)


def _registry(settings) -> tuple[list[str], str | None]:
    """(every version, the champion's version) of the home's registry."""
    from components.registry import list_models

    models = list_models(settings)
    return [m.version for m in models], next((m.version for m in models if "champion" in m.aliases), None)


def _reasons(records: list[logging.LogRecord], level: int) -> list[str]:
    return [r.getMessage() for r in records if r.levelno >= level]


@pytest.mark.parametrize("kind", ROW_KINDS, ids=[k.name for k in ROW_KINDS])
def test_corrupted_rows_stop_at_validate_by_name(
    kind: RowKind, dag, champion, clean_rows, stopped, caplog, figures
):
    from components import pipeline
    from components.data import snapshot
    from components.settings import Settings

    settings = Settings()
    before = _registry(settings)
    ref = snapshot(corrupted(clean_rows, kind), settings.datasets_dir)

    with caplog.at_level(logging.ERROR, logger="flywheel.dags"):
        run = dag.test(run_conf={**TINY, "dataset": ref.sha256, "gate": LAX_GATE})

    states = _states(run)
    rejected = [m for m in _reasons(caplog.records, logging.ERROR) if m.startswith("REJECTED dataset")]
    named = sorted(set(re.findall(r"(\w+) \[", _REJECTED.match(rejected[-1])["failed"]))) if rejected else []
    ok = (
        states["validate"] == "failed"
        and states["train"] == "upstream_failed"
        and named == sorted(kind.expect)
    )
    stopped[kind.name] = ok
    figures.record(
        f"{kind.name}: stopped at validate by", ", ".join(named) or "-", goal=", ".join(kind.expect), ok=ok
    )

    assert run.state == "failed" and states["snapshot"] == "success", states
    assert states["validate"] == "failed" and states["train"] == "upstream_failed", states
    assert len(rejected) == 1 and named == sorted(kind.expect), rejected
    if kind.pii is not None:
        # The report behind the rejection names the kind of PII, never the value.
        report = pipeline.check(settings, ref.sha256)
        (pii,) = [r for r in report.results if r.name == "response_no_pii" and not r.success]
        assert [entry["value"] for entry in pii.sample] == [kind.pii]
    assert _registry(settings) == before == (["1"], champion)


@pytest.mark.parametrize("kind", FILE_KINDS, ids=[k.name for k in FILE_KINDS])
def test_files_as_handed_over_stop_before_training_or_pass(
    kind: FileKind, dag, champion, clean_rows, stopped, tmp_path, capfd, figures
):
    from components.settings import Settings

    settings = Settings()
    before = _registry(settings)
    file = kind.write(clean_rows["train"], tmp_path)

    capfd.readouterr()
    # Only reading and validating: a fine file must pass them (training it is the clean run's job).
    subset = dag.partial_subset(task_ids=["validate"], include_upstream=True) if kind.ok else dag
    run = subset.test(run_conf={**TINY, "dataset": str(file)})
    states = _states(run)
    text = capfd.readouterr().out  # a failed task's exception: Airflow's task log, on stdout

    if kind.ok:
        ok = states == {"snapshot": "success", "validate": "success"}
        stopped[kind.name] = ok
        figures.record(f"{kind.name}: validated", "pass" if ok else str(states), goal="pass", ok=ok)
        assert ok, (states, re.findall(r"\w+(?:Error|NotFound|Input): .*", text)[-3:] or text[-3000:])
        return
    failed_at = next((task for task in ("snapshot", "validate") if states[task] == "failed"), None)
    named = re.search(kind.error, text)
    ok = failed_at is not None and states["train"] == "upstream_failed" and named is not None
    stopped[kind.name] = ok
    figures.record(
        f"{kind.name}: stopped at",
        f"{failed_at}: {named.group(0)}" if ok else str(states),
        goal="snapshot or validate, the reader's error",
        ok=ok,
    )
    assert run.state == "failed" and failed_at is not None, states
    assert states["train"] == "upstream_failed", states
    assert named, text[-3000:]
    assert _registry(settings) == before == (["1"], champion)


def test_bad_data_registered_nothing_and_left_the_champion(pipeline_home, champion, stopped, figures):
    from components.settings import Settings

    versions, current = _registry(Settings())
    bad = len(ROW_KINDS) + sum(not k.ok for k in FILE_KINDS)
    if len(stopped) == len(ROW_KINDS) + len(FILE_KINDS):  # the whole table ran (not a -k selection)
        done = sum(stopped.values())
        figures.record(
            "kinds handled as the table says", done, goal=str(len(stopped)), ok=all(stopped.values())
        )
    figures.record("versions registered by bad data", len(versions) - 1, goal="0", ok=versions == ["1"])
    figures.record("champion moves", int(current != champion), goal="0", ok=current == champion)
    assert bad >= 12
    assert all(stopped.values()), [name for name, ok in stopped.items() if not ok]
    assert versions == ["1"] and current == champion
