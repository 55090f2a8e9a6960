"""Helpers of the DAG tests (a module of its own: two conftest.py files cannot both be imported as `conftest`)."""

from __future__ import annotations

from pathlib import Path

DAGS_FOLDER = Path(__file__).resolve().parents[2] / "dags"


def load_dag(dag_id: str):
    """The DAG object from this repo's dags/ folder (parsed as Airflow does)."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS_FOLDER))
    assert not bag.import_errors, bag.import_errors
    return bag.get_dag(dag_id)


def task_states(run) -> dict[str, str | None]:
    """task_id → final state of a dag.test() run."""
    return {
        ti.task_id: (str(getattr(ti.state, "value", ti.state)) if ti.state else None)
        for ti in run.get_task_instances()
    }
