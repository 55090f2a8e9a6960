"""Fine-tuning on real Ray Train with a real MLflow store: learning, tracking, lineage, fault recovery."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.model

# Small enough for 2 CPU cores, long enough to beat the base model clearly.
FAST = dict(batch_size=8, learning_rate=3e-3, warmup_steps=3, eval_examples=64, checkpoint_every=10)


def _client(settings):
    from mlflow import MlflowClient

    return MlflowClient(settings.tracking_uri)


def _runs(settings) -> list:
    client = _client(settings)
    experiment = client.get_experiment_by_name(settings.experiment_name)
    return client.search_runs([experiment.experiment_id])


def _steps(settings, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in _client(settings).get_metric_history(run_id, key))


def _model_folder(root: Path) -> Path:
    (config,) = [p for p in root.rglob("config.json") if (p.parent / "model.safetensors").exists()]
    return config.parent


def test_two_workers_beat_the_base_model_in_one_tracked_run(
    ray_session, seed_ref, settings, base_model_dir, tmp_path
):
    import mlflow
    from transformers import AutoModelForCausalLM

    from components.schemas import TrainParams
    from components.train import LOSS_CURVE_ARTIFACT, train

    params = TrainParams(base_model=str(base_model_dir), max_steps=30, workers=2, **FAST)
    seen: list[dict] = []
    result = train(seed_ref, params, settings, progress=seen.append)

    (run,) = _runs(settings)  # exactly one run per train call
    assert run.info.run_id == result.run_id and run.info.status == "FINISHED"
    metrics, tags = run.data.metrics, run.data.tags
    assert metrics["eval_loss"] < metrics["base_eval_loss"]
    assert result.metrics["eval_loss"] == pytest.approx(metrics["eval_loss"])
    assert result.steps == 30 and _steps(settings, run.info.run_id, "train_loss") == list(range(1, 31))
    assert {"learning_rate", "tokens_per_second", "grad_norm"} <= set(metrics)
    assert seen and seen[-1]["step"] == 30 and [p["step"] for p in seen] == sorted({p["step"] for p in seen})

    # Lineage: the dataset by content hash and location, and the params hash.
    assert tags["dataset.sha256"] == seed_ref.sha256 == result.dataset_sha256
    assert tags["dataset.uri"] == seed_ref.uri
    assert tags["params_hash"] == result.params_hash and len(result.params_hash) == 64
    (dataset_input,) = run.inputs.dataset_inputs
    assert seed_ref.sha256.startswith(dataset_input.dataset.digest)
    assert run.data.params["workers"] == "2" and run.data.params["base_model"] == str(base_model_dir)

    client = _client(settings)
    assert LOSS_CURVE_ARTIFACT in [a.path for a in client.list_artifacts(run.info.run_id, "plots")]
    assert result.checkpoint_uri and Path(result.checkpoint_uri).is_relative_to(settings.runs_dir)

    # The model loads from its safetensors, through either URI form.
    for n, uri in enumerate((result.model_uri, f"runs:/{result.run_id}/model")):
        local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / f"dl{n}")))
        folder = _model_folder(local)
        assert not list(local.rglob("*.bin")) and not list(local.rglob("*.pt"))
        model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True)
        assert model.num_parameters() > 0


def test_worker_failure_resumes_from_the_last_checkpoint(
    ray_session, seed_ref, settings, base_model_dir, monkeypatch
):
    from components.schemas import TrainParams
    from components.train import train
    from components.trainloop import FAIL_AT_STEP_ENV, FAIL_MARKER

    # The last-ranked worker exits hard at step 15, after the step-10 checkpoint.
    monkeypatch.setenv(FAIL_AT_STEP_ENV, "15")
    params = TrainParams(
        base_model=str(base_model_dir), max_steps=20, workers=2, max_failures=1, **{**FAST, "batch_size": 4}
    )
    result = train(seed_ref, params, settings)

    assert len(list(settings.runs_dir.glob(f"*/{FAIL_MARKER}"))) == 1  # it did fail, once
    (run,) = _runs(settings)  # the restart logged into the same run
    assert run.info.run_id == result.run_id and run.info.status == "FINISHED"
    resumed = int(run.data.tags["resumed_from_step"])
    assert resumed == 10  # not from 0, and at most one checkpoint interval lost
    assert _steps(settings, run.info.run_id, "resumed_from_step") == [10]
    assert result.steps == 20
    assert set(_steps(settings, run.info.run_id, "train_loss")) == set(range(1, 21))
    assert run.data.metrics["eval_loss"] < run.data.metrics["base_eval_loss"]


def test_in_process_training_logs_the_same_run(seed_ref, settings, base_model_dir):
    from components.schemas import TrainParams
    from components.train import train

    params = TrainParams(base_model=str(base_model_dir), max_steps=8, workers=1, **FAST)
    result = train(seed_ref, params, settings, use_ray=False)

    (run,) = _runs(settings)
    assert run.info.run_id == result.run_id and run.info.status == "FINISHED"
    assert run.data.tags["flywheel.runner"] == "in-process"
    assert run.data.metrics["eval_loss"] < run.data.metrics["base_eval_loss"]
    assert result.model_uri.startswith("models:/") and result.steps == 8
    assert Path(result.checkpoint_uri).name == "checkpoint_000008"
