"""Fine-tuning on real Ray Train with a real MLflow store: learning, tracking, lineage, fault recovery."""

from __future__ import annotations

import os
import threading
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


def _fail_once_at(step: int, marker_dir: Path):
    """A step hook: the last-ranked worker exits hard once at ``step`` (a crash, not an exception).

    A closure, so Ray pickles it by value into the workers.
    """

    def hook(current: int, session) -> None:
        marker = marker_dir / "failed-once"
        if current != step or session.world_rank != session.world_size - 1 or marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(str(current))
        # Ray registers a reported checkpoint when its controller next polls the workers (every
        # ~2 s); a crash inside that window loses it. This test is about resuming, not that race.
        session.wait_for_checkpoints()
        os._exit(1)

    return hook


def test_worker_failure_resumes_from_the_last_checkpoint(
    ray_session, seed_ref, settings, base_model_dir, tmp_path
):
    from components.schemas import TrainParams
    from components.train import train

    # The last-ranked worker exits hard at step 15, after the step-10 checkpoint.
    params = TrainParams(
        base_model=str(base_model_dir), max_steps=20, workers=2, max_failures=1, **{**FAST, "batch_size": 4}
    )
    result = train(seed_ref, params, settings, on_step=_fail_once_at(15, tmp_path / "fault"))

    assert (tmp_path / "fault" / "failed-once").read_text() == "15"  # it did fail, once
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


# Training as a transaction -----------------------------------------------------------------


TINY = dict(max_steps=4, workers=1, batch_size=4, eval_examples=8, warmup_steps=1, checkpoint_every=2)


def test_training_twice_returns_the_first_run_and_registers_one_version(seed_ref, settings, base_model_dir):
    from components.registry import register
    from components.schemas import TrainParams
    from components.train import train

    params = TrainParams(base_model=str(base_model_dir), **TINY)
    first = train(seed_ref, params, settings, use_ray=False)
    again = train(seed_ref, params, settings, use_ray=False)

    (run,) = _runs(settings)
    assert run.info.status == "FINISHED" and again.run_id == first.run_id == run.info.run_id
    assert not first.reused and again.reused
    assert again.model_copy(update={"reused": False}) == first
    assert register(first, settings) == register(again, settings) == "1"


def test_two_trains_at_once_end_in_one_finished_run(seed_ref, settings, base_model_dir):
    from components.schemas import TrainParams
    from components.train import train

    params = TrainParams(base_model=str(base_model_dir), **TINY)
    results: list = []
    errors: list = []

    def _train() -> None:
        try:
            results.append(train(seed_ref, params, settings, use_ray=False))
        except Exception as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=_train) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not errors and len(results) == 2
    (run,) = _runs(settings)
    assert run.info.status == "FINISHED"
    assert {r.run_id for r in results} == {run.info.run_id}
    assert sorted(r.reused for r in results) == [False, True]  # one trained, the other waited and reused it


def test_a_failed_run_is_resumed_from_its_checkpoint_not_trained_again(seed_ref, settings, base_model_dir):
    from components.schemas import TrainParams
    from components.train import train

    params = TrainParams(base_model=str(base_model_dir), **{**TINY, "max_steps": 6})

    def crash_at_5(step: int, session) -> None:
        if step == 5:
            raise RuntimeError("simulated crash after the step-4 checkpoint")

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(seed_ref, params, settings, use_ray=False, on_step=crash_at_5)
    (failed,) = _runs(settings)
    assert failed.info.status == "FAILED"

    result = train(seed_ref, params, settings, use_ray=False)
    (run,) = _runs(settings)  # the failed run was reopened, not a second one created
    assert run.info.run_id == failed.info.run_id == result.run_id and run.info.status == "FINISHED"
    assert run.data.tags["resumed_from_step"] == "4" and result.steps == 6
    assert set(_steps(settings, run.info.run_id, "train_loss")) == set(range(1, 7))


# Limits ------------------------------------------------------------------------------------


def test_check_fits_refuses_a_batch_larger_than_the_data_and_says_what_fits(
    seed_ref, settings, base_model_dir
):
    from components.errors import InvalidInput
    from components.schemas import TrainParams
    from components.train import check_fits

    rows = seed_ref.splits["train"]
    params = TrainParams(base_model=str(base_model_dir), batch_size=1_000_000, workers=2)
    with pytest.raises(InvalidInput, match=rf"train split has {rows}: use batch_size <= {rows // 2}"):
        check_fits(params, seed_ref, settings)
    plenty = 2**50  # memory is another clause (below)
    check_fits(
        params.model_copy(update={"batch_size": rows // 2}), seed_ref, settings, available_bytes=plenty
    )
    one_process = params.model_copy(update={"batch_size": rows})
    check_fits(one_process, seed_ref, settings, use_ray=False, available_bytes=plenty)


def test_check_fits_bounds_memory_context_and_workers(seed_ref, settings, base_model_dir):
    import re

    from components.errors import InvalidInput
    from components.schemas import TrainParams
    from components.train import check_fits

    params = TrainParams(base_model=str(base_model_dir), batch_size=64, workers=1)
    check_fits(params, seed_ref, settings, available_bytes=8 * 2**30)
    with pytest.raises(InvalidInput, match=r"GiB is available: use batch_size <= \d+") as info:
        check_fits(params, seed_ref, settings, available_bytes=700 * 2**20)
    fits = int(re.search(r"batch_size <= (\d+)", str(info.value))[1])
    assert 1 <= fits < 64
    check_fits(
        params.model_copy(update={"batch_size": fits}), seed_ref, settings, available_bytes=700 * 2**20
    )

    with pytest.raises(InvalidInput, match="exceeds the base model's context"):
        check_fits(params.model_copy(update={"max_seq_len": 8192}), seed_ref, settings)
    with pytest.raises(InvalidInput, match=r"workers 256 > \d+"):
        check_fits(params.model_copy(update={"workers": 256, "batch_size": 1}), seed_ref, settings)
    # A cluster decides its own machine limits.
    remote = settings.model_copy(update={"ray_address": "ray://head:10001"})
    check_fits(params.model_copy(update={"workers": 256, "batch_size": 1}), seed_ref, remote)


def test_a_missing_train_split_fails_before_anything_starts(seed_ref, settings, base_model_dir, tmp_path):
    import shutil

    from components.errors import InvalidInput
    from components.schemas import TrainParams
    from components.train import train
    from components.uris import to_path, to_uri

    copy = tmp_path / "snapshot copy"
    shutil.copytree(to_path(seed_ref.uri), copy)
    (copy / "train.jsonl").unlink()
    ref = seed_ref.model_copy(update={"uri": to_uri(copy)})
    params = TrainParams(base_model=str(base_model_dir), **TINY)
    with pytest.raises(InvalidInput, match="has no train split"):
        train(ref, params, settings)  # with Ray asked for: refused before Ray starts
    assert not settings.runs_dir.exists() or not any(settings.runs_dir.iterdir())
