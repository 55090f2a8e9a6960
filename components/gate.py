"""The promotion gate: a pure function from an evaluation report and thresholds to a decision.

No I/O and no clock: the registry passes in the current champion and the time, so the same
inputs always give the same decision (and a table of reports can test it).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import NamedTuple

from components.schemas import EvalReport, MetricThreshold, ModelScores, PromotionDecision, PromotionGate


class Check(NamedTuple):
    """One gate check: its name, whether it passed, and a reason that starts ``PASS`` or ``FAIL``."""

    name: str
    passed: bool
    reason: str


def checks(report: EvalReport, gate: PromotionGate, champion: str | None) -> list[Check]:
    """Every check of the gate on one report, in order.

    Args:
        report: the candidate's evaluation (with the champion's scores on the same examples).
        gate: floors and the most each metric may regress against the champion.
        champion: the registry version that is champion now; None when there is none.

    Returns:
        Floors first, then (when there is a champion) that the report compared against it, then
        one check per regression limit.
    """
    return list(_checks(report, gate, champion))


def decide(
    report: EvalReport,
    gate: PromotionGate,
    *,
    model_name: str,
    version: str,
    champion: str | None,
    decided_at: datetime,
) -> PromotionDecision:
    """The gate's decision for a version: promoted when every check passes.

    Args:
        report: the version's evaluation.
        gate: thresholds.
        model_name: registered model name (recorded on the decision).
        version: the version judged.
        champion: the version that is champion now (None: none yet).
        decided_at: when the decision is made (the caller's clock).

    Returns:
        The decision, one reason per check; ``previous_champion`` is ``champion``.
    """
    done = checks(report, gate, champion)
    return PromotionDecision(
        model_name=model_name,
        version=version,
        promoted=all(c.passed for c in done),
        reasons=[c.reason for c in done],
        checks={c.name: c.passed for c in done},
        previous_champion=champion,
        decided_at=decided_at,
    )


def _checks(report: EvalReport, gate: PromotionGate, champion: str | None) -> Iterator[Check]:
    cand, champ = report.candidate, report.champion
    yield _floor(
        "min_fact_accuracy",
        cand.fact_accuracy >= gate.min_fact_accuracy,
        f"fact_accuracy {cand.fact_accuracy:.3f} >= {gate.min_fact_accuracy}",
    )
    yield _floor(
        "min_behavioural_pass_rate",
        cand.behavioural_pass_rate >= gate.min_behavioural_pass_rate,
        f"behavioural_pass_rate {cand.behavioural_pass_rate:.3f} >= {gate.min_behavioural_pass_rate}",
    )
    yield from _quality_floors(cand, gate)
    if gate.max_eval_loss is not None:
        yield _floor(
            "max_eval_loss",
            cand.eval_loss <= gate.max_eval_loss,
            f"eval_loss {cand.eval_loss:.4f} <= {gate.max_eval_loss}",
        )
    if champion is None:
        yield _floor("champion", True, "no champion yet: floors only")
        return
    if champ is None or champ.version != champion:
        if champ is None:
            compared = "no champion"
        else:
            compared = f"version {champ.version}" if champ.version else f"{champ.model} (no registry version)"
        text = f"evaluated against {compared}, but the champion is version {champion}: re-evaluate"
        yield _floor("same_champion", False, text)
        return
    yield _floor("same_champion", True, f"evaluated against champion version {champion}")
    for metric, threshold in gate.regressions.items():
        yield _regression(metric, threshold, cand, champ)


def _quality_floors(cand: ModelScores, gate: PromotionGate) -> Iterator[Check]:
    """Product-name, refusal and false-refusal floors, for the figures the report measured."""
    floors = (
        ("min_product_accuracy", "product_accuracy", gate.min_product_accuracy, True),
        ("min_refusal_accuracy", "refusal_accuracy", gate.min_refusal_accuracy, True),
        ("max_false_refusal_rate", "false_refusal_rate", gate.max_false_refusal_rate, False),
    )
    for name, metric, limit, higher in floors:
        value = getattr(cand, metric)
        if higher and limit is None:
            limit = gate.min_fact_accuracy  # the fact floor, unless the gate says otherwise
        if limit is None or value is None:
            continue  # not measured (no such rows) or not checked: no verdict to give
        ok = value >= limit if higher else value <= limit
        yield _floor(name, ok, f"{metric} {value:.3f} {'>=' if higher else '<='} {limit}")


def _floor(name: str, ok: bool, text: str) -> Check:
    return Check(name, ok, _verdict(ok, text))


def _verdict(ok: bool, text: str) -> str:
    return f"{'PASS' if ok else 'FAIL'} {text}"


# Losses of models trained with different label smoothing differ by design, not by quality: a
# smoothed model is less sure of every token (the answer metrics still compare the two).
LOSS_METRICS = frozenset({"eval_loss", "perplexity"})


def _regression(metric: str, threshold: MetricThreshold, cand: ModelScores, champ: ModelScores) -> Check:
    new, old = getattr(cand, metric), getattr(champ, metric)
    name = f"regression.{metric}"
    smoothing = (cand.label_smoothing, champ.label_smoothing)
    if metric in LOSS_METRICS and None not in smoothing and smoothing[0] != smoothing[1]:
        text = (
            f"{metric}: not compared, trained with label smoothing {smoothing[0]} vs champion {smoothing[1]}"
        )
        return Check(name, True, _verdict(True, text))
    if new is None and old is not None:
        # The champion was measured on it and the candidate was not: nothing shows it held up.
        return Check(name, False, _verdict(False, f"{metric}: measured for the champion only"))
    if new is None or old is None:
        return Check(name, True, _verdict(True, f"{metric}: not measured for both models, not compared"))
    change = (new - old) if threshold.higher_is_better else (old - new)  # > 0: better
    ok = change >= -threshold.max_regression
    direction = "higher" if threshold.higher_is_better else "lower"
    text = (
        f"{metric} {new:.4f} vs champion {old:.4f} "
        f"({direction} is better; may regress by at most {threshold.max_regression})"
    )
    return Check(name, ok, _verdict(ok, text))
