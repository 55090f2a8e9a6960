"""Settings and the contracts between steps."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from components.schemas import FeedbackEvent, GenerationCaps, GenerationParams, SFTRow, TrainParams
from components.settings import Settings

pytestmark = pytest.mark.unit


def test_embedded_defaults_live_under_home(tmp_path, monkeypatch):
    for var in ("FLYWHEEL_HOME", "FLYWHEEL_REDIS_URL", "REDIS_URL", "FLYWHEEL_MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    s = Settings()
    assert s.home == tmp_path / ".flywheel"
    assert s.tracking_uri == f"sqlite:///{tmp_path}/.flywheel/mlflow/mlflow.db"
    assert s.feedback_url == f"sqlite:///{tmp_path}/.flywheel/feedback.db"
    assert s.artifact_uri.startswith("file://") and s.base_model_ref == str(
        tmp_path / ".flywheel/models/base"
    )
    assert s.redis_url is None and s.ray_address is None


def test_environment_overrides(tmp_path, monkeypatch):
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path / "h"))
    monkeypatch.setenv("FLYWHEEL_MLFLOW_TRACKING_URI", "postgresql://db/mlflow")
    monkeypatch.setenv("REDIS_URL", "redis://cache:6379/0")
    monkeypatch.setenv("FLYWHEEL_BASE_MODEL", "Qwen/Qwen2-0.5B")
    s = Settings()
    assert s.home == tmp_path / "h"
    assert s.tracking_uri == "postgresql://db/mlflow"
    assert s.redis_url == "redis://cache:6379/0"
    assert s.base_model_ref == "Qwen/Qwen2-0.5B"


def test_bad_setting_is_rejected(monkeypatch):
    monkeypatch.setenv("FLYWHEEL_MAX_PROMPT_TOKENS", "0")
    with pytest.raises(ValidationError):
        Settings()


def test_sft_row_leaves_intents_and_policies_to_the_corpus_data():
    # Intents and policy versions are data (components/corpus/): the row accepts any name, and
    # validation's known_intent / known_policy_version judge it against the corpus in use.
    row = dict(id="1", prompt="p", response="r", intent="returns", policy_version="v1", facts=[], source="s")
    assert SFTRow(**{**row, "intent": "weather", "policy_version": "v3"}).policy_version == "v3"
    for bad in ({"intent": ""}, {"policy_version": ""}, {"extra": 1}):
        with pytest.raises(ValidationError):
            SFTRow(**{**row, **bad})


@pytest.mark.parametrize(
    "bad", [{"max_new_tokens": 0}, {"temperature": -0.1}, {"top_p": 0.0}, {"top_k": -1}, {"seed": -3}]
)
def test_generation_params_bounds(bad):
    with pytest.raises(ValidationError):
        GenerationParams(**bad)


def test_generation_params_are_capped_server_side():
    capped = GenerationParams(max_new_tokens=2000, top_k=5000, temperature=4.0).capped(
        GenerationCaps(max_new_tokens=128, max_top_k=50, max_temperature=1.5)
    )
    assert (capped.max_new_tokens, capped.top_k, capped.temperature) == (128, 50, 1.5)


def test_train_params_bounds():
    assert TrainParams().workers >= 1
    with pytest.raises(ValidationError):
        TrainParams(workers=0)
    with pytest.raises(ValidationError):
        TrainParams(learning_rate=0)


def test_feedback_event_validation():
    now = datetime.now(UTC)
    ok = FeedbackEvent(
        event_id="evt-12345", request_id="r1", rating=-1, correction="45 days", user_id="k1", created_at=now
    )
    assert ok.rating == -1
    for bad in ({"rating": 0}, {"event_id": "short"}, {"correction": "   "}):
        with pytest.raises(ValidationError):
            FeedbackEvent(**{**ok.model_dump(), **bad})
