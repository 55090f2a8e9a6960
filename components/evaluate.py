"""Evaluate a candidate against the champion on the same examples, and log the report to MLflow.

Both models are scored on one deterministic subsample of the eval + holdout splits with the
same generation parameters: loss per response token (prompt masked, as in training), fact
accuracy, ROUGE-L and chrF on greedy answers, behavioural checks (invariance, directional),
single-prompt latency, and fact accuracy on the replay set (prompts users marked bad).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import math
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

from components.schemas import SPLITS, DatasetRef, EvalReport, GenerationParams, ModelScores
from components.tracking import client as tracking_client
from components.tracking import experiment_id

if TYPE_CHECKING:  # heavy imports stay inside functions
    from matplotlib.figure import Figure
    from mlflow import MlflowClient
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from components.settings import Settings

log = logging.getLogger(__name__)

EVAL_SPLITS = ("eval", "holdout")
# Greedy decoding (do_sample defaults to False): evaluation must be deterministic.
DEFAULT_GENERATION = GenerationParams(max_new_tokens=64)
BATCH_SIZE = 32
INVARIANCE_PROMPTS = 12  # originals per evaluation; each gets every variant below
SMALL_MODEL_PARAMETERS = 50_000_000  # below this, decode on one CPU thread (see _cpu_threads)
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
_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w.-]+))/?$")
_TEMPLATE_MARKER = "###"  # the prompt template's section marker: a new turn starts there


@dataclass(frozen=True)
class _Example:
    id: str
    split: str
    prompt: str
    response: str
    facts: tuple[str, ...]
    policy_version: str | None


@dataclass(frozen=True)
class _Model:
    uri: str  # what to load (a registry alias is pinned to its version first)
    label: str  # what the caller named
    version: str | None


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
        candidate: model URI (``models:/…``, ``runs:/…``, any artifact URI) or local HF folder.
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
    gen = gen or DEFAULT_GENERATION
    examples = _sample(_read_examples(eval_ref, EVAL_SPLITS), max_examples)
    if not examples:
        raise ValueError(f"dataset {eval_ref.sha256[:12]} has no eval or holdout rows to score")
    replay = _sample([e for e in _read_examples(replay_ref, _splits(replay_ref)) if e.facts], max_examples)
    if replay_ref is not None and not replay:
        log.warning(
            "replay set %s has no rows with facts: replay accuracy not measured", replay_ref.sha256[:12]
        )
    models = [_pin(candidate, settings)] + ([_pin(champion, settings)] if champion else [])

    client = run_id = None
    if log_to_mlflow:
        client, run_id = _start_run(settings, models, eval_ref, replay_ref, gen, max_examples)
    try:
        scored = [_score(m, settings, examples, replay, gen) for m in models]
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


def load_model_from_uri(uri: str, settings: Settings) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM from an MLflow model URI or a local folder; weights from safetensors only.

    Args:
        uri: ``models:/NAME/VERSION``, ``models:/NAME@ALIAS``, ``models:/m-…``, ``runs:/…``, any
            artifact URI of a model logged with ``save_pretrained=True``, or a local folder (a
            Hugging Face directory or a downloaded MLflow model).
        settings: tracking / registry URI to resolve MLflow URIs against.

    Returns:
        The model (eval mode) and its tokenizer.
    """
    local = _local_dir(uri)
    if local is not None:
        return _load_folder(local)
    import mlflow

    from components.registry import artifact_location

    location = artifact_location(uri, settings)
    stored = _local_dir(location)
    if stored is not None:  # a local artifact store: read it in place
        return _load_folder(stored)
    with tempfile.TemporaryDirectory(prefix="flywheel-model-") as tmp:
        path = mlflow.artifacts.download_artifacts(
            artifact_uri=location,
            dst_path=tmp,
            tracking_uri=settings.tracking_uri,
            registry_uri=settings.tracking_uri,
        )
        return _load_folder(Path(path))


def generate_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    gen: GenerationParams,
    batch_size: int = BATCH_SIZE,
) -> list[str]:
    """Answer user prompts through the one prompt template: batched, left-padded, cut at EOS.

    Args:
        model: a causal LM.
        tokenizer: its tokenizer.
        prompts: raw user prompts (normalized and templated here).
        gen: generation parameters (greedy unless ``do_sample``).
        batch_size: prompts per ``generate`` call; similar lengths are batched together.

    Returns:
        One answer per prompt, in order.
    """
    import torch

    from components.prompt import format_prompt

    if not prompts:
        return []
    texts = [format_prompt(p) for p in prompts]
    max_prompt = max(_context_length(model) - gen.max_new_tokens, 8)
    kwargs = _generate_kwargs(gen, tokenizer)
    if gen.do_sample and gen.seed is not None:
        torch.manual_seed(gen.seed)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    answers = [""] * len(texts)
    sides = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side = tokenizer.truncation_side = "left"
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            enc = tokenizer(
                [texts[i] for i in idx],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_prompt,
            ).to(model.device)
            with torch.inference_mode():
                out = model.generate(**enc, **kwargs)
            decoded = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            for i, text in zip(idx, decoded, strict=True):
                answers[i] = text.split(_TEMPLATE_MARKER, 1)[0].strip()
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = sides
    return answers


def states_fact(answer: str, fact: str) -> bool:
    """Whether an answer states a fact string as a whole (``4 hours`` is not in ``24 hours``)."""
    return _fact_pattern(fact).search(" ".join(answer.split())) is not None


def stated_facts(answer: str, vocabulary: Sequence[str]) -> frozenset[str]:
    """The fact strings of ``vocabulary`` that an answer states."""
    return frozenset(f for f in vocabulary if states_fact(answer, f))


def fact_vocabulary() -> tuple[str, ...]:
    """Every policy fact of every policy version (what an answer can state)."""
    from components.data import POLICIES

    return tuple(sorted({v for table in POLICIES.values() for v in table.values()}))


# Examples ----------------------------------------------------------------------------------


def _splits(ref: DatasetRef | None) -> tuple[str, ...]:
    if ref is None:
        return ()
    return tuple(ref.splits) or SPLITS


def _read_examples(ref: DatasetRef | None, splits: Sequence[str]) -> list[_Example]:
    from components.data import read_split

    if ref is None:
        return []
    vocabulary = fact_vocabulary()
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
                _Example(row_id, split, row["prompt"], row["response"], facts, row.get("policy_version"))
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


def _pin(uri: str, settings: Settings) -> _Model:
    """Pin a registry URI to its version now, so an alias that moves mid-evaluation cannot mix models."""
    if not _MODELS_URI.match(uri):
        return _Model(uri=uri, label=uri, version=None)
    from components.registry import resolve

    info = resolve(uri, settings)
    return _Model(uri=info.model_uri, label=uri, version=info.version)


def _score(
    target: _Model,
    settings: Settings,
    examples: Sequence[_Example],
    replay: Sequence[_Example],
    gen: GenerationParams,
) -> tuple[ModelScores, dict[str, list[str]]]:
    """Every metric of one model on the given examples."""
    started = time.perf_counter()
    model, tokenizer = load_model_from_uri(target.uri, settings)
    with _cpu_threads(model):
        return _score_loaded(target, model, tokenizer, examples, replay, gen, started)


def _score_loaded(
    target: _Model,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[_Example],
    replay: Sequence[_Example],
    gen: GenerationParams,
    started: float,
) -> tuple[ModelScores, dict[str, list[str]]]:
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import CHRF

    loss = _eval_loss(model, tokenizer, examples)
    answers = generate_answers(model, tokenizer, [e.prompt for e in examples], gen)
    pairs = list(zip(examples, answers, strict=True))
    by_split: dict[str, list[bool]] = {}
    for example, answer in pairs:
        if example.facts:
            by_split.setdefault(example.split, []).append(_states_all(answer, example.facts))
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rouge = statistics.fmean(scorer.score(e.response, a)["rougeL"].fmeasure for e, a in pairs)
    chrf = CHRF().corpus_score(answers, [[e.response for e in examples]]).score

    vocabulary = tuple(sorted(set(fact_vocabulary()) | {f for e in examples for f in e.facts}))
    outcomes = {
        "invariance": _invariance(model, tokenizer, pairs, gen, vocabulary),
        "directional": _directional(pairs),
    }
    outcomes = {name: cases for name, cases in outcomes.items() if cases}  # a check with no case did not run
    rates = {name: statistics.fmean(ok for ok, _ in cases) for name, cases in outcomes.items()}
    failures = {
        name: [why for ok, why in cases if not ok][:FAILURES_SHOWN] for name, cases in outcomes.items()
    }

    replay_accuracy = None
    if replay:
        replay_answers = generate_answers(model, tokenizer, [e.prompt for e in replay], gen)
        replay_accuracy = statistics.fmean(
            _states_all(a, e.facts) for e, a in zip(replay, replay_answers, strict=True)
        )
    latency = _latency_ms_p50(model, tokenizer, [e.prompt for e in examples[:LATENCY_PROMPTS]], gen)
    facts_ok = [ok for oks in by_split.values() for ok in oks]
    scores = ModelScores(
        model=target.label,
        version=target.version,
        eval_loss=loss,
        perplexity=math.exp(min(loss, 50.0)),
        fact_accuracy=statistics.fmean(facts_ok) if facts_ok else 0.0,
        fact_accuracy_by_split={split: statistics.fmean(oks) for split, oks in sorted(by_split.items())},
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


def _states_all(answer: str, facts: Sequence[str]) -> bool:
    """Whether an answer states every required fact."""
    return bool(facts) and all(states_fact(answer, f) for f in facts)


@functools.lru_cache(maxsize=4096)
def _fact_pattern(fact: str) -> re.Pattern[str]:
    # Not inside a longer token: no word character (or $ . ,) right before, no word character after.
    return re.compile(rf"(?<![\w$.,]){re.escape(' '.join(fact.split()))}(?!\w)")


def _eval_loss(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, examples: Sequence[_Example]
) -> float:
    """Mean loss per response token, tokenized and masked exactly as training does."""
    from components.trainloop import build_examples, eval_loss

    rows = [{"prompt": e.prompt, "response": e.response} for e in examples]
    tokenized = build_examples(rows, tokenizer, _context_length(model))
    return eval_loss(model, tokenized, tokenizer.pad_token_id, batch_size=BATCH_SIZE)


def _invariance(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
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
    variant_answers = generate_answers(model, tokenizer, [prompt for _, _, prompt in variants], gen)
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


def _directional(pairs: Sequence[tuple[_Example, str]]) -> list[tuple[bool, str]]:
    """Policy-v2 prompts whose facts changed must get the v2 facts and not the v1 values they replaced.

    Runs only when the eval set holds such rows; otherwise the check is absent from the report.
    """
    from components.data import POLICIES

    replaced = {new: POLICIES["v1"][key] for key, new in POLICIES["v2"].items() if POLICIES["v1"][key] != new}
    cases = []
    for example, answer in pairs:
        changed = [f for f in example.facts if f in replaced]
        if example.policy_version != "v2" or not changed:
            continue
        missing = [f for f in example.facts if not states_fact(answer, f)]
        stale = [replaced[f] for f in changed if states_fact(answer, replaced[f])]
        ok = not missing and not stale
        cases.append((ok, f"{example.prompt!r}: missing {missing}, stale {stale}"))
    return cases


def _latency_ms_p50(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], gen: GenerationParams
) -> float:
    """Median wall time of answering one prompt at a time (what one uncached request costs)."""
    timings = []
    for prompt in prompts:
        started = time.perf_counter()
        generate_answers(model, tokenizer, [prompt], gen, batch_size=1)
        timings.append((time.perf_counter() - started) * 1000)
    return statistics.median(timings) if timings else 0.0


# Models ------------------------------------------------------------------------------------


def _load_folder(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a Hugging Face folder, or the one inside a downloaded MLflow transformers model."""
    from components.base_model import load_model, load_tokenizer

    mlmodel = path / "MLmodel"
    if not mlmodel.exists():
        model, tokenizer = load_model(path)
        return model.eval(), tokenizer
    import yaml
    from transformers import AutoModelForCausalLM

    flavor = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {}).get("transformers") or {}
    weights = path / str(flavor.get("model_binary") or "model")
    if not flavor or not any(weights.glob("*.safetensors")):
        raise ValueError(
            f"{path} holds no transformers weights in safetensors (log the model with save_pretrained=True)"
        )
    tokenizer_dir = path / "components" / "tokenizer"
    tokenizer = load_tokenizer(tokenizer_dir if tokenizer_dir.is_dir() else weights)
    model = AutoModelForCausalLM.from_pretrained(str(weights), use_safetensors=True, dtype="auto")
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def _local_dir(uri: str) -> Path | None:
    """The local folder a path or ``file:`` URI names, if it is one."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("", "file"):
        return None
    path = Path(unquote(parsed.path) if parsed.scheme else uri).expanduser()
    return path if path.is_dir() else None


@contextlib.contextmanager
def _cpu_threads(model: PreTrainedModel) -> Iterator[None]:
    """One intra-op thread for a small model on CPU, restored afterwards.

    Decoding a small model is a long chain of tiny ops: extra threads only add synchronization
    (measured here: 200 answers of the ~0.5 M-parameter base model take 2 s on one thread, 5-15 s
    on two when the cores are shared).
    """
    import torch

    small = model.device.type == "cpu" and model.num_parameters() < SMALL_MODEL_PARAMETERS
    before = torch.get_num_threads()
    if small:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if small:
            torch.set_num_threads(before)


def _context_length(model: PreTrainedModel) -> int:
    return int(getattr(model.config, "max_position_embeddings", None) or 1024)


def _generate_kwargs(gen: GenerationParams, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "max_new_tokens": gen.max_new_tokens,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if gen.do_sample and gen.temperature > 0:
        kwargs.update(do_sample=True, temperature=gen.temperature, top_k=gen.top_k or None, top_p=gen.top_p)
    else:
        kwargs["do_sample"] = False
    return kwargs


# MLflow ------------------------------------------------------------------------------------


_CHART_METRICS: dict[str, tuple[str, float]] = {
    "fact_accuracy": ("fact accuracy", 1.0),
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
            include=set(_CHART_METRICS) | {"eval_loss", "perplexity", "latency_ms_p50"}
        )
        values |= {f"behavioural.{k}": v for k, v in scores.behavioural.items()}
        values |= {f"fact_accuracy.{k}": v for k, v in scores.fact_accuracy_by_split.items()}
        metrics += [Metric(f"{role}.{k}", float(v), now, 0) for k, v in values.items() if v is not None]
    client.log_batch(run_id, metrics=metrics)
    client.log_dict(run_id, report.model_dump(mode="json"), REPORT_ARTIFACT)
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
