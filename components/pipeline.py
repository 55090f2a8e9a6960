"""The composite steps of the loop: the one door the CLI, the DAG tasks, the demo and a Ray job go through.

Each step takes settings and small records (a ``DatasetRef``, ``TrainParams``, a version) and
returns a small record; none prints or parses options. Named errors from ``components.errors``
say why a step stopped (a rejected dataset, a missing version, a refused promotion).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from components.errors import NotFound, PromotionRejected
from components.schemas import (
    DatasetRef,
    EvalReport,
    PromotionDecision,
    PromotionGate,
    TrainParams,
    TrainResult,
    ValidationReport,
)

if TYPE_CHECKING:
    from components.feedback import FeedbackBuild, RetrainDecision, RetrainPolicy
    from components.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_ROWS = 7200
DEFAULT_MAX_EXAMPLES = 200

ProgressFn = Callable[[dict], None]


class TrainOutcome(BaseModel):
    """What train-and-register produced: the run and the registered version."""

    model_config = ConfigDict(frozen=True)

    result: TrainResult
    version: str


class EvalOutcome(BaseModel):
    """An evaluation of one registered version against the champion, recorded with the version."""

    model_config = ConfigDict(frozen=True)

    version: str
    model_uri: str
    report: EvalReport


# Data --------------------------------------------------------------------------------------


def seed(
    settings: Settings, policy: str = "v1", rows: int = DEFAULT_ROWS, seed: int | None = None
) -> DatasetRef:
    """Generate the support corpus under a policy version and snapshot it (same content, same sha256).

    Args:
        settings: where snapshots live; its seed is the default.
        policy: policy version the answers state (see ``data.policy_versions()``).
        rows: total rows across the train / eval / holdout splits.
        seed: generator seed; default ``settings.seed``.

    Returns:
        The snapshot's ref.
    """
    from components.data import generate_corpus, load_corpus, snapshot

    splits = generate_corpus(
        rows=rows,
        policy_version=policy,
        seed=settings.seed if seed is None else seed,
        spec=load_corpus(settings.corpus_dir),
    )
    return snapshot(splits, settings.datasets_dir)


def resolve_dataset(settings: Settings, dataset: str | DatasetRef | None = None) -> DatasetRef:
    """The dataset a step works on: a ref as given, a sha256 (or prefix), a folder or a JSONL file.

    Args:
        settings: where snapshots live.
        dataset: what the user named; None: the most recently created snapshot (a lookup, not state).

    Returns:
        The dataset's ref (its sha256 recomputed from the files, so an edited copy is judged on
        what it holds).

    Raises:
        NotFound: nothing matches, or no snapshot exists yet.
    """
    from components.data import latest_snapshot, open_dataset

    if isinstance(dataset, DatasetRef):
        return dataset
    if dataset is None:
        latest = latest_snapshot(settings.datasets_dir)
        if latest is None:
            raise NotFound(
                f"no dataset given and none seeded under {settings.home}; run 'flywheel data seed'"
            )
        return latest
    ref, _ = open_dataset(dataset, settings.datasets_dir)
    return ref


def check(settings: Settings, dataset: str | DatasetRef | None = None) -> ValidationReport:
    """Validate a dataset and return the report whatever it concludes (Data Docs written under the home).

    Args:
        settings: token budgets, Data Docs location.
        dataset: as :func:`resolve_dataset` takes it.

    Returns:
        The validation report (``success`` False when the data is rejected).
    """
    from components.data import open_dataset
    from components.validate import validate as run_suite

    if isinstance(dataset, str):  # a file or folder is read once: the rows judged are the rows hashed
        ref, rows = open_dataset(dataset, settings.datasets_dir)
        return run_suite(ref, rows, settings)
    return run_suite(resolve_dataset(settings, dataset), None, settings)


def validate(settings: Settings, dataset: str | DatasetRef | None = None) -> ValidationReport:
    """Validate a dataset and stop the pipeline when it is rejected.

    Args:
        settings: token budgets, Data Docs location.
        dataset: as :func:`resolve_dataset` takes it.

    Returns:
        The report of a dataset that passed.

    Raises:
        DataValidationError: an expectation failed; the error carries the report.
    """
    from components.validate import DataValidationError

    report = check(settings, dataset)
    if not report.success:
        raise DataValidationError(report)
    return report


# Training ----------------------------------------------------------------------------------


def train_and_register(
    settings: Settings,
    dataset: str | DatasetRef | None,
    params: TrainParams,
    *,
    use_ray: bool = True,
    validation: ValidationReport | None = None,
    progress: ProgressFn | None = None,
    on_log: Callable[[str], None] | None = None,
    init_from: str | None = None,
) -> TrainOutcome:
    """Fine-tune on a dataset and register the model as ``challenger``; a transaction.

    The same (params, data) trained before returns that run and its version: no second run,
    no second version, also when a task is retried. With ``settings.ray_address`` set to a Ray
    Jobs API URL the training runs there as a job; otherwise in this process (Ray Train, or the
    plain loop without ``use_ray``).

    Args:
        settings: stores, base model, Ray address.
        dataset: as :func:`resolve_dataset` takes it (validate it first with :func:`validate`).
        params: hyper-parameters and scaling.
        use_ray: run the loop on Ray Train (False: the same loop in this process).
        validation: the dataset's validation report, shown on the model card.
        progress: called with ``{"step", "loss", "max_steps"}`` as training advances.
        on_log: receives a remote job's log lines.
        init_from: a registry reference (``champion``, ``3``) to fine-tune further instead of
            the base model: continual training keeps what that model knows and learns the new
            data (``params.base_model`` is set to its exported folder). None, or a reference
            that names no version yet: ``params.base_model`` as it is.

    Returns:
        The training result and the registered version.
    """
    from components import jobs
    from components.base_model import ensure_base
    from components.registry import register
    from components.train import train

    ref = resolve_dataset(settings, dataset)
    if init_from is not None and (start := export_model(settings, init_from)) is not None:
        params = params.model_copy(update={"base_model": str(start)})
    if jobs.is_jobs_address(settings.ray_address):
        result = jobs.submit_train(ref, params, settings, use_ray=use_ray, on_log=on_log)
    else:
        if params.base_model is None and settings.base_model is None:
            ensure_base(settings.base_model_dir, settings.seed)
        result = train(ref, params, settings, progress=progress, use_ray=use_ray)
    version = register(result, settings, validation=validation)
    return TrainOutcome(result=result, version=version)


def export_model(settings: Settings, ref: str = "champion") -> Path | None:
    """A registered version as a Hugging Face folder (weights and tokenizer) to train from.

    The folder is ``<home>/models/exports/<name>-v<version>``, written once (atomically) and
    reused: a retried task, and the params hash of its run, see the same path.

    Returns:
        The folder, or None when ``ref`` names no version (no champion yet).
    """
    import shutil
    import tempfile

    from components.predict import load_pretrained
    from components.registry import ModelNotFound, resolve

    try:
        info = resolve(ref, settings)
    except ModelNotFound:
        log.info("no %s to fine-tune: training from the base model", ref)
        return None
    out = settings.models_dir / "exports" / f"{settings.model_name}-v{info.version}"
    if (out / "config.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_pretrained(info.model_uri, settings)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(out)
    except OSError:
        if not (out / "config.json").exists():
            raise
    finally:  # gone after a rename; a leftover when another process exported it first
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %s (version %s) to %s", ref, info.version, out)
    return out


# Evaluation and promotion ------------------------------------------------------------------


def evaluate_version(
    settings: Settings,
    version: str = "challenger",
    dataset: str | DatasetRef | None = None,
    *,
    replay: str | DatasetRef | None = None,
    max_examples: int = DEFAULT_MAX_EXAMPLES,
) -> EvalOutcome:
    """Score a registered version and the champion on the same examples; record the report with the version.

    Args:
        settings: stores and model name.
        version: version number or alias (``challenger``, ``champion``, ``7``).
        dataset: what to score on; default the dataset the version trained on when it is here,
            else the latest snapshot.
        replay: prompts users marked bad (with corrections), scored for both models.
        max_examples: eval + holdout rows scored.

    Returns:
        The version, its pinned model URI and the report. The champion scored against itself is
        skipped: the champion's own evaluation has no champion column.
    """
    from components.evaluate import evaluate
    from components.registry import champion_uri, record_evaluation, resolve

    info = resolve(version, settings)
    ref = _evaluation_dataset(settings, info.dataset_sha256, dataset)
    replay_ref = resolve_dataset(settings, replay) if replay is not None else None
    champion = champion_uri(settings)
    if champion == info.model_uri:
        champion = None
    report = evaluate(info.model_uri, champion, ref, replay_ref, settings, max_examples=max_examples)
    record_evaluation(info.version, report, settings)
    return EvalOutcome(version=info.version, model_uri=info.model_uri, report=report)


def promote(
    settings: Settings,
    version: str = "challenger",
    gate: PromotionGate | None = None,
    *,
    replay: str | DatasetRef | None = None,
    max_examples: int = DEFAULT_MAX_EXAMPLES,
) -> PromotionDecision:
    """Gate a version against the champion, evaluating it first when it has no recorded evaluation.

    Args:
        settings: stores and model name.
        version: version number or alias.
        gate: thresholds; default ``PromotionGate()``.
        replay: the replay set scored when an evaluation is needed.
        max_examples: eval + holdout rows scored when an evaluation is needed.

    Returns:
        The decision (``promoted`` False when the gate refused; the champion is then untouched).
    """
    from components.registry import EvaluationNotFound, resolve
    from components.registry import promote as gate_and_move

    gate = gate or PromotionGate()
    info = resolve(version, settings)
    try:
        return gate_and_move(info.version, gate, settings)
    except EvaluationNotFound:
        evaluate_version(settings, info.version, replay=replay, max_examples=max_examples)
        return gate_and_move(info.version, gate, settings)


def promote_or_raise(
    settings: Settings, version: str = "challenger", gate: PromotionGate | None = None
) -> PromotionDecision:
    """:func:`promote`, raising ``PromotionRejected`` (with the decision) when the gate refuses."""
    decision = promote(settings, version, gate)
    if not decision.promoted:
        failed = [r for r in decision.reasons if r.startswith("FAIL")]
        raise PromotionRejected(
            f"version {decision.version} not promoted: {'; '.join(failed) or 'gate failed'}", report=decision
        )
    return decision


# Helpers -----------------------------------------------------------------------------------


def _evaluation_dataset(
    settings: Settings, trained_on: str | None, dataset: str | DatasetRef | None
) -> DatasetRef:
    """The dataset given, else the one the version trained on when it is here, else the latest."""
    if dataset is not None:
        return resolve_dataset(settings, dataset)
    if trained_on:
        try:
            return resolve_dataset(settings, trained_on)
        except NotFound:
            log.info("dataset %s of the version is not here: scoring on the latest snapshot", trained_on[:12])
    return resolve_dataset(settings, None)


# Feedback ----------------------------------------------------------------------------------
# The feedback loop's steps (dags/feedback_loop.py) and the deploy step of training_pipeline.

FEEDBACK_WATERMARK = "feedback_loop"  # last feedback row id merged into a dataset
FEEDBACK_FIRED_AT = "feedback_loop.fired_at"  # unix seconds of the last build: the cooldown's clock


class DeployOutcome(BaseModel):
    """What the deploy step did for a promoted version."""

    model_config = ConfigDict(frozen=True)

    version: str
    reloaded: bool
    detail: str


def retrain_due(
    settings: Settings, policy: RetrainPolicy | None = None, *, now: datetime | None = None
) -> RetrainDecision:
    """Read the feedback since the durable watermark and judge it against the retrain policy.

    Args:
        settings: the feedback store and the registry.
        policy: thresholds; default ``RetrainPolicy()``.
        now: the time of the judgement (pass the DAG run's so a re-run judges the same); default now.

    Returns:
        The decision, with the watermark range it read (``watermark_from`` → ``watermark_to``).
    """
    from components.feedback import RetrainPolicy, retrain_decision

    policy = policy or RetrainPolicy()
    now = now or datetime.now(UTC)
    store = _feedback_store(settings)
    try:
        start = store.get_watermark(FEEDBACK_WATERMARK)
        rows = _pending_feedback(store, policy, start, now=now)
        fired = store.get_watermark(FEEDBACK_FIRED_AT)
    finally:
        store.close()
    decision = retrain_decision(
        rows,
        policy,
        now=now,
        watermark_from=start,
        last_fired_at=datetime.fromtimestamp(fired, UTC) if fired else None,
        champion_created_at=_champion_created_at(settings),
    )
    log.info("retrain %s: %s", "due" if decision.fire else "not due", "; ".join(decision.reasons))
    return decision


def build_feedback_dataset(
    settings: Settings,
    policy: RetrainPolicy | None,
    watermark_from: int,
    watermark_to: int,
    parent: str | DatasetRef | None = None,
) -> FeedbackBuild:
    """Merge the feedback rows (watermark_from, watermark_to] into a new snapshot; idempotent.

    Args:
        settings: the feedback store and the datasets folder.
        policy: the builder's thresholds; default ``RetrainPolicy()``.
        watermark_from: the watermark the rows were read after (a :class:`RetrainDecision`'s).
        watermark_to: the last row id to use.
        parent: the snapshot to merge into; default the newest one that holds none of these rows
            (a build that failed before it was published is not a parent).

    Returns:
        The build: merged snapshot (parents and feedback ids listed), replay set, counts, lineage.
    """
    from components.data import load_corpus
    from components.feedback import RetrainPolicy, build

    policy = policy or RetrainPolicy()
    store = _feedback_store(settings)
    try:
        rows = [r for r in _pending_feedback(store, policy, watermark_from) if r.id <= watermark_to]
    finally:
        store.close()
    pending = {r.event_id for r in rows}
    parent_ref = (
        resolve_dataset(settings, parent) if parent is not None else _feedback_parent(settings, pending)
    )
    return build(
        rows,
        parent_ref,
        policy,
        datasets_dir=settings.datasets_dir,
        replay_dir=settings.home / "feedback" / "replay",
        review_dir=settings.home / "feedback" / "review",
        spec=load_corpus(settings.corpus_dir),
        watermark_from=watermark_from,
        watermark_to=watermark_to,
    )


def commit_feedback(settings: Settings, built: FeedbackBuild, fired_at: datetime) -> int:
    """Advance the feedback watermark past a published build (compare-and-set) and start the cooldown.

    A re-run after it succeeded is a no-op; a run whose rows another run already consumed
    raises ``Conflict`` and moves nothing.

    Args:
        settings: the feedback store.
        built: the build that was published.
        fired_at: when the loop fired (the DAG run's time).

    Returns:
        The watermark now stored.
    """
    store = _feedback_store(settings)
    try:
        if store.get_watermark(FEEDBACK_WATERMARK) != built.watermark_to:
            store.set_watermark(FEEDBACK_WATERMARK, built.watermark_to, expected=built.watermark_from)
        store.set_watermark(FEEDBACK_FIRED_AT, int(fired_at.timestamp()), expected=None)
    finally:
        store.close()
    return built.watermark_to


def deploy(settings: Settings, version: str) -> DeployOutcome:
    """Ask serving to load the new champion (``POST {serve_url}/admin/reload``); a no-op when nothing serves.

    Args:
        settings: ``serve_url`` and ``serve_admin_key``.
        version: the version just promoted (for the record; serving reads the alias).

    Returns:
        Whether serving reloaded, and what it answered.
    """
    import httpx

    if not settings.serve_url:
        log.info(
            "version %s is champion; nothing serves (FLYWHEEL_SERVE_URL unset), nothing to reload", version
        )
        return DeployOutcome(version=version, reloaded=False, detail="nothing serves")
    key = settings.serve_admin_key.get_secret_value() if settings.serve_admin_key else None
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    response = httpx.post(f"{settings.serve_url.rstrip('/')}/admin/reload", headers=headers, timeout=120)
    response.raise_for_status()
    body = response.json()
    log.info("serving reloaded: now version %s (asked for %s)", body.get("version"), version)
    return DeployOutcome(version=version, reloaded=True, detail=json.dumps(body, sort_keys=True)[:500])


def _feedback_store(settings: Settings):
    from components.feedback_store import FeedbackStore

    store = FeedbackStore.from_settings(settings)
    store.migrate()
    return store


def _pending_feedback(
    store: Any, policy: RetrainPolicy, watermark: int, *, now: datetime | None = None
) -> list:
    """Feedback rows after the watermark; rows whose prediction may still be buffered wait for the next run."""
    hold = now - timedelta(seconds=policy.hold_unmatched_seconds) if now is not None else None
    return store.feedback_since(watermark, policy.page_size, hold_unmatched_after=hold)


def _feedback_parent(settings: Settings, pending: set[str]) -> DatasetRef:
    """The newest snapshot that holds none of the pending feedback rows."""
    from components.data import REF_FILE

    refs = []
    for file in settings.datasets_dir.glob(f"*/{REF_FILE}"):
        if file.parent.name.startswith("."):
            continue  # a snapshot being written
        try:
            ref = DatasetRef.model_validate_json(file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not pending.intersection(ref.feedback_ids):
            refs.append(ref)
    if not refs:
        return resolve_dataset(settings, None)  # raises NotFound with the hint to seed
    return max(refs, key=lambda ref: (ref.created_at, ref.sha256))


def _champion_created_at(settings: Settings) -> datetime | None:
    from components.registry import resolve

    try:
        return resolve("champion", settings).created_at
    except LookupError:
        return None
