"""The registry on a real MLflow store (SQLite): lineage, model card, gated promotion, rollback.

Every test registers under a model name of its own in the session store that holds the trained
models (see ``fixtures.models``).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.model
pytest_plugins = ["fixtures.models"]

EXAMPLES = 60
# Floors the session's small models clear (the defaults are for production-size models); the
# regression limits are the defaults.
# The shared test models train too briefly to copy product names (benchmarks/train_defaults.py
# measures that on the default run): the registry's floors here are on facts and behaviour.
GATE = dict(min_fact_accuracy=0.3, min_behavioural_pass_rate=0.4, min_product_accuracy=0.0)


def _client(settings):
    from mlflow import MlflowClient

    return MlflowClient(settings.tracking_uri, settings.tracking_uri)


def _aliases(settings) -> dict[str, str]:
    registered = _client(settings).get_registered_model(settings.model_name)
    return {alias: str(version) for alias, version in registered.aliases.items()}


def _tags(settings, version: str) -> dict[str, str]:
    return _client(settings).get_model_version(settings.model_name, version).tags


def _evaluate(version: str, ref, settings):
    from components.evaluate import evaluate
    from components.registry import champion_uri

    candidate = f"models:/{settings.model_name}/{version}"
    return evaluate(candidate, champion_uri(settings), ref, None, settings, max_examples=EXAMPLES)


def test_register_is_idempotent_and_records_lineage_and_a_model_card(trained_v1, seed_ref, registry_settings):
    from components import registry

    version = registry.register(trained_v1, registry_settings)
    assert registry.register(trained_v1, registry_settings) == version  # no second version
    assert [m.version for m in registry.list_models(registry_settings)] == [version]
    assert _aliases(registry_settings) == {"challenger": version}

    tags = _tags(registry_settings, version)
    assert tags[registry.TAG_DATASET_SHA] == seed_ref.sha256 == trained_v1.dataset_sha256
    assert tags[registry.TAG_DATASET_URI] == seed_ref.uri
    assert tags[registry.TAG_PARAMS_HASH] == trained_v1.params_hash
    assert tags[registry.TAG_RUN_ID] == trained_v1.run_id
    assert tags[registry.TAG_MODEL_URI] == trained_v1.model_uri
    assert tags[registry.TAG_PARENT] == ""  # nothing was champion
    if shutil.which("git"):
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        assert tags[registry.TAG_GIT].startswith(head)

    # The card: an artifact of the training run, its text on the version, its path in a tag.
    client = _client(registry_settings)
    card = client.download_artifacts(trained_v1.run_id, registry.MODEL_CARD_ARTIFACT)
    text = Path(card).read_text(encoding="utf-8")
    for section in ("## Intended use", "## Data", "## Training", "## Evaluation", "## Known limitations"):
        assert section in text
    assert seed_ref.sha256 in text and "policy version: v1" in text
    assert tags[registry.TAG_CARD] == f"runs:/{trained_v1.run_id}/{registry.MODEL_CARD_ARTIFACT}"
    assert client.get_model_version(registry_settings.model_name, version).description == text


def test_promotion_is_gated_idempotent_and_reversible(
    trained_v1, undertrained_v1, trained_v2, seed_ref, v2_ref, registry_settings
):
    from components import predict, registry
    from components.schemas import GenerationParams, PromotionGate, TrainParams

    settings, gate = registry_settings, PromotionGate(**GATE)

    # First model: no champion yet, promoted once it clears the floors.
    v1 = registry.register(trained_v1, settings)
    with pytest.raises(registry.EvaluationNotFound):
        registry.promote(v1, gate, settings)
    report = _evaluate(v1, seed_ref, settings)
    # The report says how the version was trained (the gate compares losses only between like runs).
    assert report.candidate.label_smoothing == TrainParams().label_smoothing == 0.1
    registry.record_evaluation(v1, report, settings)
    decision = registry.promote(v1, gate, settings)
    assert decision.promoted and decision.previous_champion is None, decision.reasons
    assert _aliases(settings) == {"champion": v1}  # the challenger won: it holds champion only
    assert _tags(settings, v1)[registry.TAG_PROMOTED] == "true"
    assert "## Evaluation" in _client(settings).get_model_version(settings.model_name, v1).description

    # Promoting the champion again changes nothing.
    before = _tags(settings, v1)
    again = registry.promote(v1, gate, settings)
    assert again.promoted and again.checks == {"already_champion": True}
    assert _aliases(settings) == {"champion": v1} and _tags(settings, v1) == before

    # A worse candidate (one training step) is rejected and the champion does not move.
    bad = registry.register(undertrained_v1, settings)
    assert _aliases(settings) == {"champion": v1, "challenger": bad}
    assert _tags(settings, bad)[registry.TAG_PARENT] == v1
    bad_report = _evaluate(bad, seed_ref, settings)
    assert bad_report.champion.version == v1
    rejected = registry.promote(bad, gate, settings, report=bad_report)
    assert not rejected.promoted
    assert not rejected.checks["min_fact_accuracy"] and not rejected.checks["regression.fact_accuracy"]
    assert any(r.startswith("FAIL eval_loss") for r in rejected.reasons)
    assert _aliases(settings) == {"champion": v1, "challenger": bad}
    assert _tags(settings, bad)[registry.TAG_PROMOTED] == "false"
    with pytest.raises(registry.PromotionRejected) as excinfo:
        registry.promote_or_raise(bad, gate, settings)  # reads the recorded evaluation
    assert excinfo.value.decision.version == bad and not excinfo.value.decision.promoted

    # The policy changes: the v2 model beats the v1 champion on the v2 eval set and is promoted.
    v2 = registry.register(trained_v2, settings)
    promoted = registry.promote(v2, gate, settings, report=_evaluate(v2, v2_ref, settings))
    assert promoted.promoted and promoted.previous_champion == v1, "\n".join(promoted.reasons)
    assert _aliases(settings) == {"champion": v2, "previous": v1}

    # An evaluation against a champion that has since been replaced is stale.
    stale = registry.promote(bad, PromotionGate(min_fact_accuracy=0, min_behavioural_pass_rate=0), settings)
    assert not stale.promoted and not stale.checks["same_champion"]

    # Re-running registration is a no-op: no new version, no alias moved.
    assert registry.register(trained_v1, settings) == v1
    assert _aliases(settings) == {"champion": v2, "previous": v1}

    listed = {m.version: m for m in registry.list_models(settings)}
    assert list(listed) == [v2, bad, v1]
    assert listed[v2].aliases == ["champion"] and listed[v1].aliases == ["previous"]
    assert listed[v2].metrics["fact_accuracy"] > 0 and listed[v2].dataset_sha256 == v2_ref.sha256
    assert listed[bad].promoted is False and listed[v1].promoted is True

    # Rollback: champion back to v1; v1 replaced nothing, so no previous is left.
    back = registry.rollback(settings)
    assert back.version == v1 and back.previous_champion == v2
    assert _aliases(settings) == {"champion": v1}
    assert _tags(settings, v2)[registry.TAG_ROLLED_BACK] == v1
    with pytest.raises(registry.NoPreviousChampion):
        registry.rollback(settings)

    # Serving's path: resolve the alias to a pinned version and load it from the store.
    champion = registry.resolve("champion", settings)
    assert champion.version == v1 and champion.model_uri == f"models:/{settings.model_name}/{v1}"
    assert champion.download_uri
    served = predict.load("champion", settings)
    assert (served.version, served.uri) == (v1, champion.model_uri)
    assert (
        served.generate(["Where is my order?"], GenerationParams(max_new_tokens=4))[0].completion_tokens > 0
    )

    # Undoing the rollback: v2 was judged against v1, which is champion again, so it still holds.
    redo = registry.promote(v2, gate, settings)
    assert redo.promoted and _aliases(settings) == {"champion": v2, "previous": v1}
    assert registry.TAG_ROLLED_BACK not in _tags(settings, v2)


def test_rollback_walks_back_through_promotions(trained_v1, trained_v2, undertrained_v1, registry_settings):
    """Three promotions, two rollbacks: each rollback restores the champion before."""
    from components import registry
    from components.schemas import PromotionGate

    settings, gate = registry_settings, PromotionGate(min_fact_accuracy=0, min_behavioural_pass_rate=0)
    versions = []
    for result in (undertrained_v1, trained_v1, trained_v2):
        # The pipeline's order: evaluate the run's model, then register it with its report.
        # Scores are made up here: this test is about alias bookkeeping, not about the gate.
        report = _report(result.model_uri, None, registry.champion_uri(settings))
        version = registry.register(result, settings, eval_report=report)
        assert registry.promote(version, gate, settings).promoted
        versions.append(version)
    first, second, third = versions
    assert _aliases(settings) == {"champion": third, "previous": second}
    assert registry.rollback(settings).version == second
    assert _aliases(settings) == {"champion": second, "previous": first}
    assert registry.rollback(settings).version == first
    assert _aliases(settings) == {"champion": first}


def _report(model: str, version: str | None, champion_uri: str | None):
    """An EvalReport of equal scores for a candidate against the champion (if any)."""
    from components.schemas import EvalReport, GenerationParams, ModelScores

    def scores(model: str, version: str | None) -> ModelScores:
        return ModelScores(
            model=model, version=version, eval_loss=1.0, perplexity=2.7, fact_accuracy=0.5, rouge_l=0.5,
            chrf=50, behavioural_pass_rate=0.5, latency_ms_p50=1.0, n_examples=1,
        )  # fmt: skip

    champion = scores(champion_uri, champion_uri.rsplit("/", 1)[1]) if champion_uri else None
    return EvalReport(
        candidate=scores(model, version),
        champion=champion,
        eval_sha256="0" * 64,
        generation=GenerationParams(),
    )


def test_a_report_of_another_model_is_refused(trained_v1, trained_v2, registry_settings):
    from components import registry
    from components.errors import InvalidInput

    settings = registry_settings
    version = registry.register(trained_v1, settings)
    for wrong in (
        _report(trained_v2.model_uri, None, None),
        _report(f"models:/{settings.model_name}/9", "9", None),
    ):
        with pytest.raises(InvalidInput, match="not"):
            registry.record_evaluation(version, wrong, settings)
    # The URI it was registered from, or the registry version itself, is accepted.
    registry.record_evaluation(version, _report(trained_v1.model_uri, None, None), settings)
    registry.record_evaluation(
        version, _report(f"models:/{settings.model_name}@challenger", version, None), settings
    )
    assert registry.list_models(settings)[0].metrics["fact_accuracy"] == 0.5


def test_a_large_report_is_stored_whole_in_its_evaluation_run(trained_v1, registry_settings):
    import hashlib

    from components import registry
    from components.errors import Conflict
    from components.evaluate import REPORT_ARTIFACT
    from components.schemas import PromotionGate
    from components.uris import to_path

    settings = registry_settings
    version = registry.register(trained_v1, settings)
    failures = {
        "invariance": [f"case {i}: a prompt that was answered with other facts " * 20 for i in range(20)]
    }
    report = _report(trained_v1.model_uri, None, None).model_copy(update={"failures": failures})
    assert len(report.model_dump_json()) > 5000  # more than MLflow's tag column holds
    registry.record_evaluation(version, report, settings)
    tags = _tags(settings, version)
    registry.record_evaluation(version, report, settings)  # recording it again changes nothing
    assert _tags(settings, version) == tags

    # The version names the run that holds the report and the file's sha256; no report in a tag.
    assert "flywheel.eval.report" not in tags
    run_id, sha = tags[registry.TAG_EVAL_RUN], tags[registry.TAG_EVAL_SHA]
    client = _client(settings)
    stored = to_path(client.get_run(run_id).info.artifact_uri) / REPORT_ARTIFACT  # the store's own file
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == sha
    read_back = registry.stored_report(version, settings)
    assert read_back.failures == failures and read_back.run_id == run_id
    assert read_back == report.model_copy(update={"run_id": run_id})
    assert registry.promote(version, PromotionGate(**GATE), settings).promoted

    # A report file changed after it was recorded is refused, not judged.
    stored.write_text(stored.read_text().replace('"fact_accuracy": 0.5', '"fact_accuracy": 0.9'))
    registry._REPORTS.clear()  # this process read it before: forget, as a new process would
    with pytest.raises(Conflict, match="changed after it was recorded"):
        registry.stored_report(version, settings)


def test_the_code_version_comes_from_settings_before_git(undertrained_v1, registry_settings, monkeypatch):
    from components import registry
    from components.settings import Settings

    monkeypatch.setenv("FLYWHEEL_CODE_VERSION", "image-build-1234")
    settings = Settings(**registry_settings.model_dump(exclude={"code_version"}), _env_file=None)
    assert settings.code_version == "image-build-1234"
    version = registry.register(undertrained_v1, settings)
    assert _tags(settings, version)[registry.TAG_GIT] == "image-build-1234"
    card = _client(settings).get_model_version(settings.model_name, version).description
    assert "code: `image-build-1234`" in card


def test_empty_registry_errors_are_named(registry_settings):
    from pydantic import ValidationError

    from components import registry
    from components.schemas import MetricThreshold, PromotionGate

    assert registry.list_models(registry_settings) == []
    assert registry.champion_uri(registry_settings) is None
    with pytest.raises(registry.ModelNotFound):
        registry.resolve("champion", registry_settings)
    with pytest.raises(registry.NoPreviousChampion):
        registry.rollback(registry_settings)
    with pytest.raises(ValidationError, match="unknown gate metric"):
        PromotionGate(regressions={"fact_acuracy": MetricThreshold(max_regression=0.1)})


def test_racing_promotions_of_one_version_move_the_alias_once(undertrained_v1, trained_v1, registry_settings):
    """Two promotes of the same version at once: both return, one moves the aliases, the other sees it done."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from components import registry
    from components.schemas import PromotionGate

    settings, gate = registry_settings, PromotionGate(min_fact_accuracy=0, min_behavioural_pass_rate=0)
    first = registry.register(
        undertrained_v1, settings, eval_report=_report(undertrained_v1.model_uri, None, None)
    )
    assert registry.promote(first, gate, settings).promoted
    report = _report(trained_v1.model_uri, None, registry.champion_uri(settings))
    second = registry.register(trained_v1, settings, eval_report=report)
    start = threading.Barrier(3)

    def promote():
        start.wait()
        return registry.promote(second, gate, settings)

    with ThreadPoolExecutor(3) as pool:
        decisions = list(pool.map(lambda _: promote(), range(3)))
    assert all(d.promoted for d in decisions), [d.reasons for d in decisions]
    moved = [d for d in decisions if "already_champion" not in d.checks]
    assert len(moved) == 1 and moved[0].previous_champion == first
    assert _aliases(settings) == {"champion": second, "previous": first}
    assert _tags(settings, second)[registry.TAG_REPLACED] == first
