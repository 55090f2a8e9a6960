"""Support corpus: a deterministic customer-support SFT generator and content-addressed snapshots."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from components.schemas import POLICY_VERSIONS, SPLITS, DatasetRef, Intent, SFTRow

log = logging.getLogger(__name__)

REF_FILE = "ref.json"

# The policy table: the facts every answer states. v2 changes several of them, so a policy
# change is a real test of the loop (the model must learn the new facts).
POLICIES: dict[str, dict[str, str]] = {
    "v1": {
        "return_window": "30 days",
        "refund_time": "5-7 business days",
        "standard_shipping": "3-5 business days",
        "express_shipping": "1-2 business days",
        "free_shipping_over": "$50",
        "standard_fee": "$4.99",
        "express_fee": "$14.99",
        "tracking_delay": "24 hours",
        "warranty": "12 months",
        "reset_link_valid": "30 minutes",
        "cancel_window": "2 hours",
        "payment_methods": "Visa, Mastercard and PayPal",
        "exchange_window": "30 days",
    },
    "v2": {
        "return_window": "45 days",
        "refund_time": "3-5 business days",
        "standard_shipping": "2-4 business days",
        "express_shipping": "1-2 business days",
        "free_shipping_over": "$35",
        "standard_fee": "$5.99",
        "express_fee": "$12.99",
        "tracking_delay": "12 hours",
        "warranty": "24 months",
        "reset_link_valid": "60 minutes",
        "cancel_window": "4 hours",
        "payment_methods": "Visa, Mastercard, PayPal and Apple Pay",
        "exchange_window": "60 days",
    },
}


@dataclass(frozen=True)
class _IntentSpec:
    facts: tuple[str, ...]  # keys into the policy table
    questions: tuple[str, ...]  # phrasing templates; {item} is a product slot
    answers: tuple[str, ...]  # answer templates over the policy facts and {item}


_INTENTS: dict[Intent, _IntentSpec] = {
    Intent.returns: _IntentSpec(
        ("return_window",),
        (
            "How long do I have to return the {item}?",
            "Can I still send back the {item} I bought?",
            "What is your return policy for a {item}?",
            "I want to return my {item}, is that possible?",
            "Is there a deadline for returning a {item}?",
            "How many days do I get to return items?",
            "Do you accept returns on the {item}?",
            "My {item} is not what I expected, can I return it?",
            "What's the time limit to send a {item} back?",
            "Could you explain how returns work for a {item}?",
            "Until when can I return a purchase?",
            "I changed my mind about the {item}, can I give it back?",
        ),
        (
            "You can return the {item} within {return_window} of delivery for a full refund.",
            "Returns are accepted within {return_window} of delivery. Start one from your orders page.",
            "Our return window is {return_window} from delivery, so the {item} can go back if it is unused.",
        ),
    ),
    Intent.refunds: _IntentSpec(
        ("refund_time",),
        (
            "When will I get my refund for the {item}?",
            "How long does a refund take?",
            "I returned the {item}, where is my money?",
            "How fast are refunds processed?",
            "My refund for the {item} has not arrived yet, why?",
            "How many days until the refund shows up?",
            "What is the refund processing time?",
            "When is the money for a returned {item} paid back?",
            "Is my refund on its way?",
            "How quickly do you refund returned items?",
            "I sent the {item} back last week, when do I see the refund?",
            "How long until my card is credited?",
        ),
        (
            "Refunds are processed within {refund_time} after we receive the {item}.",
            "Once the return arrives, your refund takes {refund_time} to reach your original payment method.",
            "We issue refunds in {refund_time} from the day the returned item is checked in.",
        ),
    ),
    Intent.shipping_time: _IntentSpec(
        ("standard_shipping", "express_shipping"),
        (
            "How long does shipping take for a {item}?",
            "When will my {item} arrive?",
            "What are your delivery times?",
            "How many days does delivery take?",
            "How fast can you ship a {item}?",
            "Is express delivery faster for the {item}?",
            "What is the shipping time?",
            "How soon would a {item} get to me?",
            "Do you offer quick delivery?",
            "How long until an order is delivered?",
            "What delivery speed can I expect for a {item}?",
            "When does standard shipping arrive?",
        ),
        (
            "Standard shipping takes {standard_shipping} and express shipping takes {express_shipping}.",
            "Your {item} ships in {standard_shipping} with standard delivery, or {express_shipping} with express.",
            "Delivery is {standard_shipping} for standard orders; express arrives in {express_shipping}.",
        ),
    ),
    Intent.shipping_fee: _IntentSpec(
        ("free_shipping_over", "standard_fee"),
        (
            "How much does shipping cost for a {item}?",
            "Is shipping free?",
            "What is the delivery fee?",
            "Do I have to pay for shipping on the {item}?",
            "When do I get free shipping?",
            "What are the shipping charges?",
            "How much is standard delivery?",
            "Is there a minimum order for free delivery?",
            "Why was I charged for shipping the {item}?",
            "Can I avoid the shipping fee?",
            "What does it cost to ship an order?",
            "Is delivery of a {item} included in the price?",
        ),
        (
            "Shipping is free on orders over {free_shipping_over}; below that standard shipping costs {standard_fee}.",
            "Standard shipping costs {standard_fee}, and it is free for orders over {free_shipping_over}.",
            "Orders over {free_shipping_over} ship free. Otherwise the {item} ships for {standard_fee}.",
        ),
    ),
    Intent.order_status: _IntentSpec(
        ("tracking_delay",),
        (
            "Where is my order for the {item}?",
            "How do I track my {item}?",
            "Has my order shipped yet?",
            "Can I see the status of my order?",
            "I have no tracking number for the {item}, why?",
            "How can I check where my package is?",
            "When do I get a tracking link?",
            "My {item} order shows no updates, what is happening?",
            "Is there a way to follow my delivery?",
            "What is the status of my purchase?",
            "How do I know when the {item} has been sent?",
            "Where can I find my tracking number?",
        ),
        (
            "You get a tracking link by email within {tracking_delay} of dispatch; the order page shows live status.",
            "Tracking for the {item} appears within {tracking_delay} after it ships, on your orders page.",
            "Order status is on your orders page, and the tracking number is sent within {tracking_delay} of dispatch.",
        ),
    ),
    Intent.warranty: _IntentSpec(
        ("warranty",),
        (
            "What warranty does the {item} have?",
            "Is the {item} under warranty?",
            "How long is the warranty?",
            "My {item} broke, is it covered?",
            "Do your products come with a guarantee?",
            "Can I get a repair under warranty for my {item}?",
            "What does the warranty cover?",
            "How long are items guaranteed for?",
            "The {item} stopped working, what are my options?",
            "Is there a manufacturer warranty?",
            "How do I make a warranty claim for the {item}?",
            "For how long is a {item} covered against defects?",
        ),
        (
            "The {item} comes with a {warranty} warranty against manufacturing defects.",
            "All products are covered by a {warranty} warranty; open a claim from your orders page.",
            "Defects are covered for {warranty} from delivery, so we can repair or replace the {item}.",
        ),
    ),
    Intent.account: _IntentSpec(
        ("reset_link_valid",),
        (
            "I forgot my password, what do I do?",
            "How do I reset my password?",
            "I can't log in to my account.",
            "My password reset link does not work.",
            "How can I change my account password?",
            "I am locked out of my account, help.",
            "Where do I reset my login details?",
            "The reset email link expired, why?",
            "How long is a password reset link valid?",
            "I need to get back into my account.",
            "Can you help me recover my account?",
            "Why can't I sign in anymore?",
        ),
        (
            "Use Forgot password on the sign-in page; the reset link we email you is valid for {reset_link_valid}.",
            "Request a reset from the sign-in page. The link stays valid for {reset_link_valid}.",
            "We email a password reset link that expires after {reset_link_valid}; request a new one if it lapsed.",
        ),
    ),
    Intent.cancellation: _IntentSpec(
        ("cancel_window",),
        (
            "Can I cancel my order for the {item}?",
            "How do I cancel an order?",
            "I ordered the {item} by mistake, can I cancel?",
            "Is it too late to cancel my order?",
            "What is the cancellation policy?",
            "How long do I have to cancel?",
            "Please cancel my {item} order.",
            "Can an order be cancelled after payment?",
            "I want to stop my order of the {item}.",
            "Until when can I cancel a purchase?",
            "Can I undo my order?",
            "How do I call off an order for a {item}?",
        ),
        (
            "You can cancel within {cancel_window} of placing the order from your orders page.",
            "Orders can be cancelled for {cancel_window} after checkout; after that, return the {item} instead.",
            "Cancellation is possible within {cancel_window} of ordering; later orders have already been packed.",
        ),
    ),
    Intent.payment: _IntentSpec(
        ("payment_methods",),
        (
            "Which payment methods do you accept?",
            "Can I pay for the {item} with PayPal?",
            "How can I pay for my order?",
            "Do you take credit cards?",
            "What are the payment options?",
            "Can I use my card to buy the {item}?",
            "Is Apple Pay accepted?",
            "Which cards can I use?",
            "What ways can I pay for a {item}?",
            "Do you accept debit cards?",
            "How do I pay at checkout?",
            "Which payment types work for the {item}?",
        ),
        (
            "We accept {payment_methods}.",
            "At checkout you can pay with {payment_methods}.",
            "You can pay for the {item} with {payment_methods}.",
        ),
    ),
    Intent.exchange: _IntentSpec(
        ("exchange_window",),
        (
            "Can I exchange the {item} for another size?",
            "How do exchanges work?",
            "I want a different color of the {item}.",
            "Can I swap my {item} for another model?",
            "Is it possible to exchange an item?",
            "How long do I have to exchange a {item}?",
            "What is your exchange policy?",
            "Can I trade the {item} for something else?",
            "The {item} does not fit, can I exchange it?",
            "Do you do exchanges instead of refunds?",
            "How do I get a replacement size?",
            "Until when is an exchange possible?",
        ),
        (
            "You can exchange the {item} within {exchange_window} of delivery at no cost.",
            "Exchanges are free within {exchange_window} of delivery; choose the new size or color on your orders page.",
            "We exchange items within {exchange_window} from delivery, so the {item} can be swapped.",
        ),
    ),
}

_ITEMS = (
    "jacket", "laptop bag", "coffee maker", "desk lamp", "running shoes", "backpack", "blender",
    "headphones", "office chair", "water bottle", "phone case", "keyboard", "monitor stand",
    "yoga mat", "winter coat", "tea kettle", "smart watch", "camera strap", "sofa cushion",
    "bike helmet", "rain boots", "cookware set", "travel mug", "wireless mouse", "tablet cover",
)  # fmt: skip
_OPENERS = ("", "Hi, ", "Hello, ", "Hey there. ", "Good morning! ", "Quick question: ")
_CLOSERS = ("", " Thanks!", " Thank you.", " Please help.", " Thanks in advance.")

# Phrasing templates 0..7 go to train, 8..9 to eval, 10..11 to holdout: eval and holdout
# hold wordings the model never saw in training.
_SPLIT_OF_TEMPLATE = {**dict.fromkeys(range(8), "train"), 8: "eval", 9: "eval", 10: "holdout", 11: "holdout"}


def policy_facts(policy_version: str) -> dict[str, str]:
    """The policy table of one version (a copy)."""
    if policy_version not in POLICIES:
        raise ValueError(f"unknown policy version {policy_version!r}; known: {', '.join(POLICIES)}")
    return dict(POLICIES[policy_version])


def template_split(template: int) -> str:
    """The split a phrasing template belongs to."""
    return _SPLIT_OF_TEMPLATE[template]


def generate_corpus(rows: int = 2400, policy_version: str = "v1", seed: int = 0) -> dict[str, list[SFTRow]]:
    """Generate the support corpus, deterministically for (rows, policy_version, seed).

    Args:
        rows: total rows across all splits (at least one per phrasing template).
        policy_version: which policy table the answers state.
        seed: seed of the slot filling.

    Returns:
        Rows by split (``train``, ``eval``, ``holdout``); splits share no phrasing template.
    """
    policy = policy_facts(policy_version)
    templates = [(intent, t) for intent, spec in _INTENTS.items() for t in range(len(spec.questions))]
    if rows < len(templates):
        raise ValueError(f"rows must be at least {len(templates)} (one per phrasing template)")
    rng = random.Random(f"{seed}:{policy_version}")
    per_template = [rows // len(templates) + (i < rows % len(templates)) for i in range(len(templates))]
    out: dict[str, list[SFTRow]] = {split: [] for split in SPLITS}
    for (intent, t), count in zip(templates, per_template, strict=True):
        spec = _INTENTS[intent]
        facts = [policy[key] for key in spec.facts]
        seen: set[tuple[str, str]] = set()
        for _attempt in range(count * 50):
            if len(seen) == count:
                break
            item = rng.choice(_ITEMS)
            question = spec.questions[t].format(item=item)
            prompt = f"{rng.choice(_OPENERS)}{question}{rng.choice(_CLOSERS)}".strip()
            response = rng.choice(spec.answers).format(item=item, **policy)
            if (prompt, response) in seen:
                continue
            seen.add((prompt, response))
            out[template_split(t)].append(
                SFTRow(
                    id=_row_id(policy_version, intent, t, prompt, response),
                    prompt=prompt,
                    response=response,
                    intent=intent,
                    policy_version=policy_version,
                    facts=facts,
                    source=f"corpus/{intent.value}/t{t:02d}",
                )
            )
        else:  # pragma: no cover - guarded by the slot space being far larger than `count`
            raise RuntimeError(
                f"could not fill {count} unique rows for {intent}/t{t} after {count * 50} tries"
            )
    return out


def _row_id(*parts: object) -> str:
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:16]


# Snapshots ---------------------------------------------------------------------------------


def _row_dict(row: SFTRow | Mapping) -> dict:
    return row.model_dump(mode="json") if isinstance(row, SFTRow) else dict(row)


def _split_bytes(rows: Iterable[SFTRow | Mapping]) -> bytes:
    lines = (json.dumps(_row_dict(r), sort_keys=True, ensure_ascii=False) for r in rows)
    # surrogatepass: a lone surrogate from a JSON escape must reach validation, not crash hashing.
    return "".join(line + "\n" for line in lines).encode("utf-8", "surrogatepass")


def _content_sha256(blobs: Mapping[str, bytes]) -> str:
    digest = hashlib.sha256()
    for split in sorted(blobs):
        digest.update(f"{split}\n{len(blobs[split])}\n".encode())
        digest.update(blobs[split])
    return digest.hexdigest()


def snapshot(
    splits: Mapping[str, Sequence[SFTRow | Mapping]],
    datasets_dir: Path,
    parents: Sequence[str] = (),
    feedback_ids: Sequence[str] = (),
) -> DatasetRef:
    """Write a content-addressed snapshot; writing the same content again is a no-op.

    Args:
        splits: rows by split name.
        datasets_dir: folder that holds all snapshots (``<home>/datasets``).
        parents: sha256 of the snapshots this one derives from.
        feedback_ids: feedback event ids whose rows it contains.

    Returns:
        The DatasetRef of ``<datasets_dir>/<sha256>/``.
    """
    blobs = {name: _split_bytes(rows) for name, rows in splits.items()}
    sha = _content_sha256(blobs)
    target = Path(datasets_dir) / sha
    if (target / REF_FILE).exists():
        return DatasetRef.model_validate_json((target / REF_FILE).read_text())
    versions = sorted({_row_dict(r).get("policy_version") for rows in splits.values() for r in rows} - {None})
    ref = DatasetRef(
        uri=target.as_uri(),
        sha256=sha,
        rows=sum(len(rows) for rows in splits.values()),
        splits={name: len(rows) for name, rows in splits.items()},
        created_at=datetime.now(UTC),
        parents=list(parents),
        feedback_ids=sorted(feedback_ids),
        policy_version=",".join(versions) or None,
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write into a temp folder, then rename: a crash never leaves a half snapshot under its sha.
    tmp = Path(tempfile.mkdtemp(prefix=f".{sha[:12]}-", dir=target.parent))
    try:
        for name, blob in blobs.items():
            (tmp / f"{name}.jsonl").write_bytes(blob)
        (tmp / REF_FILE).write_text(ref.model_dump_json(indent=2))
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / REF_FILE).exists():
            raise
        return DatasetRef.model_validate_json((target / REF_FILE).read_text())
    log.info("snapshot %s: %d rows %s", sha[:12], ref.rows, ref.splits)
    return ref


def dataset_path(ref: DatasetRef) -> Path:
    """Local folder of a snapshot."""
    uri = ref.uri
    return Path(uri.removeprefix("file://")) if uri.startswith("file://") else Path(uri)


def read_split(path: Path | DatasetRef, split: str) -> list[dict]:
    """Rows of one split of a snapshot folder (empty if the split is absent)."""
    folder = dataset_path(path) if isinstance(path, DatasetRef) else Path(path)
    file = folder / f"{split}.jsonl"
    if not file.exists():
        return []
    with file.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


class DatasetNotFound(LookupError):
    """No dataset matches what the user named."""


def open_dataset(path_or_sha: str, datasets_dir: Path) -> tuple[DatasetRef, dict[str, list[dict]]]:
    """Open a dataset by sha256 (or unique prefix), snapshot folder or single JSONL file.

    The sha256 is recomputed from the files, so an edited copy is judged on what it holds.
    A single JSONL file counts as a ``train`` split.

    Returns:
        The dataset's ref and its raw rows by split.

    Raises:
        DatasetNotFound: nothing matches, or a sha prefix is ambiguous.
        ValueError: a file is not valid JSONL.
    """
    candidate = Path(path_or_sha).expanduser()
    if candidate.is_file():
        files = {"train": candidate}
    else:
        if not candidate.is_dir():
            matches = sorted(p for p in Path(datasets_dir).glob(f"{path_or_sha}*") if p.is_dir())
            if len(matches) != 1:
                what = "no dataset" if not matches else f"{len(matches)} datasets"
                raise DatasetNotFound(f"{what} matches {path_or_sha!r} (looked in {datasets_dir})")
            candidate = matches[0]
        files = {
            split: candidate / f"{split}.jsonl" for split in SPLITS if (candidate / f"{split}.jsonl").exists()
        }
        if not files:
            raise DatasetNotFound(f"{candidate} holds no train/eval/holdout .jsonl files")
    rows: dict[str, list[dict]] = {}
    blobs: dict[str, bytes] = {}
    for split, file in files.items():
        blobs[split] = file.read_bytes()
        rows[split] = []
        for n, line in enumerate(blobs[split].decode("utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{file}:{n}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{file}:{n}: each line must be a JSON object")
            rows[split].append(row)
    sha = _content_sha256({s: _split_bytes(r) for s, r in rows.items()})
    stored = candidate / REF_FILE if candidate.is_dir() else None
    if stored and stored.exists():
        ref = DatasetRef.model_validate_json(stored.read_text())
        if ref.sha256 == sha:
            return ref, rows
    ref = DatasetRef(
        uri=candidate.resolve().as_uri(),
        sha256=sha,
        rows=sum(map(len, rows.values())),
        splits={s: len(r) for s, r in rows.items()},
        created_at=datetime.fromtimestamp(max(f.stat().st_mtime for f in files.values()), UTC),
    )
    return ref, rows


def corpus_texts(seed: int = 0) -> list[str]:
    """Every prompt and response of every policy version: the tokenizer's training text."""
    texts: list[str] = []
    for version in POLICY_VERSIONS:
        for rows in generate_corpus(len(_INTENTS) * 12 * 4, version, seed).values():
            texts.extend(t for r in rows for t in (r.prompt, r.response))
    return texts
