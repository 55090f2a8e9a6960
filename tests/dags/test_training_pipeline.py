"""training_pipeline end to end under dag.test(): a gate rejection, a promotion, a rejected dataset."""

from __future__ import annotations

import pytest
from dagtools import load_dag, task_states

pytestmark = pytest.mark.dags

# The tiniest run that goes through every step: two optimizer steps in the task's process.
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


@pytest.fixture
def seeded(flywheel_env):
    from components import pipeline
    from components.settings import Settings

    settings = Settings()
    return settings, pipeline.seed(settings, rows=600)


def test_rejected_then_promoted_with_one_version(seeded):
    from mlflow import MlflowClient

    from components.registry import list_models, resolve

    settings, ref = seeded
    dag = load_dag("training_pipeline")

    rejected = dag.test(run_conf={**TINY, "dataset": ref.sha256, "gate": {"min_fact_accuracy": 1.0}})
    states = task_states(rejected)
    assert states["train"] == "success" and states["evaluate"] == "success"
    # A refusal is a skipped promote (and deploy), not a failed run; no champion was set.
    assert states["promote"] == "skipped" and states["deploy"] == "skipped"
    assert rejected.state == "success"
    with pytest.raises(LookupError):
        resolve("champion", settings)

    promoted = dag.test(run_conf={**TINY, "dataset": ref.sha256, "gate": LAX_GATE})
    assert set(task_states(promoted).values()) == {"success"}
    # Same data and params: the second run re-used the first run's version (no second one).
    versions = list_models(settings)
    assert [v.version for v in versions] == ["1"] and "champion" in versions[0].aliases
    deployed = promoted.get_task_instance("deploy").xcom_pull(task_ids="deploy")
    assert deployed == {"version": "1", "reloaded": False, "detail": "nothing serves"}

    # Fine-tuning the champion further (what a feedback retrain does): the champion, exported
    # as a model folder, is the new run's base model; a new run and version result.
    further = dag.test(run_conf={**TINY, "dataset": ref.sha256, "gate": LAX_GATE, "init_from": "champion"})
    assert task_states(further)["train"] == "success"
    trained = further.get_task_instance("train").xcom_pull(task_ids="train")
    assert trained["version"] == "2"
    export = settings.models_dir / "exports" / f"{settings.model_name}-v1"
    assert (export / "config.json").exists() and (export / "tokenizer.json").exists()
    client = MlflowClient(settings.tracking_uri)
    assert client.get_run(trained["result"]["run_id"]).data.params["base_model"] == str(export)


def test_rejected_dataset_fails_validate_and_trains_nothing(seeded, monkeypatch):
    from components.registry import list_models

    settings, ref = seeded
    monkeypatch.setenv("FLYWHEEL_MIN_TRAIN_ROWS", "100000")
    run = load_dag("training_pipeline").test(run_conf={**TINY, "dataset": ref.sha256})
    states = task_states(run)
    assert states["validate"] == "failed" and states["train"] == "upstream_failed"
    assert run.state == "failed"
    assert list_models(settings) == []
