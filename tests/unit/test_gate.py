"""The promotion gate as a pure function, over a table of reports."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from components.gate import checks, decide
from components.schemas import EvalReport, GenerationParams, MetricThreshold, ModelScores, PromotionGate

pytestmark = pytest.mark.unit

NOW = datetime(2026, 1, 1, tzinfo=UTC)
BASE = dict(
    eval_loss=1.0, perplexity=2.7, fact_accuracy=0.8, rouge_l=0.6, chrf=60.0, behavioural_pass_rate=0.8,
    replay_fact_accuracy=0.5, latency_ms_p50=10.0, n_examples=100,
)  # fmt: skip


def _scores(version: str | None = "2", **changes) -> ModelScores:
    return ModelScores(model=f"models:/m/{version}", version=version, **(BASE | changes))


def _report(candidate: ModelScores, champion: ModelScores | None) -> EvalReport:
    return EvalReport(
        candidate=candidate, champion=champion, eval_sha256="0" * 64, generation=GenerationParams()
    )


GATE = PromotionGate(
    min_fact_accuracy=0.5,
    min_behavioural_pass_rate=0.6,
    max_eval_loss=2.0,
    regressions={
        "fact_accuracy": MetricThreshold(max_regression=0.02),
        "eval_loss": MetricThreshold(max_regression=0.05, higher_is_better=False),
        "latency_ms_p50": MetricThreshold(max_regression=5.0, higher_is_better=False),
        "replay_fact_accuracy": MetricThreshold(max_regression=0.0),
    },
)

# (case, candidate changes, champion scores or None, current champion version, failed checks)
CASES = [
    ("first model clears the floors", {}, None, None, set()),
    ("first model below the fact floor", {"fact_accuracy": 0.49}, None, None, {"min_fact_accuracy"}),
    ("fact floor is inclusive", {"fact_accuracy": 0.5}, None, None, set()),
    ("behavioural floor", {"behavioural_pass_rate": 0.59}, None, None, {"min_behavioural_pass_rate"}),
    ("eval loss ceiling", {"eval_loss": 2.01}, None, None, {"max_eval_loss"}),
    ("equal to the champion", {}, _scores("1"), "1", set()),
    ("better than the champion", {"fact_accuracy": 0.9, "eval_loss": 0.5}, _scores("1"), "1", set()),
    # higher is better: a drop within the limit passes, beyond it fails
    ("fact accuracy drop within limit", {"fact_accuracy": 0.785}, _scores("1"), "1", set()),
    (
        "fact accuracy drop beyond limit",
        {"fact_accuracy": 0.77},
        _scores("1"),
        "1",
        {"regression.fact_accuracy"},
    ),
    # lower is better: a rise within the limit passes, beyond it fails; a fall is an improvement
    ("eval loss rise within limit", {"eval_loss": 1.04}, _scores("1"), "1", set()),
    ("eval loss rise beyond limit", {"eval_loss": 1.06}, _scores("1"), "1", {"regression.eval_loss"}),
    # losses compare only between models trained with the same label smoothing
    (
        "eval loss rise with smoothing on both",
        {"eval_loss": 1.2, "label_smoothing": 0.1},
        _scores("1", label_smoothing=0.1),
        "1",
        {"regression.eval_loss"},
    ),  # fmt: skip
    (
        "eval loss rise of a smoothed candidate over an unsmoothed champion",
        {"eval_loss": 1.2, "label_smoothing": 0.1},
        _scores("1", label_smoothing=0.0),
        "1",
        set(),
    ),  # fmt: skip
    (
        "smoothing differs but accuracy still regresses",
        {"eval_loss": 1.2, "label_smoothing": 0.1, "fact_accuracy": 0.7},
        _scores("1", label_smoothing=0.0),
        "1",
        {"regression.fact_accuracy"},
    ),  # fmt: skip
    (
        "smoothing unknown for the champion",
        {"eval_loss": 1.2, "label_smoothing": 0.1},
        _scores("1"),
        "1",
        {"regression.eval_loss"},
    ),  # fmt: skip
    ("latency rise beyond limit", {"latency_ms_p50": 15.5}, _scores("1"), "1", {"regression.latency_ms_p50"}),
    ("latency fall", {"latency_ms_p50": 1.0}, _scores("1"), "1", set()),
    (
        "no regression allowed on replay",
        {"replay_fact_accuracy": 0.49},
        _scores("1"),
        "1",
        {"regression.replay_fact_accuracy"},
    ),  # fmt: skip
    # a metric measured for neither model is not compared; for the champion only, it fails
    (
        "replay measured for neither",
        {"replay_fact_accuracy": None},
        _scores("1", replay_fact_accuracy=None),
        "1",
        set(),
    ),  # fmt: skip
    (
        "replay missing on the candidate",
        {"replay_fact_accuracy": None},
        _scores("1"),
        "1",
        {"regression.replay_fact_accuracy"},
    ),  # fmt: skip
    ("replay missing on the champion", {}, _scores("1", replay_fact_accuracy=None), "1", set()),
    # the report must have compared against the champion that holds the alias now
    ("report has no champion but there is one", {}, None, "1", {"same_champion"}),
    ("report compared against another version", {}, _scores("1"), "3", {"same_champion"}),
    ("champion without a registry version", {}, _scores(None), "1", {"same_champion"}),
    (
        "floor and regression fail together",
        {"fact_accuracy": 0.4},
        _scores("1"),
        "1",
        {"min_fact_accuracy", "regression.fact_accuracy"},
    ),  # fmt: skip
]


@pytest.mark.parametrize(
    ("case", "changes", "champion", "current", "failed"), CASES, ids=[c[0] for c in CASES]
)
def test_gate_decides_over_a_table_of_reports(case, changes, champion, current, failed):
    report = _report(_scores(**changes), champion)
    decision = decide(report, GATE, model_name="m", version="2", champion=current, decided_at=NOW)

    assert {name for name, ok in decision.checks.items() if not ok} == failed, decision.reasons
    assert decision.promoted is (not failed)
    assert decision.previous_champion == current and decision.decided_at == NOW
    assert (decision.model_name, decision.version) == ("m", "2")
    # One reason per check, in order, each saying PASS or FAIL as the check went.
    assert len(decision.reasons) == len(decision.checks)
    for reason, ok in zip(decision.reasons, decision.checks.values(), strict=True):
        assert reason.startswith("PASS " if ok else "FAIL ")


def test_every_regression_limit_is_checked_only_against_a_matching_champion():
    same = [c.name for c in checks(_report(_scores(), _scores("1")), GATE, "1")]
    assert same == [
        "min_fact_accuracy", "min_behavioural_pass_rate", "max_eval_loss", "same_champion",
        *(f"regression.{m}" for m in GATE.regressions),
    ]  # fmt: skip
    stale = [c.name for c in checks(_report(_scores(), _scores("1")), GATE, "3")]
    assert stale[-1] == "same_champion" and not any(n.startswith("regression.") for n in stale)
    first = [c.name for c in checks(_report(_scores(), None), GATE, None)]
    assert first[-1] == "champion"


def test_decide_is_pure():
    report = _report(_scores(fact_accuracy=0.77), _scores("1"))
    one = decide(report, GATE, model_name="m", version="2", champion="1", decided_at=NOW)
    two = decide(report, GATE, model_name="m", version="2", champion="1", decided_at=NOW)
    assert one == two and not one.promoted
