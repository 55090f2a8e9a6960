"""Evaluation of real trained models: same examples for both, facts, behaviour, replay, MLflow report."""

from __future__ import annotations

import hashlib
import json

import pytest

pytestmark = pytest.mark.model
pytest_plugins = ["fixtures.models"]

EXAMPLES = 120  # per evaluation: enough to separate the models, cheap on 2 cores


@pytest.fixture(scope="module")
def replay_ref(corpus, tmp_path_factory):
    """Prompts users marked bad, with corrected responses (the shape the feedback builder writes)."""
    from components.data import snapshot

    # Every other row is a free-text correction without fact annotations: it is judged on the
    # facts its corrected response states.
    rows = [
        row.model_copy(
            update={"id": f"fb-{row.id}", "source": f"feedback:{row.id}", "facts": row.facts if i % 2 else []}
        )
        for i, row in enumerate(corpus["holdout"][::20])
    ]
    return snapshot({"train": rows}, tmp_path_factory.mktemp("replay"))


@pytest.fixture(scope="module")
def v1_report(trained_v1, base_model_dir, seed_ref, replay_ref, store_settings):
    """The v1 model against the untrained base model on the v1 eval set, with a replay set."""
    from components.evaluate import evaluate

    return evaluate(
        trained_v1.model_uri, str(base_model_dir), seed_ref, replay_ref, store_settings, max_examples=EXAMPLES
    )


@pytest.fixture(scope="module")
def v2_report(trained_v2, trained_v1, v2_ref, store_settings):
    """After the policy change: the v2 model against the v1 model on the v2 eval set."""
    from components.evaluate import evaluate

    return evaluate(
        trained_v2.model_uri, trained_v1.model_uri, v2_ref, None, store_settings, max_examples=EXAMPLES
    )


def test_both_models_are_scored_on_the_same_subsample(v1_report, seed_ref):
    from components.data import read_split

    # The documented subsample: eval + holdout rows ranked by the sha256 of their id.
    rows = read_split(seed_ref, "eval") + read_split(seed_ref, "holdout")
    picked = sorted(rows, key=lambda r: hashlib.sha256(r["id"].encode()).hexdigest())[:EXAMPLES]
    expected = hashlib.sha256("\n".join(sorted(r["id"] for r in picked)).encode()).hexdigest()

    cand, champ = v1_report.candidate, v1_report.champion
    assert cand.n_examples == champ.n_examples == EXAMPLES
    assert cand.examples_sha256 == champ.examples_sha256 == expected
    assert set(cand.fact_accuracy_by_split) == {"eval", "holdout"} == set(champ.fact_accuracy_by_split)
    assert v1_report.generation.do_sample is False  # greedy, the same params for both
    assert v1_report.eval_sha256 == seed_ref.sha256


def test_trained_model_beats_the_untrained_base(v1_report):
    cand, base = v1_report.candidate, v1_report.champion
    print(f"\ntrained {cand.model_dump(exclude={'model'})}\nbase {base.model_dump(exclude={'model'})}")
    assert base.fact_accuracy <= 0.05 and cand.fact_accuracy >= 0.3
    assert cand.eval_loss < base.eval_loss - 3 and cand.perplexity < base.perplexity
    assert cand.rouge_l > base.rouge_l + 0.2 and cand.chrf > base.chrf + 10
    assert cand.latency_ms_p50 > 0
    # Trained on unseen phrasings of the same intents: both held-out splits are learned.
    assert min(cand.fact_accuracy_by_split.values()) >= 0.2


def test_invariance_check_separates_a_consistent_model_from_a_silent_one(v1_report):
    cand, base = v1_report.candidate, v1_report.champion
    # Variants (lowercase, no punctuation, extra whitespace) of prompts the model answers keep
    # their facts most of the time; the base model states no fact, which is never invariance.
    assert set(cand.behavioural) == {"invariance"}  # v1 eval set: no directional check
    assert cand.behavioural["invariance"] >= 0.6 > base.behavioural["invariance"] == 0.0
    assert cand.behavioural_pass_rate == cand.behavioural["invariance"]
    assert "directional" not in v1_report.checks
    for why in v1_report.failures.get("invariance", []):
        assert why.split(":")[0] in {"lowercase", "no_punctuation", "extra_whitespace"}


def test_fact_matching_needs_whole_facts():
    from components.evaluate import stated_facts, states_fact

    assert states_fact("Tracking appears within 24 hours.", "24 hours")
    assert not states_fact("Tracking appears within 24 hours.", "4 hours")
    assert not states_fact("Express costs $14.99.", "$4.99")
    assert not states_fact("Free over $500", "$50")
    assert states_fact("We accept  Visa, Mastercard and\nPayPal.", "Visa, Mastercard and PayPal")
    assert stated_facts(
        "Within 30 days, refunds in 5-7 business days", ["30 days", "5-7 business days", "$50"]
    ) == {
        "30 days",
        "5-7 business days",
    }


def test_directional_check_rewards_the_new_policy_and_catches_stale_facts(v2_report):
    cand, champ = v2_report.candidate, v2_report.champion
    print(f"\nv2 model {cand.behavioural} facts {cand.fact_accuracy}\nv1 model {champ.behavioural}")
    assert set(cand.behavioural) == {"invariance", "directional"} and "directional" in v2_report.checks
    # The v1 model answers v2 prompts with the values v2 replaced: it fails the check.
    # (Out-of-scope prompts, ~1/9 of the set, get the same refusal under every policy version.)
    assert champ.behavioural["directional"] <= 0.05 and champ.fact_accuracy <= 0.2
    assert cand.behavioural["directional"] >= champ.behavioural["directional"] + 0.3
    assert cand.fact_accuracy > champ.fact_accuracy + 0.3


def test_replay_set_is_scored(v1_report, replay_ref):
    assert v1_report.replay_sha256 == replay_ref.sha256
    assert v1_report.candidate.replay_fact_accuracy is not None
    assert v1_report.candidate.replay_fact_accuracy > v1_report.champion.replay_fact_accuracy == 0.0


def test_report_and_chart_are_logged_to_an_mlflow_run(v1_report, trained_v1, store_settings, tmp_path):
    import mlflow

    from components.evaluate import CHART_ARTIFACT, REPORT_ARTIFACT, report_text
    from components.schemas import EvalReport

    client = mlflow.MlflowClient(store_settings.tracking_uri)
    run = client.get_run(v1_report.run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == store_settings.experiment_name
    assert run.data.tags["flywheel.candidate"] == trained_v1.model_uri
    assert run.data.metrics["candidate.fact_accuracy"] == pytest.approx(v1_report.candidate.fact_accuracy)
    assert run.data.metrics["champion.eval_loss"] == pytest.approx(v1_report.champion.eval_loss)
    mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, dst_path=str(tmp_path), tracking_uri=store_settings.tracking_uri
    )
    # The whole report (sample failures included), as the registry will read it back.
    logged = EvalReport.model_validate(json.loads((tmp_path / REPORT_ARTIFACT).read_text()))
    assert logged == v1_report and logged.failures == v1_report.failures
    assert (tmp_path / REPORT_ARTIFACT).read_text() == report_text(v1_report)
    assert (tmp_path / CHART_ARTIFACT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_directional_check_works_for_any_policy_versions():
    """A third policy version: its rows are checked against what v1 and v2 said, with no code change."""
    from components.data import CorpusSpec, load_corpus, policy_facts
    from components.evaluate import _directional, _Example, replaced_facts

    shipped = load_corpus()
    v1, v2 = policy_facts("v1"), policy_facts("v2")
    key = next(k for k in v1 if v1[k] != v2[k])  # a fact v2 changed
    v3 = v2 | {key: "a brand-new value"}
    spec = CorpusSpec.model_validate(
        shipped.model_dump() | {"policies": shipped.model_dump()["policies"] | {"v3": v3}}
    )
    assert replaced_facts("v1", spec) == {}
    assert replaced_facts("v2", spec)[v2[key]] == {v1[key]}
    assert replaced_facts("v3", spec)["a brand-new value"] == {v1[key], v2[key]}

    replaced = {v: replaced_facts(v, spec) for v in ("v1", "v2", "v3")}
    example = _Example("x", "eval", "q", "a", ("a brand-new value",), "v3")
    outcomes = _directional(
        [
            (example, "It is a brand-new value now."),  # the new fact: passes
            (example, f"It is a brand-new value, not {v1[key]}."),  # states a replaced value: stale
            (example, f"It is {v2[key]}."),  # the v2 value: missing and stale
            (_Example("y", "eval", "q", "a", (v1[key],), "v1"), v1[key]),  # v1 replaced nothing: no case
        ],
        replaced,
    )
    assert [ok for ok, _ in outcomes] == [True, False, False]
    assert repr(v2[key]) in outcomes[2][1]
