"""Answer quality: product names, refusals, the gate's floors on them, and the sweep's runs."""

from __future__ import annotations

import sys
from datetime import UTC, datetime

import pytest

from components.data import OUT_OF_SCOPE, load_corpus, policy_facts
from components.evaluate import answer_quality, asked_product, refusal_facts
from components.gate import decide
from components.schemas import EvalReport, GenerationParams, ModelScores, PromotionGate
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.model
pytest_plugins = ["fixtures.models"]

REFUSAL = f"Sorry, {policy_facts('v1')['refusal']}."
ITEMS = ("mouse", "wireless mouse", "sneakers", "backpack")


def _row(prompt: str, response: str, intent: str, facts: list[str]) -> dict:
    return {"prompt": prompt, "response": response, "intent": intent, "facts": facts}


def test_refusal_facts_are_the_out_of_scope_answers_fact():
    assert refusal_facts() == (policy_facts("v1")["refusal"],)
    assert OUT_OF_SCOPE in load_corpus().intents


def test_the_asked_product_is_the_longest_name_the_question_and_reference_share():
    assert asked_product(
        "Can I return my wireless mouse?", "Return the wireless mouse within 30 days.", ITEMS
    ) == ("wireless mouse")
    assert asked_product("Tell me a joke about sneakers.", REFUSAL, ITEMS) is None  # refusals name none
    assert asked_product("How long do I have?", "30 days.", ITEMS) is None
    assert asked_product("Return my mousepad?", "The mousepad ...", ITEMS) is None  # whole words only


def test_answer_quality_scores_products_refusals_and_false_refusals():
    refusal = policy_facts("v1")["refusal"]
    rows = [
        _row(
            "Can I return the sneakers?",
            "You can return the sneakers within 30 days.",
            "returns",
            ["30 days"],
        ),
        _row(
            "Can I return the backpack?",
            "You can return the backpack within 30 days.",
            "returns",
            ["30 days"],
        ),
        _row("Is shipping free?", "Orders over $50 ship free.", "shipping_fee", ["$50"]),
        _row("Tell me a joke.", REFUSAL, OUT_OF_SCOPE, [refusal]),
        _row("What's the weather?", REFUSAL, OUT_OF_SCOPE, [refusal]),
    ]
    answers = [
        "You can return the backpack within 30 days.",  # right fact, another customer's product
        "You can return the backpack within 30 days.",
        REFUSAL,  # a false refusal
        REFUSAL,
        "Orders over $50 ship free.",  # answered an out-of-scope prompt
    ]
    got = answer_quality(rows, answers, ITEMS, refusal_facts())
    assert got["product_accuracy"] == 0.5
    assert got["refusal_accuracy"] == 0.5
    assert got["false_refusal_rate"] == pytest.approx(1 / 3)
    assert got["fact_accuracy"] == pytest.approx(3 / 5)
    returns, fee, oos = (
        got["by_intent"]["returns"],
        got["by_intent"]["shipping_fee"],
        got["by_intent"][OUT_OF_SCOPE],
    )
    assert returns["fact_accuracy"] == 1.0 and returns["product_accuracy"] == 0.5 and returns["n"] == 2
    assert fee["false_refusal_rate"] == 1.0 and fee["product_accuracy"] is None
    assert oos["refusal_accuracy"] == 0.5 and oos["false_refusal_rate"] is None
    # No out-of-scope rows and no refusal strings: refusal figures are not measured.
    plain = answer_quality(rows[:3], answers[:3], ITEMS, ())
    assert plain["refusal_accuracy"] is None and plain["false_refusal_rate"] is None


def _decision(gate: PromotionGate, **scores) -> dict[str, bool]:
    base = dict(eval_loss=1.0, perplexity=2.7, fact_accuracy=0.9, rouge_l=0.6, chrf=60.0)
    base |= dict(behavioural_pass_rate=0.9, latency_ms_p50=10.0, n_examples=100)
    candidate = ModelScores(model="m", version="1", **(base | scores))
    report = EvalReport(candidate=candidate, eval_sha256="0" * 64, generation=GenerationParams())
    now = datetime(2026, 1, 1, tzinfo=UTC)
    return decide(report, gate, model_name="m", version="1", champion=None, decided_at=now).checks


def test_gate_holds_floors_on_products_refusals_and_false_refusals():
    good = dict(product_accuracy=0.95, refusal_accuracy=1.0, false_refusal_rate=0.0)
    assert all(_decision(PromotionGate(), **good).values())
    checks = _decision(PromotionGate(), product_accuracy=0.4, refusal_accuracy=0.3, false_refusal_rate=0.2)
    assert checks["min_product_accuracy"] is False and checks["min_refusal_accuracy"] is False
    assert checks["max_false_refusal_rate"] is False
    # Explicit floors win over the fact floor they default to; a lax gate stays lax.
    strict = PromotionGate(min_product_accuracy=0.97, min_refusal_accuracy=0.99, max_false_refusal_rate=0.0)
    assert not _decision(strict, **good)["min_product_accuracy"]
    lax = PromotionGate(min_fact_accuracy=0, min_behavioural_pass_rate=0)
    assert all(_decision(lax, product_accuracy=0.0, refusal_accuracy=0.0, false_refusal_rate=0.05).values())
    # Not measured (an old report, a corpus without out-of-scope rows): no check at all.
    assert "min_refusal_accuracy" not in _decision(PromotionGate())


def test_sweep_records_a_parent_run_with_a_child_run_per_trial(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    sys.modules.pop("sweep", None)
    import sweep

    tiny = {
        "spec": {"n_embd": 32, "n_layer": 1, "vocab_size": 400},
        "params": {"max_steps": 2, "eval_every": 0},
    }
    record = sweep.run_sweep(
        tmp_path / "home", {"a": tiny, "b": tiny | {"params": {"max_steps": 3}}}, rows=600
    )

    client = MlflowClient(f"sqlite:///{tmp_path / 'home' / 'mlflow' / 'mlflow.db'}")
    parent = client.get_run(record["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["flywheel.best_trial"] == record["best"]
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert sorted(r.data.tags["flywheel.trial"] for r in children) == ["a", "b"]
    assert all("eval.fact_accuracy" in r.data.metrics and "objective" in r.data.metrics for r in children)
    assert {r.info.run_id for r in children} == {t["run_id"] for t in record["trials"].values()}


def test_a_trained_model_refuses_out_of_scope_prompts_and_only_those(trained_v1, store_settings, seed_ref):
    """The session's small model refuses off-topic wordings it never saw, and few in-scope ones.

    (Copying the asked product's name emerges later in training than the session's few hundred
    steps; benchmarks/train_defaults.py measures it on the default run.)
    """
    from components.data import read_split
    from components.evaluate import DEFAULT_GENERATION
    from components.predict import load

    spec = load_corpus()
    rows = read_split(seed_ref, "holdout")
    off_topic = [r for r in rows if r["intent"] == OUT_OF_SCOPE][:24]
    in_scope = [r for r in rows if r["intent"] != OUT_OF_SCOPE][::4][:72]
    picked = off_topic + in_scope
    predictor = load(trained_v1.model_uri, store_settings)
    answers = [c.text for c in predictor.generate([r["prompt"] for r in picked], DEFAULT_GENERATION)]
    got = answer_quality(picked, answers, spec.items, refusal_facts(spec))
    print({k: v for k, v in got.items() if k != "by_intent"})
    assert got["refusal_accuracy"] >= 0.6, got
    assert got["false_refusal_rate"] <= 0.2, got
