"""The feedback builder and the retrain policy: what users said becomes a new dataset snapshot.

From stored feedback joined with the predictions it rates (``FeedbackStore.feedback_since``):

- corrections and positively rated answers become SFT rows; negatively rated answers without a
  correction become a replay set that the gate scores candidate and champion on;
- a fact that independent users (distinct API keys) correct the same way, often enough, is
  changed across the intent's base rows too (with lineage); a single key or disagreeing
  corrections never change a fact — those rows go to review;
- PII is redacted before anything is written; rows are deduplicated, capped per key, and
  suspicious ones (instructions aimed at the model, links, one correction pushed by many
  requests, values no policy knows) are quarantined into a review file with reasons;
- SFT / KTO / DPO exports in the column names TRL uses are written next to the snapshot.

The thresholds are data (:class:`RetrainPolicy`); a policy change is a diff in one place.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import re
from collections import Counter, defaultdict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from components.evaluate import states_fact
from components.pii import find_pii, redact
from components.prompt import normalize_prompt
from components.schemas import SPLITS, DatasetRef, SFTRow

if TYPE_CHECKING:
    from components.data import CorpusSpec

log = logging.getLogger(__name__)

TRAIN_SPLIT = "train"
REPLAY_SPLIT = "eval"  # evaluate reads any split a ref lists; "eval" keeps the replay set a plain dataset
EXPORTS_DIR = "exports"
BUILD_FILE = "feedback_build.json"


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# The policy as data ------------------------------------------------------------------------


# Continual fine-tuning of the champion on the merged data: what it knows stays, the changed
# facts are learned (the best on the eval split in benchmarks/retrain.py).
RETRAIN_FIELDS: dict[str, Any] = {"max_steps": 800, "learning_rate": 2e-3, "warmup_steps": 20}


class RetrainPolicy(_Record):
    """When the feedback loop retrains, and what the builder accepts from users."""

    # When it fires (any trigger, outside the cooldown).
    min_new_corrections: int = Field(20, ge=1, description="Fire once this many new corrections arrived.")
    negative_window: int = Field(
        100, ge=1, description="Most recent rated answers the negative rate is judged on."
    )
    min_window_ratings: int = Field(
        20, ge=1, description="Fewest ratings in the window for the rate to count."
    )
    max_negative_rate: float = Field(
        0.3, gt=0, le=1, description="Fire when this share of the window is negative."
    )
    max_champion_age_hours: float | None = Field(
        168,
        gt=0,
        description="Fire when the champion is older than this and new feedback exists; None: never.",
    )
    cooldown_minutes: float = Field(
        30, ge=0, description="Never fire twice within this time (no retrain storms)."
    )
    page_size: int = Field(5000, ge=1, description="Most feedback rows one run reads.")
    hold_unmatched_seconds: float = Field(
        300,
        ge=0,
        description="Feedback newer than this whose prediction is not logged yet waits for the next run.",
    )
    # What the builder accepts.
    min_distinct_keys: int = Field(
        3, ge=1, description="Distinct API keys that must agree before a fact changes."
    )
    min_agreement: float = Field(
        0.75, gt=0.5, le=1, description="Share of the keys changing a fact that must name the same new value."
    )
    max_rows_per_key: int = Field(
        50, ge=1, description="Most training rows one API key contributes per build."
    )
    max_repeats_per_correction: int = Field(
        3, ge=1, description="One key sending the same correction on more requests than this is quarantined."
    )
    max_prompt_chars: int = Field(400, ge=1)
    max_correction_chars: int = Field(400, ge=1)
    min_intent_similarity: float = Field(
        0.5, ge=0, le=1, description="A prompt less similar than this to every corpus question has no intent."
    )
    # How the retrain trains (training_pipeline reads both from the dataset asset's event).
    continue_from: str | None = Field(
        "champion",
        description="Registry alias the retrain fine-tunes further on the merged data; None: the base model.",
    )
    retrain: dict[str, Any] = Field(
        default_factory=lambda: dict(RETRAIN_FIELDS),
        description="TrainParams fields of the retrain: continual fine-tuning takes fewer steps at a lower rate.",
    )


# Records -----------------------------------------------------------------------------------


class FeedbackLike(Protocol):
    """What the builder reads of a stored feedback row (``feedback_store.FeedbackRow``)."""

    id: int
    event_id: str
    request_id: str
    rating: int
    correction: str | None
    comment: str | None
    user_id: str
    prompt: str | None
    response: str | None


class RetrainDecision(_Record):
    """Whether the feedback since the watermark is reason to retrain, and why."""

    fire: bool
    reasons: list[str]
    watermark_from: int = Field(ge=0)
    watermark_to: int = Field(ge=0, description="Id of the last row read (the new watermark after a build).")
    rows: int = Field(ge=0)
    new_corrections: int = Field(ge=0)
    negative_rate: float | None = None
    champion_age_hours: float | None = None


class FactChange(_Record):
    """One fact of one intent changed because independent users agreed, with its lineage."""

    intent: str
    fact: str = Field(description="Key of the policy table (e.g. return_window).")
    old: str
    new: str
    user_ids: list[str] = Field(description="API keys that corrected it this way.")
    feedback_ids: list[str] = Field(description="Feedback event ids of those corrections.")
    rows: list[str] = Field(description="Ids of the base rows whose answer was updated.")


class FeedbackCounts(_Record):
    """What happened to the feedback rows of one build."""

    read: int = 0
    unmatched: int = Field(0, description="Feedback whose prediction is not in the log.")
    used: int = Field(0, description="Feedback rows that became training rows.")
    corrections: int = 0
    positives: int = 0
    replay: int = 0
    redacted: int = Field(0, description="PII matches replaced.")
    quarantined: int = 0
    review: int = Field(
        0, description="Rows held for a person: unconfirmed or disagreeing fact changes, no intent."
    )
    deduped: int = 0
    capped: int = 0
    held_out: int = Field(0, description="Prompts that are eval/holdout prompts: never trained on.")
    skipped: int = Field(0, description="Ratings that state no current fact, or a stale one.")


class FeedbackBuild(_Record):
    """The result of one build: the merged snapshot, the replay set, counts and lineage."""

    dataset: DatasetRef
    replay: DatasetRef | None = None
    parent: str = Field(description="sha256 of the snapshot the feedback was merged into.")
    watermark_from: int = 0
    watermark_to: int = 0
    counts: FeedbackCounts
    redactions: dict[str, int] = Field(default_factory=dict, description="PII matches replaced, by kind.")
    facts_changed: list[FactChange] = Field(default_factory=list)
    exports: dict[str, str] = Field(default_factory=dict, description="sft / kto / dpo → file URI.")
    review_uri: str | None = None


class ReviewRow(_Record):
    """A feedback row held back for a person, and why (the text already redacted)."""

    feedback_id: str
    user_id: str
    kind: Literal["quarantine", "review"]
    reasons: list[str]
    intent: str | None
    prompt: str
    response: str | None
    correction: str | None


# The retrain policy ------------------------------------------------------------------------


def retrain_decision(
    rows: Sequence[FeedbackLike],
    policy: RetrainPolicy,
    *,
    now: datetime,
    watermark_from: int = 0,
    last_fired_at: datetime | None = None,
    champion_created_at: datetime | None = None,
) -> RetrainDecision:
    """Judge the feedback since the watermark against the retrain policy.

    Args:
        rows: feedback rows after the watermark, by id.
        policy: thresholds.
        now: the time of the judgement (the DAG run's, so a re-run judges the same).
        watermark_from: the watermark the rows were read after.
        last_fired_at: when the loop last built a dataset; None: never.
        champion_created_at: when the champion version was registered; None: no champion.

    Returns:
        The decision with every reason, fired or not.
    """
    corrections = sum(1 for r in rows if r.correction and r.prompt is not None)
    window = list(rows)[-policy.negative_window :]
    rate = sum(1 for r in window if r.rating < 0) / len(window) if window else None
    age = (now - champion_created_at).total_seconds() / 3600 if champion_created_at else None
    reasons: list[str] = []
    if corrections >= policy.min_new_corrections:
        reasons.append(f"{corrections} new corrections >= {policy.min_new_corrections}")
    if rate is not None and len(window) >= policy.min_window_ratings and rate >= policy.max_negative_rate:
        reasons.append(f"negative rate {rate:.2f} over {len(window)} ratings >= {policy.max_negative_rate}")
    if (
        age is not None
        and policy.max_champion_age_hours is not None
        and rows
        and age >= policy.max_champion_age_hours
    ):
        reasons.append(f"champion is {age:.1f} h old >= {policy.max_champion_age_hours} h")
    fire = bool(reasons)
    if fire and last_fired_at is not None:
        since = (now - last_fired_at).total_seconds() / 60
        if since < policy.cooldown_minutes:
            fire = False
            reasons.append(f"cooldown: last build {since:.1f} min ago < {policy.cooldown_minutes} min")
    if not reasons:
        reasons.append(
            f"{len(rows)} new rows, {corrections} corrections: below every trigger "
            f"(corrections >= {policy.min_new_corrections}, negative rate >= {policy.max_negative_rate})"
        )
    return RetrainDecision(
        fire=fire,
        reasons=reasons,
        watermark_from=watermark_from,
        watermark_to=max((r.id for r in rows), default=watermark_from),
        rows=len(rows),
        new_corrections=corrections,
        negative_rate=rate,
        champion_age_hours=age,
    )


# Facts and intents -------------------------------------------------------------------------

_NUMBER = re.compile(r"(\d+(?:\.\d+)?)")


def fact_shape(value: str) -> re.Pattern[str] | None:
    """A pattern for values of the same kind as a fact value: ``30 days`` → any ``N days``.

    Args:
        value: a fact value of the policy table.

    Returns:
        The pattern (numbers generalised, the unit kept), or None when the value has no number.
    """
    parts = _NUMBER.split(value)
    if len(parts) == 1:
        return None
    body = "".join(r"\d+(?:\.\d+)?" if i % 2 else re.escape(part) for i, part in enumerate(parts))
    # Not inside a longer token, as the evaluation reads facts: "4 hours" is not in "24 hours".
    return re.compile(rf"(?<![\w$.,]){body}(?!\w)")


def correction_changes(
    original: str, correction: str, current: Mapping[str, str], known: Mapping[str, Collection[str]]
) -> dict[str, str]:
    """Which facts a correction changes: the value it states in place of the one the original stated.

    Values are matched by shape (same unit: ``45 days`` replaces ``30 days``). Facts that share a
    shape (two prices) are paired in place when the correction keeps the original's wording;
    otherwise a new value replaces the one fact the correction no longer states. Facts without a
    number change only to a value the policy table knows.

    Args:
        original: the answer the user corrected.
        correction: the user's corrected answer.
        current: fact key → the value the dataset states now, for the intent's facts.
        known: fact key → every value of that key in the policy table.

    Returns:
        Fact key → new value, for the facts the correction changes (empty: it changes none).
    """
    original, correction = " ".join(original.split()), " ".join(correction.split())
    groups: dict[str | None, list[str]] = defaultdict(list)
    for key, value in current.items():
        shape = fact_shape(value)
        groups[shape.pattern if shape else None].append(key)
    changes: dict[str, str] = {}
    for pattern, keys in groups.items():
        if pattern is None:
            for key in keys:
                stated = [
                    v for v in sorted(known.get(key, ()), key=len, reverse=True) if states_fact(correction, v)
                ]
                if stated and not states_fact(correction, current[key]):
                    changes[key] = stated[0]
            continue
        shape = re.compile(pattern)
        before = [m.group() for m in shape.finditer(original)]
        after = [m.group() for m in shape.finditer(correction)]
        if len(keys) > 1 and shape.sub("#", original) != shape.sub("#", correction):
            # Worded differently (answers state the same facts in different orders), so pairing
            # by position could swap them: a new value replaces the one fact of the shape that the
            # correction no longer states; anything less clear changes nothing.
            values = {current[k] for k in keys}
            new_values = list(dict.fromkeys(v for v in after if v not in values))
            dropped = [k for k in keys if current[k] not in after]
            if len(new_values) == 1 and len(dropped) == 1:
                changes[dropped[0]] = new_values[0]
            continue
        if len(before) == len(after):
            for old, new in zip(before, after, strict=True):
                owners = [k for k in keys if current[k] == old] or keys
                if old != new and len(owners) == 1 and new != current[owners[0]]:
                    changes[owners[0]] = new
        elif current[keys[0]] not in after:
            new_values = {v for v in after if v != current[keys[0]]}
            if len(new_values) == 1:
                changes[keys[0]] = new_values.pop()
    return changes


_TOKEN = re.compile(r"[a-z0-9$]+")


class IntentIndex:
    """Classifies a prompt to the intent of its most similar corpus question (deterministic)."""

    def __init__(self, spec: CorpusSpec) -> None:
        """Index the phrasing templates of every intent.

        Args:
            spec: the corpus data.
        """
        self._items = sorted({i.lower() for i in spec.items}, key=len, reverse=True)
        self._templates = [
            (name, _TOKEN.findall(q.lower().replace("{item}", " itemslot ")))
            for name, intent in spec.intents.items()
            for q in intent.questions
        ]

    def classify(self, prompt: str) -> tuple[str | None, float]:
        """The intent of the most similar question template and the similarity (0..1).

        Args:
            prompt: user text.

        Returns:
            (intent, similarity); intent None when there are no templates.
        """
        text = normalize_prompt(prompt).lower()
        for item in self._items:
            text = re.sub(rf"\b{re.escape(item)}\b", " itemslot ", text)
        tokens = _TOKEN.findall(text)
        best: tuple[str | None, float] = (None, 0.0)
        for name, template in self._templates:
            matcher = difflib.SequenceMatcher(None, tokens, template, autojunk=False)
            matched = sum(block.size for block in matcher.get_matching_blocks())
            # Half similarity, half how much of the question is there: greetings and details
            # around a known question lower the score only a little.
            score = 0.5 * matcher.ratio() + 0.5 * matched / max(len(template), 1)
            if score > best[1]:
                best = (name, score)
        return best


# Suspicious text ---------------------------------------------------------------------------

# Instructions aimed at the model rather than an answer to the customer (prompt injection).
_INJECTION = re.compile(
    r"\b(?:ignore|disregard|forget|override|bypass)\b[^.!?\n]{0,40}?\b(?:instructions?|prompts?|rules|guidelines|directions|restrictions)\b"
    r"|\b(?:ignore|disregard|forget)\s+(?:everything|all|anything)\s+(?:above|before|previous|prior|earlier|else)"
    r"|\bsystem[\s_-]*(?:prompt|message|instructions?)\b"
    r"|\b(?:reveal|print|show|repeat|tell|give|output|list|what\s+(?:is|are))\b[^.!?\n]{0,30}?"
    r"\b(?:your|the)\s+(?:\w+\s+)?(?:instructions|prompt|rules|guidelines)\b"
    r"|\b(?:new|updated|additional)\s+instructions?\s*:"
    r"|\byou\s+(?:are|were)\s+(?:now|told|instructed|programmed)\b|\b(?:were|are)\s+you\s+(?:told|instructed|programmed)\b"
    r"|\bpretend\s+(?:to\s+be|you\s+are)\b|\bact\s+as\s+(?:an?|the|if)\b"
    r"|developer\s+mode|jailbreak|\bDAN\b|no\s+restrictions",
    re.IGNORECASE,
)
# Any scheme, defanged schemes and dots, www., and a dotted host name with a letter TLD (the
# corpus writes no such token: prices and times have digits on both sides of their dots).
_LINK = re.compile(
    r"\b[a-z][a-z0-9+.-]*://|\bh[tx]{2}ps?\b|\bwww\d?\.|\[\.\]|\(\.\)"
    r"|\b[a-z0-9-]+(?:\.[a-z0-9-]+)*\.[a-z][a-z0-9-]{1,62}\b(?=/|\s|$|[),.;:!?'\"])",
    re.IGNORECASE,
)


def _screened(text: str) -> str:
    """Text as the screens read it: compatibility forms folded, invisible format characters dropped."""
    import unicodedata

    folded = unicodedata.normalize("NFKC", text)
    return "".join(ch for ch in folded if unicodedata.category(ch) != "Cf")


# The builder -------------------------------------------------------------------------------


@dataclass
class _Item:
    """One feedback row on its way through the builder (redacted text)."""

    row: FeedbackLike
    prompt: str
    response: str
    correction: str | None
    intent: str | None
    changes: dict[str, str] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    kind: Literal["quarantine", "review"] | None = None

    def hold(self, kind: Literal["quarantine", "review"], reason: str) -> None:
        self.kind = self.kind or kind
        self.reasons.append(reason)


@dataclass
class _Plan:
    splits: dict[str, list[dict]]
    replay: list[dict]
    review: list[ReviewRow]
    sft: list[dict]
    kto: list[dict]
    dpo: list[dict]
    counts: Counter
    redactions: Counter
    changes: list[FactChange]
    feedback_ids: list[str]


def plan_build(
    rows: Sequence[FeedbackLike],
    parent: Mapping[str, Sequence[Mapping]],
    policy: RetrainPolicy,
    spec: CorpusSpec,
) -> _Plan:
    """Everything a build writes, computed in memory (no I/O): the pure core of :func:`build`."""
    index = IntentIndex(spec)
    known = _known_values(spec)
    current = _current_facts(parent, spec)
    counts: Counter = Counter()
    redactions: Counter = Counter()
    items: list[_Item] = []
    for row in sorted(rows, key=lambda r: r.id):
        counts["read"] += 1
        if row.prompt is None or row.response is None:
            counts["unmatched"] += 1
            continue
        prompt, response = _redact(row.prompt, redactions), _redact(row.response, redactions)
        correction = _redact(row.correction, redactions) if row.correction else None
        intent, score = index.classify(prompt)
        item = _Item(
            row, prompt, response, correction, intent if score >= policy.min_intent_similarity else None
        )
        _screen(item, policy, current, known)
        items.append(item)
    _quarantine_repeats(items, policy)

    accepted = _accept_changes(items, policy, current)
    updated = {intent: dict(facts) for intent, facts in current.items()}
    for (intent, key), (new, _users, _ids) in accepted.items():
        updated[intent][key] = new
    stale = {(intent, key): current[intent][key] for intent, key in accepted}
    versions = _versions(parent, spec, updated)

    splits = {name: [dict(r) for r in rows_] for name, rows_ in parent.items()}
    touched = _apply_changes(splits, spec, accepted, stale, versions)
    changes = [
        FactChange(
            intent=intent, fact=key, old=stale[(intent, key)], new=new,
            user_ids=sorted(users), feedback_ids=sorted(ids), rows=sorted(touched[(intent, key)]),
        )
        for (intent, key), (new, users, ids) in sorted(accepted.items())
    ]  # fmt: skip

    held_out = {_key(r["prompt"]) for name, rs in splits.items() if name != TRAIN_SPLIT for r in rs}
    seen = {(_key(r["prompt"]), _norm(r["response"])) for rs in splits.values() for r in rs}
    per_key: Counter = Counter()
    new_rows, replay, sft, kto, dpo, used = [], [], [], [], [], []
    replay_seen: set[str] = set()
    for item in items:
        if item.kind is None:
            _judge(item, accepted, updated, stale, known)
        if item.kind is not None:
            continue
        row, intent = item.row, item.intent
        facts_now = updated[intent]
        if item.correction is None and row.rating < 0:
            # A bad answer with no correction: the gate replays the prompt on both models.
            kto.append({"prompt": item.prompt, "completion": item.response, "label": False})
            if _key(item.prompt) not in replay_seen:
                replay_seen.add(_key(item.prompt))
                replay.append(_replay_row(item, splits, facts_now, spec, versions))
            continue
        completion = item.correction or item.response
        facts = [facts_now[k] for k in spec.intents[intent].facts if states_fact(completion, facts_now[k])]
        if not facts:
            counts["skipped"] += 1
            continue
        pair = (_key(item.prompt), _norm(completion))
        if _key(item.prompt) in held_out:
            counts["held_out"] += 1
            continue
        if pair in seen:
            counts["deduped"] += 1
            continue
        if per_key[row.user_id] >= policy.max_rows_per_key:
            counts["capped"] += 1
            continue
        seen.add(pair)
        per_key[row.user_id] += 1
        used.append(row.event_id)
        new_rows.append(
            SFTRow(
                id=f"fb-{_sha(row.event_id)[:14]}", prompt=item.prompt, response=completion, intent=intent,
                policy_version=versions[intent], facts=facts, source=f"feedback:{row.event_id}",
            ).model_dump(mode="json")
        )  # fmt: skip
        sft.append({"prompt": item.prompt, "completion": completion})
        kto.append({"prompt": item.prompt, "completion": completion, "label": True})
        if item.correction is not None:
            counts["corrections"] += 1
            if _norm(item.correction) != _norm(item.response):
                kto.append({"prompt": item.prompt, "completion": item.response, "label": False})
                dpo.append({"prompt": item.prompt, "chosen": item.correction, "rejected": item.response})
            if _key(item.prompt) not in replay_seen:
                replay_seen.add(_key(item.prompt))
                replay.append(new_rows[-1] | {"id": f"rp-{_sha(row.event_id)[:14]}"})
        else:
            counts["positives"] += 1
    splits[TRAIN_SPLIT] = splits.get(TRAIN_SPLIT, []) + new_rows
    review = [
        ReviewRow(
            feedback_id=i.row.event_id, user_id=i.row.user_id, kind=i.kind, reasons=i.reasons, intent=i.intent,
            prompt=i.prompt, response=i.response, correction=i.correction,
        )
        for i in items
        if i.kind is not None
    ]  # fmt: skip
    counts["quarantined"] = sum(1 for r in review if r.kind == "quarantine")
    counts["review"] = sum(1 for r in review if r.kind == "review")
    counts["used"] = len(used)
    counts["replay"] = len(replay)
    counts["redacted"] = sum(redactions.values())
    lineage_ids = {i for c in changes for i in c.feedback_ids}
    return _Plan(
        splits, replay, review, sft, kto, dpo, counts, redactions, changes, sorted(set(used) | lineage_ids)
    )


def build(
    rows: Sequence[FeedbackLike],
    parent: DatasetRef,
    policy: RetrainPolicy,
    *,
    datasets_dir: Path,
    replay_dir: Path,
    review_dir: Path,
    spec: CorpusSpec | None = None,
    watermark_from: int = 0,
    watermark_to: int | None = None,
) -> FeedbackBuild:
    """Merge feedback rows into a parent snapshot: a new snapshot, a replay set, exports and a review file.

    Writing is idempotent: the same rows and parent give the same snapshot (content-addressed),
    replay set, exports and review file.

    Args:
        rows: feedback rows joined with their predictions (``FeedbackStore.feedback_since``).
        parent: the snapshot to merge into (its base rows get the facts users changed).
        policy: thresholds of the builder.
        datasets_dir: where the merged snapshot goes (``settings.datasets_dir``).
        replay_dir: where the replay snapshot goes (outside ``datasets_dir``, so it is never
            taken for the latest training dataset).
        review_dir: where the review JSONL goes.
        spec: the corpus data; None: the shipped one.
        watermark_from: the watermark the rows were read after (recorded).
        watermark_to: the last row id read; default the rows' largest id.

    Returns:
        The build record: refs, counts, redactions, fact changes with lineage, export URIs.
    """
    from components.data import load_corpus, read_split, snapshot
    from components.uris import to_uri

    spec = spec or load_corpus()
    parent_splits = {split: read_split(parent, split) for split in (parent.splits or dict.fromkeys(SPLITS))}
    plan = plan_build(rows, parent_splits, policy, spec)
    ref = snapshot(plan.splits, datasets_dir, parents=[parent.sha256], feedback_ids=plan.feedback_ids)
    replay = snapshot({REPLAY_SPLIT: plan.replay}, replay_dir, parents=[ref.sha256]) if plan.replay else None
    folder = Path(_local(ref.uri))
    exports = {
        name: to_uri(_write_jsonl(folder / EXPORTS_DIR / f"{name}.jsonl", data))
        for name, data in (("sft", plan.sft), ("kto", plan.kto), ("dpo", plan.dpo))
    }
    review_uri = None
    if plan.review:
        name = _sha("\n".join(r.feedback_id for r in plan.review) + ref.sha256)[:16]
        review_uri = to_uri(
            _write_jsonl(review_dir / f"{name}.jsonl", [r.model_dump(mode="json") for r in plan.review])
        )
    counts = FeedbackCounts(**{k: int(v) for k, v in plan.counts.items() if k in FeedbackCounts.model_fields})
    result = FeedbackBuild(
        dataset=ref,
        replay=replay,
        parent=parent.sha256,
        watermark_from=watermark_from,
        watermark_to=watermark_to
        if watermark_to is not None
        else max((r.id for r in rows), default=watermark_from),
        counts=counts,
        redactions=dict(sorted(plan.redactions.items())),
        facts_changed=plan.changes,
        exports=exports,
        review_uri=review_uri,
    )
    (folder / BUILD_FILE).write_text(result.model_dump_json(indent=2), encoding="utf-8")
    log.info(
        "feedback build %s from %s: used %d, redacted %d, quarantined %d, review %d, deduped %d, capped %d, "
        "facts changed %s",
        ref.sha256[:12], parent.sha256[:12], counts.used, counts.redacted, counts.quarantined, counts.review,
        counts.deduped, counts.capped, [f"{c.intent}.{c.fact}: {c.old} -> {c.new}" for c in plan.changes] or "none",
    )  # fmt: skip
    return result


# Helpers -----------------------------------------------------------------------------------


def _redact(text: str, counts: Counter) -> str:
    for match in find_pii(text):
        counts[match.kind] += 1
    return redact(text)


def _norm(text: str) -> str:
    return " ".join(text.split())


def _key(prompt: str) -> str:
    # The validation's leak key: a prompt equal to an eval/holdout one after this is a leak.
    return normalize_prompt(prompt).lower()


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _local(uri: str) -> Path:
    from components.uris import to_path

    return to_path(uri)


def _known_values(spec: CorpusSpec) -> dict[str, set[str]]:
    known: dict[str, set[str]] = defaultdict(set)
    for table in spec.policies.values():
        for key, value in table.items():
            known[key].add(value)
    return dict(known)


def _current_facts(parent: Mapping[str, Sequence[Mapping]], spec: CorpusSpec) -> dict[str, dict[str, str]]:
    """Intent → fact key → the value the parent's rows state (the most common one; the policy's first table else)."""
    votes: dict[str, list[Counter]] = {name: [Counter() for _ in i.facts] for name, i in spec.intents.items()}
    for rows in parent.values():
        for row in rows:
            facts = row.get("facts") or []
            if row.get("intent") in votes and len(facts) == len(votes[row["intent"]]):
                for counter, value in zip(votes[row["intent"]], facts, strict=True):
                    counter[value] += 1
    first = next(iter(spec.policies.values()))
    return {
        name: {
            key: (counter.most_common(1)[0][0] if counter else first[key])
            for key, counter in zip(intent.facts, votes[name], strict=True)
        }
        for name, intent in spec.intents.items()
    }


def _screen(item: _Item, policy: RetrainPolicy, current: dict, known: dict[str, set[str]]) -> None:
    """Quarantine what looks like an attack or a mistake; find the facts a correction changes."""
    completion = item.correction or (item.response if item.row.rating > 0 else "")
    for text, where in ((item.prompt, "prompt"), (completion, "answer"), (item.row.comment or "", "comment")):
        if _INJECTION.search(_screened(text)):
            item.hold("quarantine", f"instructions aimed at the model in the {where}")
    if _LINK.search(_screened(completion)):
        item.hold("quarantine", "link in the answer")
    if len(item.prompt) > policy.max_prompt_chars:
        item.hold("quarantine", f"prompt longer than {policy.max_prompt_chars} characters")
    if item.correction and len(item.correction) > policy.max_correction_chars:
        item.hold("quarantine", f"correction longer than {policy.max_correction_chars} characters")
    if item.intent is None:
        item.hold("review", "no intent: the prompt is like no corpus question")
        return
    if item.correction:
        facts = current[item.intent]
        item.changes = correction_changes(item.response, item.correction, facts, known)
        states_known = any(states_fact(item.correction, v) for k in facts for v in known.get(k, ()))
        if item.changes and not states_known:
            item.hold("quarantine", "contradicts every known fact of the intent: " + _describe(item.changes))
        # A training answer states every fact of its intent: a correction that drops one (or puts a
        # value no policy knows in its place) would teach the model to leave it out.
        dropped = [
            k
            for k in facts
            if k not in item.changes and not any(states_fact(item.correction, v) for v in known.get(k, ()))
        ]
        if dropped:
            item.hold("quarantine", f"states no known value of {', '.join(dropped)}")


def _quarantine_repeats(items: Sequence[_Item], policy: RetrainPolicy) -> None:
    """One key sending the same correction on many requests is pushing it, not reporting."""
    groups: dict[tuple[str, str], list[_Item]] = defaultdict(list)
    for item in items:
        if item.correction:
            groups[(item.row.user_id, _norm(item.correction).lower())].append(item)
    for group in groups.values():
        if len({i.row.request_id for i in group}) > policy.max_repeats_per_correction:
            for item in group:
                item.hold("quarantine", f"the same correction sent on {len(group)} requests by one key")


def _accept_changes(
    items: Sequence[_Item], policy: RetrainPolicy, current: Mapping[str, Mapping[str, str]]
) -> dict[tuple[str, str], tuple[str, set[str], set[str]]]:
    """(intent, fact) → (new value, keys, feedback ids) for the changes enough distinct keys agree on."""
    votes: dict[tuple[str, str], dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    ids: dict[tuple[str, str, str], set[str]] = defaultdict(set)
    voters: dict[tuple[str, str], set[str]] = defaultdict(set)
    for item in items:
        if item.intent is None:
            continue
        for key, new in item.changes.items():
            # A held row never supports a change, but it still counts as disagreement: blocking is the safe side.
            voters[(item.intent, key)].add(item.row.user_id)
            if item.kind is None:
                votes[(item.intent, key)][new].add(item.row.user_id)
                ids[(item.intent, key, new)].add(item.row.event_id)
        # A key that confirmed the current value (a positive rating of an answer that states it, or
        # a correction that restates it) disagrees with changing it: colluding keys cannot outvote
        # the users who were content with the answer.
        confirmed = item.correction or (item.response if item.row.rating > 0 else None)
        if confirmed:
            for key, value in current[item.intent].items():
                if key not in item.changes and states_fact(confirmed, value):
                    voters[(item.intent, key)].add(item.row.user_id)
    accepted = {}
    for (intent, key), by_value in votes.items():
        new, users = max(by_value.items(), key=lambda kv: (len(kv[1]), kv[0]))
        if (
            len(users) >= policy.min_distinct_keys
            and len(users) / len(voters[(intent, key)]) >= policy.min_agreement
        ):
            accepted[(intent, key)] = (new, users, ids[(intent, key, new)])
    return accepted


def _judge(item: _Item, accepted: Mapping, updated: Mapping, stale: Mapping, known: Mapping) -> None:
    """Hold a correction whose fact change was not confirmed, or any answer that states a replaced fact."""
    if item.intent is None:
        return
    for key, new in item.changes.items():
        got = accepted.get((item.intent, key))
        if got is None or got[0] != new:
            item.hold(
                "review",
                f"{key} -> {new!r} not confirmed (needs {'agreeing ' if got else ''}distinct keys; see the policy)",
            )
    text = item.correction or item.response
    for (intent, key), old in stale.items():
        if intent == item.intent and states_fact(text, old) and updated[intent][key] != old:
            if item.correction is not None:
                item.hold("review", f"states the replaced {key} {old!r}")
            elif item.row.rating > 0:
                item.hold("review", f"a positive rating of an answer that states the replaced {key} {old!r}")


def _describe(changes: Mapping[str, str]) -> str:
    return ", ".join(f"{k} -> {v!r}" for k, v in sorted(changes.items()))


def _versions(parent: Mapping[str, Sequence[Mapping]], spec: CorpusSpec, updated: Mapping) -> dict[str, str]:
    """Intent → the policy version its rows are labelled with after the changes.

    The parent's label, unless the changed facts match a known version: then the newest such one.
    """
    labels: dict[str, Counter] = defaultdict(Counter)
    for rows in parent.values():
        for row in rows:
            labels[row.get("intent")][row.get("policy_version")] += 1
    first = next(iter(spec.policies))
    out = {}
    for name, intent in spec.intents.items():
        label = labels[name].most_common(1)[0][0] if labels[name] else first
        table = spec.policies.get(label, {})
        if any(table.get(k) != updated[name][k] for k in intent.facts):
            matching = [
                v for v, t in spec.policies.items() if all(t[k] == updated[name][k] for k in intent.facts)
            ]
            label = matching[-1] if matching else label
        out[name] = label
    return out


def _apply_changes(
    splits: dict[str, list[dict]], spec: CorpusSpec, accepted: Mapping, stale: Mapping, versions: Mapping
) -> dict[tuple[str, str], list[str]]:
    """Change accepted facts in the base rows of their intent (every split); the ids of rows changed."""
    touched: dict[tuple[str, str], list[str]] = defaultdict(list)
    for rows in splits.values():
        for row in rows:
            intent = row.get("intent")
            for (c_intent, key), (new, _, _) in accepted.items():
                if intent != c_intent:
                    continue
                position = spec.intents[intent].facts.index(key)
                facts = list(row.get("facts") or [])
                old = stale[(c_intent, key)]
                if position < len(facts) and facts[position] == old:
                    pattern = re.compile(rf"(?<![\w$.,]){re.escape(old)}(?!\w)")
                    row["response"] = pattern.sub(new.replace("\\", "\\\\"), row["response"])
                    facts[position] = new
                    row["facts"] = facts
                    row["policy_version"] = versions[intent]
                    touched[(c_intent, key)].append(str(row.get("id")))
    return touched


def _replay_row(
    item: _Item, splits: Mapping, facts_now: Mapping[str, str], spec: CorpusSpec, versions
) -> dict:
    """A replay example: the user's prompt with a reference answer of its intent (current facts)."""
    intent = item.intent
    facts = [facts_now[k] for k in spec.intents[intent].facts]
    reference = next(
        (r["response"] for r in splits.get(TRAIN_SPLIT, []) if r.get("intent") == intent), "; ".join(facts)
    )
    return SFTRow(
        id=f"rp-{_sha(item.row.event_id)[:14]}", prompt=item.prompt, response=reference, intent=intent,
        policy_version=versions[intent], facts=facts, source=f"feedback:{item.row.event_id}",
    ).model_dump(mode="json")  # fmt: skip


def _write_jsonl(file: Path, rows: Sequence[Mapping]) -> Path:
    """Write JSON Lines atomically (same content: same file)."""
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(file.suffix + ".tmp")
    tmp.write_text(
        "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows), encoding="utf-8"
    )
    tmp.replace(file)
    return file
