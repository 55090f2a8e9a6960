"""The DAGs folder parses cleanly, and every DAG is tagged, retried and light to parse."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from dagtools import DAGS_FOLDER

pytestmark = pytest.mark.dags

HEAVY = ("torch", "ray", "mlflow", "great_expectations", "transformers", "peft", "sqlalchemy_utils")


@pytest.fixture(scope="module")
def bag(airflow_home):
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS_FOLDER))


def test_no_import_errors(bag):
    assert bag.import_errors == {}
    assert {"training_pipeline", "feedback_loop"} <= set(bag.dag_ids)


def test_every_dag_has_tags_and_retries(bag):
    for dag_id in bag.dag_ids:
        dag = bag.get_dag(dag_id)
        assert dag.tags, f"{dag_id} has no tags"
        assert dag.max_active_runs == 1, dag_id
        for task in dag.tasks:
            assert task.retries is not None, f"{dag_id}.{task.task_id}"
    training = bag.get_dag("training_pipeline")
    # Transient steps retry; validation does not (bad data stays bad).
    assert training.get_task("train").retries >= 1 and training.get_task("evaluate").retries >= 1
    assert training.get_task("validate").retries == 0


def test_feedback_loop_updates_the_asset_training_is_scheduled_on(bag):
    training, feedback = bag.get_dag("training_pipeline"), bag.get_dag("feedback_loop")
    outlets = feedback.get_task("publish").outlets
    assert [(a.name, a.uri) for a in outlets] == [("flywheel_sft_dataset", "flywheel://datasets/sft")]
    scheduled = [(a.name, a.uri) for a in training.timetable.asset_condition.objects]
    assert scheduled == [("flywheel_sft_dataset", "flywheel://datasets/sft")]


def test_dag_files_import_nothing_heavy_and_read_the_interval_cheaply(airflow_home):
    # One fresh interpreter parses both files as the DAG processor would (one process: 2 cores).
    code = (
        "import runpy, sys, json; "
        f"t = runpy.run_path({str(DAGS_FOLDER / 'training_pipeline.py')!r}); "
        f"f = runpy.run_path({str(DAGS_FOLDER / 'feedback_loop.py')!r}); "
        f"print(json.dumps([sorted(m for m in {HEAVY!r} if m in sys.modules), f['INTERVAL'].total_seconds()]))"
    )
    env = {**os.environ, "FLYWHEEL_FEEDBACK_INTERVAL_MINUTES": "7"}
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env, timeout=120
    )
    heavy, interval = json.loads(out.stdout.strip().splitlines()[-1])
    assert heavy == [] and interval == 420
