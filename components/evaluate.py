"""Evaluate a candidate against the champion on the same examples, and log the report to MLflow.

Both models are scored on one deterministic subsample of the eval + holdout splits with the
same generation parameters: loss per response token (prompt masked, as in training), fact
accuracy (overall, per split and per intent), product-name accuracy (the answer names the product
the question asked about), refusal accuracy on out-of-scope prompts and false refusals on in-scope
ones, ROUGE-L and chrF on greedy answers, behavioural checks (invariance, directional),
single-prompt latency, and fact accuracy on the replay set (prompts users marked bad).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import re
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from components.errors import InvalidInput
from components.schemas import SPLITS, DatasetRef, EvalReport, GenerationParams, ModelScores
from components.tracking import client as tracking_client
from components.tracking import experiment_id

if TYPE_CHECKING:  # heavy imports stay inside functions
    from matplotlib.figure import Figure
    from mlflow import MlflowClient

    from components.data import CorpusSpec
    from components.predict import Predictor
    from components.settings import Settings

log = logging.getLogger(__name__)

EVAL_SPLITS = ("eval", "holdout")
# Greedy decoding (do_sample defaults to False): evaluation must be deterministic.
DEFAULT_GENERATION = GenerationParams(max_new_tokens=64)
BATCH_SIZE = 32  # rows per eval-loss forward pass
INVARIANCE_PROMPTS = 12  # originals per evaluation; each gets every variant below
LATENCY_PROMPTS = 8  # single-prompt generations timed per model
FAILURES_SHOWN = 5  # failing cases kept per check in the report
REPORT_ARTIFACT = "evaluation/report.json"
CHART_ARTIFACT = "evaluation/scores.png"

# Invariance: rewordings that must not change which facts an answer states. ALL CAPS is left
# out: it is far outside what users of the corpus write, and the small BPE model splits it into
# unfamiliar tokens (a known limitation on the model card, not a regression to gate on).
_VARIANTS: dict[str, Callable[[str], str]] = {
    "lowercase": str.lower,
    "no_punctuation": lambda p: p.translate(str.maketrans("", "", "?!.,:;")).strip(),
    # Identical after normalize_prompt: guards that every path normalizes user text.
    "extra_whitespace": lambda p: "  " + "   ".join(p.split()) + " \n",
}


@dataclass(frozen=True)
class _Example:
    id: str
    split: str
    prompt: str
    response: str
    facts: tuple[str, ...]
    policy_version: str | None
    intent: str = ""


@dataclass(frozen=True)
class _Policies:
    vocabulary: tuple[str, ...]  # every fact string of every policy version
    replaced: Mapping[str, Mapping[str, frozenset[str]]]  # version -> fact -> values it replaced
    items: tuple[str, ...] = ()  # product names of the corpus, longest first
    refusals: tuple[str, ...] = ()  # the out-of-scope answer's fact strings (every version)


@dataclass(frozen=True)
class _Model:
    uri: str  # what to load (a registry reference is pinned to its version first)
    label: str  # what the caller named
    version: str | None
    label_smoothing: float | None = None  # of the version's training run


def evaluate(
    candidate: str,
    champion: str | None,
    eval_ref: DatasetRef,
    replay_ref: DatasetRef | None,
    settings: Settings,
    gen: GenerationParams | None = None,
    max_examples: int = 200,
    log_to_mlflow: bool = True,
) -> EvalReport:
    """Score the candidate (and the champion) on the same examples with the same generation params.

    Args:
        candidate: what :func:`components.predict.resolve_model` accepts: ``champion``, a
            version, ``models:/…``, ``runs:/…``, any artifact URI or a local HF folder.
        champion: the same for the model to beat; None when there is none yet.
        eval_ref: dataset whose ``eval`` and ``holdout`` splits are scored.
        replay_ref: prompts users marked bad, with corrected responses (any split); optional.
        settings: tracking URI and experiment name.
        gen: generation parameters; default greedy with 64 new tokens.
        max_examples: eval + holdout rows scored (deterministic subsample by row id); the
            replay set is capped at the same number.
        log_to_mlflow: log the report and a chart as a run in ``settings.experiment_name``.

    Returns:
        The report; ``run_id`` names its MLflow run when logged.
    """
    from components.data import load_corpus, policy_versions

    gen = gen or DEFAULT_GENERATION
    spec = load_corpus(settings.corpus_dir)
    policies = _Policies(
        vocabulary=fact_vocabulary(spec),
        replaced={v: replaced_facts(v, spec) for v in policy_versions(spec)},
        items=_items(spec),
        refusals=refusal_facts(spec),
    )
    examples = _sample(_read_examples(eval_ref, EVAL_SPLITS, policies.vocabulary), max_examples)
    if not examples:
        raise InvalidInput(f"dataset {eval_ref.sha256[:12]} has no eval or holdout rows to score")
    replay_rows = _read_examples(replay_ref, _splits(replay_ref), policies.vocabulary)
    replay = _sample([e for e in replay_rows if e.facts], max_examples)
    if replay_ref is not None and not replay:
        log.warning(
            "replay set %s has no rows with facts: replay accuracy not measured", replay_ref.sha256[:12]
        )
    models = [_pin(candidate, settings)] + ([_pin(champion, settings)] if champion else [])

    client = run_id = None
    if log_to_mlflow:
        client, run_id = _start_run(settings, models, eval_ref, replay_ref, gen, max_examples)
    try:
        scored = [_score(m, settings, examples, replay, gen, policies) for m in models]
        (cand, failures), champ = scored[0], (scored[1][0] if len(scored) > 1 else None)
        report = EvalReport(
            candidate=cand,
            champion=champ,
            eval_sha256=eval_ref.sha256,
            replay_sha256=replay_ref.sha256 if replay_ref else None,
            generation=gen,
            checks={name: rate == 1.0 for name, rate in cand.behavioural.items()},
            failures=failures,
            run_id=run_id,
            created_at=datetime.now(UTC),
        )
        if client is not None:
            _log_report(client, run_id, report)
    except BaseException:
        if client is not None:
            client.set_terminated(run_id, "FAILED")
        raise
    log.info(
        "evaluated %s: fact accuracy %.3f, behavioural %.3f, eval loss %.3f%s",
        cand.model,
        cand.fact_accuracy,
        cand.behavioural_pass_rate,
        cand.eval_loss,
        f" (champion {champ.fact_accuracy:.3f} / {champ.behavioural_pass_rate:.3f} / {champ.eval_loss:.3f})"
        if champ
        else "",
    )
    return report


def report_text(report: EvalReport) -> str:
    """The report as stored in its evaluation run (``evaluation/report.json``): its sha256 is recorded."""
    return report.model_dump_json(indent=2) + "\n"


def states_fact(answer: str, fact: str) -> bool:
    """Whether an answer states a fact string as a whole (``4 hours`` is not in ``24 hours``)."""
    return _fact_pattern(fact).search(" ".join(answer.split())) is not None


def stated_facts(answer: str, vocabulary: Sequence[str]) -> frozenset[str]:
    """The fact strings of ``vocabulary`` that an answer states."""
    return frozenset(f for f in vocabulary if states_fact(answer, f))


def fact_vocabulary(spec: CorpusSpec | None = None) -> tuple[str, ...]:
    """Every policy fact of every policy version (what an answer can state).

    Args:
        spec: the corpus; None: the shipped one.

    Returns:
        The fact strings, sorted.
    """
    from components.data import policy_facts, policy_versions

    versions = policy_versions(spec)
    return tuple(sorted({v for version in versions for v in policy_facts(version, spec).values()}))


def replaced_facts(policy_version: str, spec: CorpusSpec | None = None) -> dict[str, frozenset[str]]:
    """For each fact of a policy version, the other values its key had in the versions before it.

    What a model that missed the change would still say: ``{"45 days": {"30 days"}}`` when v2
    moved the return window from 30 to 45 days. Empty for the first version or an unknown one.

    Args:
        policy_version: a name from :func:`components.data.policy_versions`.
        spec: the corpus; None: the shipped one.

    Returns:
        Fact string -> the values it replaced (only facts that changed).
    """
    from components.data import policy_facts, policy_versions

    versions = policy_versions(spec)
    if policy_version not in versions:
        return {}
    earlier = [policy_facts(v, spec) for v in versions[: versions.index(policy_version)]]
    replaced: dict[str, set[str]] = {}
    for key, value in policy_facts(policy_version, spec).items():
        stale = {table[key] for table in earlier if key in table and table[key] != value}
        if stale:
            replaced.setdefault(value, set()).update(stale)
    return {fact: frozenset(values) for fact, values in replaced.items()}


def refusal_facts(spec: CorpusSpec | None = None) -> tuple[str, ...]:
    """The fact strings of the out-of-scope intent's refusal, in every policy version.

    Args:
        spec: the corpus; None: the shipped one.

    Returns:
        The refusal strings (an answer that states one refuses); empty when the corpus has no
        ``out_of_scope`` intent.
    """
    from components.data import OUT_OF_SCOPE, load_corpus, policy_facts, policy_versions

    spec = spec or load_corpus()
    if OUT_OF_SCOPE not in spec.intents:
        return ()
    keys = spec.intents[OUT_OF_SCOPE].facts
    return tuple(sorted({policy_facts(v, spec)[k] for v in policy_versions(spec) for k in keys}))


def asked_product(prompt: str, reference: str, items: Sequence[str]) -> str | None:
    """The product a question asks about that its reference answer names (lower case), if any.

    Args:
        prompt: the question.
        reference: the reference answer (a refusal names no product: no check).
        items: product names; the longest match wins ("wireless mouse" over "mouse").

    Returns:
        The product name, or None when the question asks about none that the answer should name.
    """
    for item in sorted(items, key=len, reverse=True):
        if _names(prompt, item) and _names(reference, item):
            return item.lower()
    return None


def answer_quality(
    rows: Sequence[Mapping[str, Any]],
    answers: Sequence[str],
    items: Sequence[str],
    refusals: Sequence[str],
) -> dict[str, Any]:
    """Fact, product-name and refusal figures of a model's answers, overall and per intent.

    An answer is a refusal when it states a refusal string. In-scope rows are those whose facts
    are not refusals; a refusal there is a false refusal.

    Args:
        rows: rows with ``prompt``, ``response``, ``facts`` and ``intent``.
        answers: the model's answer to each row.
        items: the corpus's product names.
        refusals: what :func:`refusal_facts` returns.

    Returns:
        ``fact_accuracy``, ``product_accuracy``, ``refusal_accuracy``, ``false_refusal_rate``
        (None when no row measures it) and ``by_intent`` (the same figures per intent, with
        ``n``, the rows of that intent).
    """
    per: dict[str, dict[str, list[bool]]] = {}
    for row, answer in zip(rows, answers, strict=True):
        facts = list(row.get("facts") or ())
        intent = str(row.get("intent") or "unknown")
        got = per.setdefault(intent, {"fact": [], "product": [], "refusal": [], "false_refusal": []})
        if facts:
            got["fact"].append(_states_all(answer, facts))
        refused = any(states_fact(answer, r) for r in refusals)
        if refusals and facts and set(facts) <= set(refusals):
            got["refusal"].append(refused)
        elif refusals:
            got["false_refusal"].append(refused)
        product = asked_product(str(row["prompt"]), str(row["response"]), items)
        if product is not None:
            got["product"].append(_names(answer, product))
    names = {
        "fact": "fact_accuracy",
        "product": "product_accuracy",
        "refusal": "refusal_accuracy",
        "false_refusal": "false_refusal_rate",
    }

    def figures(groups: Sequence[Mapping[str, list[bool]]]) -> dict[str, float | None]:
        return {
            name: (statistics.fmean(v) if (v := [x for g in groups for x in g[kind]]) else None)
            for kind, name in names.items()
        }

    by_intent = {
        intent: {
            **figures([got]),
            "n": float(max(len(got["fact"]), len(got["refusal"]) + len(got["false_refusal"]))),
        }
        for intent, got in sorted(per.items())
    }
    return {**figures(list(per.values())), "by_intent": by_intent}


def _items(spec: CorpusSpec) -> tuple[str, ...]:
    return tuple(sorted({i.lower() for i in spec.items}, key=len, reverse=True))


def _names(text: str, item: str) -> bool:
    """Whether a text names a product as whole words, in any case (``mouse`` is not in ``mousepad``)."""
    return _item_pattern(item.lower()).search(" ".join(text.lower().split())) is not None


@functools.lru_cache(maxsize=4096)
def _item_pattern(item: str) -> re.Pattern[str]:
    return re.compile(rf"(?<![\w-]){re.escape(' '.join(item.split()))}(?![\w-])")


# Examples ----------------------------------------------------------------------------------


def _splits(ref: DatasetRef | None) -> tuple[str, ...]:
    if ref is None:
        return ()
    return tuple(ref.splits) or SPLITS


def _read_examples(
    ref: DatasetRef | None, splits: Sequence[str], vocabulary: Sequence[str]
) -> list[_Example]:
    from components.data import read_split

    if ref is None:
        return []
    seen: set[str] = set()
    out: list[_Example] = []
    for split in splits:
        for row in read_split(ref, split):
            row_id = str(row.get("id") or _sha256(f"{row['prompt']}\x1f{row['response']}")[:16])
            if row_id in seen:
                continue
            seen.add(row_id)
            # A row without facts (a free-text correction) is judged on the facts its response states.
            facts = tuple(row.get("facts") or sorted(stated_facts(row["response"], vocabulary)))
            out.append(
                _Example(
                    row_id,
                    split,
                    row["prompt"],
                    row["response"],
                    facts,
                    row.get("policy_version"),
                    str(row.get("intent") or ""),
                )
            )
    return out


def _sample(examples: Sequence[_Example], limit: int) -> list[_Example]:
    """A deterministic subsample: rows ranked by the hash of their id (stable across runs)."""
    return sorted(examples, key=lambda e: _sha256(e.id))[: max(limit, 0)]


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _examples_sha256(examples: Sequence[_Example]) -> str:
    return _sha256("\n".join(sorted(e.id for e in examples)))


# Scoring -----------------------------------------------------------------------------------


def _pin(ref: str, settings: Settings) -> _Model:
    """Pin a registry reference to its version now, so an alias that moves mid-evaluation cannot mix models."""
    from components.predict import resolve_model

    uri, version = resolve_model(ref, settings)
    return _Model(uri=uri, label=ref, version=version, label_smoothing=_label_smoothing(version, settings))


def _label_smoothing(version: str | None, settings: Settings) -> float | None:
    """The label smoothing a registered version was trained with (None: not a flywheel training run).

    A flywheel run from before the setting existed logged no such param: it trained without.
    """
    if version is None:
        return None
    client = tracking_client(settings)
    run_id = client.get_model_version(settings.model_name, version).run_id
    params = client.get_run(run_id).data.params if run_id else {}
    if "label_smoothing" in params:
        return float(params["label_smoothing"])
    return 0.0 if "max_steps" in params else None


def _score(
    target: _Model,
    settings: Settings,
    examples: Sequence[_Example],
    replay: Sequence[_Example],
    gen: GenerationParams,
    policies: _Policies,
) -> tuple[ModelScores, dict[str, list[str]]]:
    """Every metric of one model on the given examples."""
    from components.predict import load

    started = time.perf_counter()
    predictor = load(target.uri, settings)
    return _score_loaded(target, predictor, examples, replay, gen, policies, started)


def _score_loaded(
    target: _Model,
    predictor: Predictor,
    examples: Sequence[_Example],
    replay: Sequence[_Example],
    gen: GenerationParams,
    policies: _Policies,
    started: float,
) -> tuple[ModelScores, dict[str, list[str]]]:
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import CHRF

    loss = _eval_loss(predictor, examples)
    answers = _answers(predictor, [e.prompt for e in examples], gen)
    pairs = list(zip(examples, answers, strict=True))
    by_split: dict[str, list[bool]] = {}
    for example, answer in pairs:
        if example.facts:
            by_split.setdefault(example.split, []).append(_states_all(answer, example.facts))
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rouge = statistics.fmean(scorer.score(e.response, a)["rougeL"].fmeasure for e, a in pairs)
    chrf = CHRF().corpus_score(answers, [[e.response for e in examples]]).score

    vocabulary = tuple(sorted(set(policies.vocabulary) | {f for e in examples for f in e.facts}))
    outcomes = {
        "invariance": _invariance(predictor, pairs, gen, vocabulary),
        "directional": _directional(pairs, policies.replaced),
    }
    outcomes = {name: cases for name, cases in outcomes.items() if cases}  # a check with no case did not run
    rates = {name: statistics.fmean(ok for ok, _ in cases) for name, cases in outcomes.items()}
    failures = {
        name: [why for ok, why in cases if not ok][:FAILURES_SHOWN] for name, cases in outcomes.items()
    }

    replay_accuracy = None
    if replay:
        replay_answers = _answers(predictor, [e.prompt for e in replay], gen)
        replay_accuracy = statistics.fmean(
            _states_all(a, e.facts) for e, a in zip(replay, replay_answers, strict=True)
        )
    latency = _latency_ms_p50(predictor, [e.prompt for e in examples[:LATENCY_PROMPTS]], gen)
    facts_ok = [ok for oks in by_split.values() for ok in oks]
    quality = answer_quality(
        [
            {"prompt": e.prompt, "response": e.response, "facts": e.facts, "intent": e.intent}
            for e in examples
        ],
        answers,
        policies.items,
        policies.refusals,
    )
    scores = ModelScores(
        model=target.label,
        version=target.version,
        label_smoothing=target.label_smoothing,
        eval_loss=loss,
        perplexity=math.exp(min(loss, 50.0)),
        fact_accuracy=statistics.fmean(facts_ok) if facts_ok else 0.0,
        fact_accuracy_by_split={split: statistics.fmean(oks) for split, oks in sorted(by_split.items())},
        product_accuracy=quality["product_accuracy"],
        refusal_accuracy=quality["refusal_accuracy"],
        false_refusal_rate=quality["false_refusal_rate"],
        by_intent={
            intent: {k: v for k, v in figures.items() if v is not None}
            for intent, figures in quality["by_intent"].items()
        },
        rouge_l=rouge,
        chrf=chrf,
        behavioural_pass_rate=statistics.fmean(rates.values()) if rates else 0.0,
        behavioural=rates,
        replay_fact_accuracy=replay_accuracy,
        latency_ms_p50=latency,
        n_examples=len(examples),
        examples_sha256=_examples_sha256(examples),
        seconds=time.perf_counter() - started,
    )
    log.info("scored %s in %.1fs", target.label, scores.seconds)
    return scores, {name: cases for name, cases in failures.items() if cases}


def _answers(predictor: Predictor, prompts: Sequence[str], gen: GenerationParams) -> list[str]:
    return [c.text for c in predictor.generate(prompts, gen)]


def _states_all(answer: str, facts: Sequence[str]) -> bool:
    """Whether an answer states every required fact."""
    return bool(facts) and all(states_fact(answer, f) for f in facts)


@functools.lru_cache(maxsize=4096)
def _fact_pattern(fact: str) -> re.Pattern[str]:
    # Not inside a longer token: no word character (or $ . ,) right before, no word character after.
    return re.compile(rf"(?<![\w$.,]){re.escape(' '.join(fact.split()))}(?!\w)")


def _eval_loss(predictor: Predictor, examples: Sequence[_Example]) -> float:
    """Mean loss per response token, tokenized and masked exactly as training does."""
    from components.trainloop import build_examples, eval_loss

    rows = [{"prompt": e.prompt, "response": e.response} for e in examples]
    tokenized = build_examples(rows, predictor.tokenizer, predictor.max_context)
    return eval_loss(predictor.model, tokenized, predictor.tokenizer.pad_token_id, batch_size=BATCH_SIZE)


def _invariance(
    predictor: Predictor,
    pairs: Sequence[tuple[_Example, str]],
    gen: GenerationParams,
    vocabulary: Sequence[str],
) -> list[tuple[bool, str]]:
    """Casing / punctuation / whitespace variants of a prompt must state the same facts.

    An original answer that states no fact fails every variant: agreeing on saying nothing is
    not invariance.
    """
    picked = _spread_by_intent([(e, a) for e, a in pairs if e.facts])
    variants = [(a, name, fn(e.prompt)) for e, a in picked for name, fn in _VARIANTS.items()]
    variant_answers = _answers(predictor, [prompt for _, _, prompt in variants], gen)
    cases = []
    for (answer, name, prompt), variant_answer in zip(variants, variant_answers, strict=True):
        expected, got = stated_facts(answer, vocabulary), stated_facts(variant_answer, vocabulary)
        ok = bool(expected) and got == expected
        cases.append((ok, f"{name}: {prompt.strip()!r} stated {sorted(got)}, original {sorted(expected)}"))
    return cases


def _spread_by_intent(pairs: Sequence[tuple[_Example, str]]) -> list[tuple[_Example, str]]:
    """Up to INVARIANCE_PROMPTS examples, round-robin over the facts they ask for (one per topic first)."""
    groups: dict[tuple[str, ...], list[tuple[_Example, str]]] = {}
    for pair in pairs:
        groups.setdefault(pair[0].facts, []).append(pair)
    picked: list[tuple[_Example, str]] = []
    queues = list(groups.values())
    while len(picked) < INVARIANCE_PROMPTS and any(queues):
        for queue in queues:
            if queue and len(picked) < INVARIANCE_PROMPTS:
                picked.append(queue.pop(0))
    return picked


def _directional(
    pairs: Sequence[tuple[_Example, str]], replaced: Mapping[str, Mapping[str, frozenset[str]]]
) -> list[tuple[bool, str]]:
    """Prompts of a policy version whose facts changed must get its facts, not the values they replaced.

    Works for any policy versions: a row of version X is checked against the values the same
    policy keys had in the versions before X. Runs only when the eval set holds such rows;
    otherwise the check is absent from the report.

    Args:
        pairs: examples and the model's answers.
        replaced: per policy version, what :func:`replaced_facts` says of it.
    """
    cases = []
    for example, answer in pairs:
        table = replaced.get(example.policy_version or "", {})
        changed = [f for f in example.facts if f in table]
        if not changed:
            continue
        missing = [f for f in example.facts if not states_fact(answer, f)]
        # A replaced value that this example also requires (another key's fact) is not stale.
        old = sorted({s for f in changed for s in table[f]} - set(example.facts))
        stale = [s for s in old if states_fact(answer, s)]
        ok = not missing and not stale
        cases.append((ok, f"{example.prompt!r}: missing {missing}, stale {stale}"))
    return cases


def _latency_ms_p50(predictor: Predictor, prompts: Sequence[str], gen: GenerationParams) -> float:
    """Median wall time of answering one prompt at a time (what one uncached request costs)."""
    timings = []
    for prompt in prompts:
        started = time.perf_counter()
        predictor.generate([prompt], gen)
        timings.append((time.perf_counter() - started) * 1000)
    return statistics.median(timings) if timings else 0.0


# MLflow ------------------------------------------------------------------------------------


_CHART_METRICS: dict[str, tuple[str, float]] = {
    "fact_accuracy": ("fact accuracy", 1.0),
    "product_accuracy": ("product", 1.0),
    "refusal_accuracy": ("refusals", 1.0),
    "rouge_l": ("ROUGE-L", 1.0),
    "chrf": ("chrF / 100", 100.0),
    "behavioural_pass_rate": ("behavioural", 1.0),
    "replay_fact_accuracy": ("replay facts", 1.0),
}


def _start_run(
    settings: Settings,
    models: Sequence[_Model],
    eval_ref: DatasetRef,
    replay_ref: DatasetRef | None,
    gen: GenerationParams,
    max_examples: int,
) -> tuple[MlflowClient, str]:
    from mlflow.entities import Param

    client = tracking_client(settings)
    tags = {
        "flywheel.step": "evaluate",
        "flywheel.candidate": models[0].label,
        "flywheel.eval_sha256": eval_ref.sha256,
    }
    if models[0].version:
        tags["flywheel.candidate_version"] = models[0].version
    if len(models) > 1:
        tags["flywheel.champion"] = models[1].label
        if models[1].version:
            tags["flywheel.champion_version"] = models[1].version
    if replay_ref is not None:
        tags["flywheel.replay_sha256"] = replay_ref.sha256
    name = f"evaluate v{models[0].version}" if models[0].version else "evaluate"
    run = client.create_run(experiment_id(client, settings), run_name=name, tags=tags)
    run_id = run.info.run_id
    params = {f"generation.{k}": str(v) for k, v in gen.model_dump().items()} | {
        "max_examples": str(max_examples)
    }
    client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
    return client, run_id


def _log_report(client: MlflowClient, run_id: str, report: EvalReport) -> None:
    """Metrics of both models, the report JSON and the comparison chart; the run is then finished."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = []
    for role, scores in (("candidate", report.candidate), ("champion", report.champion)):
        if scores is None:
            continue
        values = scores.model_dump(
            include=set(_CHART_METRICS) | {"eval_loss", "perplexity", "latency_ms_p50", "false_refusal_rate"}
        )
        values |= {f"behavioural.{k}": v for k, v in scores.behavioural.items()}
        values |= {f"fact_accuracy.{k}": v for k, v in scores.fact_accuracy_by_split.items()}
        values |= {
            f"intent.{intent}.{k}": v
            for intent, figures in scores.by_intent.items()
            for k, v in figures.items()
        }
        metrics += [Metric(f"{role}.{k}", float(v), now, 0) for k, v in values.items() if v is not None]
    client.log_batch(run_id, metrics=metrics)
    client.log_text(run_id, report_text(report), REPORT_ARTIFACT)
    client.log_figure(run_id, _chart(report), CHART_ARTIFACT)
    client.set_terminated(run_id, "FINISHED")


def _chart(report: EvalReport) -> Figure:
    """Grouped bars: candidate vs champion on every 0..1 metric; eval loss in the title."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 3.6), layout="constrained")
    ax = fig.subplots()
    rows = [("candidate", report.candidate, "#3b7dd8")]
    if report.champion is not None:
        rows.append(("champion", report.champion, "#9a9a9a"))
    width = 0.8 / len(rows)
    for i, (role, scores, color) in enumerate(rows):
        values = [(getattr(scores, key) or 0.0) / scale for key, (_, scale) in _CHART_METRICS.items()]
        xs = [x + i * width for x in range(len(values))]
        bars = ax.bar(xs, values, width, label=f"{role} {scores.version or ''}".strip(), color=color)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks([x + width * (len(rows) - 1) / 2 for x in range(len(_CHART_METRICS))])
    ax.set_xticklabels([label for label, _ in _CHART_METRICS.values()], fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.legend(fontsize=8, loc="upper right")
    losses = " vs ".join(f"{s.eval_loss:.3f}" for _, s, _ in rows)
    ax.set_title(f"eval loss {losses} ({report.candidate.n_examples} examples)", fontsize=9)
    return fig
