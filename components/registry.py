"""The model registry: the alias state machine over MLflow's registry (register, record, promote, roll back).

MLflow's registry on ``settings.tracking_uri`` under ``settings.model_name``. Three aliases:
``challenger`` (the latest registered candidate), ``champion`` (what serving loads) and
``previous`` (the champion before it, the target of a rollback). Every write checks before it
sets, so re-running a step changes nothing; writes of one home are serialized by a lock file
(``<home>/locks/registry.lock``), and a write that races another process on a shared store is
retried against the state it finds. The gate itself is :func:`components.gate.decide`; the card
text is :mod:`components.model_card`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from components import errors
from components.errors import Conflict, FlywheelError, InvalidInput, NotFound
from components.schemas import (
    DatasetRef,
    EvalReport,
    PromotionDecision,
    PromotionGate,
    TrainResult,
    ValidationReport,
)

if TYPE_CHECKING:  # heavy imports stay inside functions
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion
    from tenacity import Retrying

    from components.model_card import TrainingFacts
    from components.settings import Settings

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous"
CURRENT_CHAMPION = "@champion"  # register()'s default parent: whatever is champion at call time
MODEL_CARD_ARTIFACT = "model_card.md"
LOCK_NAME = "registry"  # <home>/locks/registry.lock: one writer of the registry per home at a time
LOCK_TIMEOUT_S = 300.0  # a registry write takes seconds; longer means the holder is stuck
_DESCRIPTION_LIMIT = 5000  # MLflow's model version description column: a preview of the card
_REPORT_CACHE_SIZE = 256

# Version tags (lineage, evaluation, promotion).
TAG_RUN_ID = "flywheel.run_id"
TAG_MODEL_URI = "flywheel.model_uri"
TAG_DATASET_SHA = "flywheel.dataset.sha256"
TAG_DATASET_URI = "flywheel.dataset.uri"
TAG_PARAMS_HASH = "flywheel.params_hash"
TAG_PARENT = "flywheel.parent_champion"
TAG_GIT = "flywheel.git_commit"  # the code version: FLYWHEEL_CODE_VERSION, else git
TAG_STEPS = "flywheel.steps"
TAG_VALIDATION = "flywheel.validation"
TAG_CARD = "flywheel.model_card"
TAG_EVAL_RUN = "flywheel.eval.run_id"  # the evaluation run whose evaluation/report.json is the report
TAG_EVAL_SHA = "flywheel.eval.sha256"  # sha256 of that file: checked on every read
TAG_PROMOTED = "flywheel.promotion.promoted"
TAG_DECISION = "flywheel.promotion.decision"
TAG_REPLACED = "flywheel.promotion.replaced"  # the champion this version replaced when promoted
TAG_ROLLED_BACK = "flywheel.rolled_back_from"  # on a version rolled back: the version restored
_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w.-]+))?/?$")
_LOGGED_MODEL_ID = re.compile(r"^m-[0-9a-f]{32}$")
_KEY_METRICS = ("fact_accuracy", "behavioural_pass_rate", "eval_loss", "replay_fact_accuracy")
_REPORTS: dict[tuple[str, str], EvalReport] = {}  # (run id, sha256) -> verified report: content-addressed


class ModelVersionInfo(BaseModel):
    """One registered version as ``flywheel models`` shows it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    version: str
    aliases: list[str] = Field(default_factory=list)
    created_at: datetime
    run_id: str | None = None
    source: str = Field(description="What was registered (a logged model's artifact location).")
    model_uri: str = Field(description="models:/NAME/VERSION: what to load.")
    download_uri: str | None = Field(None, description="Where the files are (artifact store URI).")
    dataset_sha256: str | None = None
    parent_champion: str | None = None
    metrics: dict[str, float] = Field(default_factory=dict, description="Key metrics of its evaluation.")
    promoted: bool | None = Field(None, description="The last gate decision; None: never gated.")
    rolled_back: bool = False


class ModelNotFound(NotFound):
    """No registered version matches what was named."""


class EvaluationNotFound(NotFound):
    """A version has no recorded evaluation, so the gate has nothing to judge."""


class NoPreviousChampion(NotFound):
    """Rollback was asked for but no version holds the ``previous`` alias."""


class PromotionRejected(errors.PromotionRejected):
    """The gate rejected a version; carries the decision (also as ``report``)."""

    def __init__(self, decision: PromotionDecision) -> None:
        failed = [r for r in decision.reasons if r.startswith("FAIL")]
        super().__init__(
            f"version {decision.version} not promoted: {'; '.join(failed) or 'gate failed'}", report=decision
        )
        self.decision = decision


# Public API --------------------------------------------------------------------------------


def register(
    result: TrainResult,
    settings: Settings,
    parent_champion: str | None = CURRENT_CHAMPION,
    eval_report: EvalReport | None = None,
    validation: ValidationReport | None = None,
) -> str:
    """Register a trained model as a new version with lineage tags and a model card; alias ``challenger``.

    Idempotent: a version already registered from the same run and model URI is returned as it
    is (no second version, no alias moved), also when two processes register it at once.

    Args:
        result: what training produced (run id, model URI, dataset and params lineage).
        settings: tracking URI, model name, code version.
        parent_champion: the champion this model was trained to replace; default: the current one.
        eval_report: its evaluation, if done already (recorded with the version, shown on the card).
        validation: the dataset's validation report, if known (shown on the card).

    Returns:
        The version number.
    """
    with _exclusive(settings):
        client = _client(settings)
        name = settings.model_name
        _ensure_registered_model(client, name)
        mv = _find_registered(client, name, result)
        if mv is not None:
            log.info("%s: run %s is already version %s", name, result.run_id, mv.version)
        else:
            mv = _create_version(client, settings, result, parent_champion, validation)
        _finish_registration(client, name, mv, validation)
        version = str(mv.version)
        if eval_report is not None:
            _record_evaluation(client, settings, version, eval_report)  # also refreshes the model card
        return version


def record_evaluation(version: str, report: EvalReport, settings: Settings) -> None:
    """Record an evaluation with a version, so :func:`promote` can judge it; refresh the model card.

    The report is kept whole as ``evaluation/report.json`` of its evaluation run (a run of its
    own is made for a report that was not logged); the version's tags name that run and the
    file's sha256, which every read checks.

    Args:
        version: registered version the report scored as its candidate.
        report: the evaluation.
        settings: tracking URI and model name.

    Raises:
        ModelNotFound: no such version.
        InvalidInput: the report scored a different model, or differs from what its run logged.
    """
    with _exclusive(settings):
        _record_evaluation(_client(settings), settings, version, report)


def stored_report(version: str, settings: Settings) -> EvalReport | None:
    """The evaluation recorded with a version, read back from its evaluation run (sha256 checked).

    Args:
        version: registered version.
        settings: tracking URI and model name.

    Returns:
        The report, or None when none was recorded.

    Raises:
        ModelNotFound: no such version.
        EvaluationNotFound: the recorded run no longer holds the report.
        Conflict: the report file changed after it was recorded.
    """
    client = _client(settings)
    return _stored_report(client, _get_version(client, settings.model_name, version))


def promote(
    version: str, gate: PromotionGate, settings: Settings, report: EvalReport | None = None
) -> PromotionDecision:
    """Judge a version with the gate; on pass move ``champion`` to it (the old champion becomes ``previous``).

    Promoting the current champion again is a no-op that says so (also for the loser of two
    promotions of one version at once). The decision (pass or fail, one reason per check) is
    recorded as version tags either way, except that a refused promotion of a former champion
    (typically a retried run whose evaluation names a champion since replaced) leaves the record
    of the promotion that made it champion: ``previous``, and whatever a rollback restores, never
    names a version marked rejected.

    Args:
        version: registered version to promote.
        gate: thresholds (floors and most regression allowed against the champion).
        settings: tracking URI and model name.
        report: its evaluation; default the one recorded with the version (recorded if given).

    Returns:
        The decision; ``promoted`` says whether ``champion`` now points at ``version``.

    Raises:
        ModelNotFound: no such version.
        EvaluationNotFound: no report given and none recorded.
    """
    from components.gate import decide

    with _exclusive(settings):
        client = _client(settings)
        name = settings.model_name
        mv = _get_version(client, name, version)
        aliases = _aliases(client, name)
        champion = aliases.get(CHAMPION)
        if champion == version:
            log.info("%s v%s is already champion: nothing to do", name, version)
            return PromotionDecision(
                model_name=name,
                version=version,
                promoted=True,
                reasons=[f"PASS already champion: version {version} holds '{CHAMPION}'; nothing changed"],
                checks={"already_champion": True},
                previous_champion=aliases.get(PREVIOUS),
                decided_at=datetime.now(UTC),
            )
        if report is not None:
            _record_evaluation(client, settings, version, report)
        else:
            report = _stored_report(client, mv)
            if report is None:
                raise EvaluationNotFound(
                    f"{name} version {version} has no recorded evaluation: run evaluate and record it first"
                )
        decision = decide(
            report, gate, model_name=name, version=version, champion=champion, decided_at=datetime.now(UTC)
        )
        if not decision.promoted and mv.tags.get(TAG_PROMOTED) == "true" and _was_champion(client, mv):
            log.info(
                "%s v%s, a former champion, not promoted again (its promotion record is kept): %s",
                name,
                version,
                "; ".join(r for r in decision.reasons if r.startswith("FAIL")),
            )
            return decision
        tags = {TAG_PROMOTED: str(decision.promoted).lower(), TAG_DECISION: decision.model_dump_json()}
        if decision.promoted:
            tags[TAG_REPLACED] = champion or ""
        # The decision first, the aliases last: a crash in between leaves a version that is not
        # champion yet, and re-running promote judges it again and finishes the move.
        _set_version_tags(client, name, version, tags)
        if decision.promoted:
            if champion is not None:
                _set_alias(client, name, PREVIOUS, champion)
            _set_alias(client, name, CHAMPION, version)
            if aliases.get(CHALLENGER) == version:  # the challenger won: it is the champion now
                _delete_alias(client, name, CHALLENGER)
            if TAG_ROLLED_BACK in mv.tags:  # promoted again after a rollback
                client.delete_model_version_tag(name, version, TAG_ROLLED_BACK)
        log.info(
            "%s v%s %s: %s",
            name,
            version,
            "promoted" if decision.promoted else "rejected",
            "; ".join(decision.reasons),
        )
        return decision


def promote_or_raise(
    version: str, gate: PromotionGate, settings: Settings, report: EvalReport | None = None
) -> PromotionDecision:
    """:func:`promote`, raising :class:`PromotionRejected` when the gate fails (for the CLI and DAG)."""
    decision = promote(version, gate, settings, report)
    if not decision.promoted:
        raise PromotionRejected(decision)
    return decision


def rollback(settings: Settings) -> PromotionDecision:
    """Move ``champion`` back to the ``previous`` version.

    The rolled-back version loses ``champion`` (and is tagged so). ``previous`` then points at
    the champion the restored version had replaced when it was promoted, so a second rollback
    walks one step further back; it is removed when there is none (or when that would be the
    version just rolled back).

    Args:
        settings: tracking URI and model name.

    Returns:
        A decision for the restored version (``previous_champion``: the version rolled back).

    Raises:
        NoPreviousChampion: no version holds ``previous``.
    """
    with _exclusive(settings):
        client = _client(settings)
        name = settings.model_name
        try:
            aliases = _aliases(client, name)
        except ModelNotFound:
            raise NoPreviousChampion(f"no registered model named {name!r}: nothing to roll back") from None
        restored, rolled_back = aliases.get(PREVIOUS), aliases.get(CHAMPION)
        if restored is None:
            raise NoPreviousChampion(f"{name} has no '{PREVIOUS}' version to roll back to")
        earlier = _get_version(client, name, restored).tags.get(TAG_REPLACED) or None
        if earlier in (rolled_back, restored):
            earlier = None
        _set_alias(client, name, CHAMPION, restored)
        if earlier is not None:
            _set_alias(client, name, PREVIOUS, earlier)
        else:
            _delete_alias(client, name, PREVIOUS)
        if rolled_back is not None:
            _set_version_tags(client, name, rolled_back, {TAG_ROLLED_BACK: restored})
        reasons = [
            f"rollback: '{CHAMPION}' {rolled_back or '(none)'} -> {restored}",
            f"'{PREVIOUS}' -> {earlier}"
            if earlier
            else f"'{PREVIOUS}' removed: nothing earlier to return to",
        ]
        log.warning("%s: %s", name, "; ".join(reasons))
        return PromotionDecision(
            model_name=name,
            version=restored,
            promoted=True,
            reasons=reasons,
            checks={"rollback": True},
            previous_champion=rolled_back,
            decided_at=datetime.now(UTC),
        )


def list_models(settings: Settings) -> list[ModelVersionInfo]:
    """Every version of the registered model, newest first, with aliases and key metrics.

    Args:
        settings: tracking URI and model name.

    Returns:
        One record per version (empty when nothing is registered yet).
    """
    client = _client(settings)
    name = settings.model_name
    try:
        aliases = _aliases(client, name)
    except ModelNotFound:
        return []
    versions = list(_search_versions(client, f"name = '{_quote(name)}'"))
    infos = [_info(client, mv, aliases) for mv in versions]
    return sorted(infos, key=lambda i: int(i.version), reverse=True)


def resolve(alias_or_version: str, settings: Settings, name: str | None = None) -> ModelVersionInfo:
    """The version an alias or number names, with the URIs to load it.

    Args:
        alias_or_version: ``champion``, ``@champion``, ``3``, ``v3`` or ``models:/NAME@alias``.
        settings: tracking URI and model name.
        name: registered model name; default ``settings.model_name``.

    Returns:
        The version's record; ``model_uri`` is ``models:/NAME/VERSION`` (pinned, not the alias).

    Raises:
        ModelNotFound: nothing matches.
    """
    client = _client(settings)
    name = name or settings.model_name
    ref = alias_or_version.strip()
    if match := _MODELS_URI.match(ref):
        name, ref = match["name"], match["version"] or match["alias"] or CHAMPION
    ref = ref.removeprefix("@")
    if re.fullmatch(r"v?\d+", ref):
        mv = _get_version(client, name, ref.removeprefix("v"))
    else:
        mv = _get_by_alias(client, name, ref)
    info = _info(client, mv, _aliases(client, name))
    return info.model_copy(
        update={"download_uri": client.get_model_version_download_uri(name, str(mv.version))}
    )


def champion_uri(settings: Settings) -> str | None:
    """``models:/NAME/VERSION`` of the current champion (pinned), or None when there is none."""
    try:
        return resolve(CHAMPION, settings).model_uri
    except ModelNotFound:
        return None


def artifact_location(uri: str, settings: Settings) -> str:
    """Where the files behind a model URI live, resolved with this settings' client.

    ``models:/…`` and ``runs:/…`` are resolved here rather than by MLflow's artifact
    repositories, which look them up through the process-global tracking URI.

    Args:
        uri: ``models:/NAME/VERSION``, ``models:/NAME@ALIAS``, ``models:/m-…``, ``runs:/RUN/PATH``;
            any other URI is returned unchanged.
        settings: tracking URI (also the registry URI).

    Returns:
        An artifact-store URI (``file://…``, ``mlflow-artifacts:/…``, ``s3://…``).
    """
    if not uri.startswith(("models:/", "runs:/")):
        return uri
    client = _client(settings)
    if uri.startswith("runs:/"):
        return _run_model_location(client, uri)
    match = _MODELS_URI.match(uri)
    if match is None:
        raise ValueError(f"unsupported model URI {uri!r}")
    if match["version"] is None and match["alias"] is None and _LOGGED_MODEL_ID.match(match["name"]):
        return client.get_logged_model(match["name"]).artifact_location
    version = match["version"] or str(
        _get_by_alias(client, match["name"], match["alias"] or CHAMPION).version
    )
    return client.get_model_version_download_uri(match["name"], version)


# Registration and evaluation records ------------------------------------------------------


@contextlib.contextmanager
def _exclusive(settings: Settings) -> Iterator[None]:
    """Hold the home's registry lock: one writer at a time, so check-then-set sequences hold."""
    from components.locks import hold

    with hold(settings.home, LOCK_NAME, timeout=LOCK_TIMEOUT_S, what="the model registry"):
        yield


def _create_version(
    client: MlflowClient,
    settings: Settings,
    result: TrainResult,
    parent_champion: str | None,
    validation: ValidationReport | None,
) -> ModelVersion:
    name = settings.model_name
    aliases = _aliases(client, name)
    parent = aliases.get(CHAMPION) if parent_champion == CURRENT_CHAMPION else parent_champion
    source, model_id = _registrable_source(client, result.model_uri)
    tags = {
        TAG_RUN_ID: result.run_id,
        TAG_MODEL_URI: result.model_uri,
        TAG_DATASET_SHA: result.dataset_sha256,
        TAG_DATASET_URI: result.dataset_uri,
        TAG_PARAMS_HASH: result.params_hash,
        TAG_STEPS: str(result.steps),
        TAG_PARENT: parent or "",
    }
    if code := settings.code_version or _git_commit():
        tags[TAG_GIT] = code
    if validation is not None:
        tags[TAG_VALIDATION] = _validation_text(validation)
    mv = client.create_model_version(
        name, source=source, run_id=result.run_id, tags=tags, model_id=model_id, await_creation_for=60
    )
    log.info("%s: registered version %s from run %s (%s)", name, mv.version, result.run_id, result.model_uri)
    if model_id:
        _link_logged_model(client, model_id, name, str(mv.version))
    return mv


def _finish_registration(
    client: MlflowClient, name: str, mv: ModelVersion, validation: ValidationReport | None
) -> None:
    """Model card and ``challenger`` alias of a registered version; completes one a crash interrupted.

    ``challenger`` is set only on a version that was never gated and is newer than the current
    challenger, so re-running an old registration never moves it back.
    """
    version = str(mv.version)
    if TAG_CARD not in mv.tags:
        _write_model_card(client, name, version, validation)
    aliases = _aliases(client, name)
    challenger = aliases.get(CHALLENGER)
    never_gated = TAG_PROMOTED not in mv.tags and aliases.get(CHAMPION) != version
    if never_gated and (challenger is None or int(challenger) < int(version)):
        _set_alias(client, name, CHALLENGER, version)


def _record_evaluation(client: MlflowClient, settings: Settings, version: str, report: EvalReport) -> None:
    """:func:`record_evaluation` under the lock the caller holds."""
    name = settings.model_name
    mv = _get_version(client, name, version)
    if not _report_is_for(report, mv, name):
        raise InvalidInput(
            f"the report scored {report.candidate.model!r} (version {report.candidate.version}), "
            f"not {name} version {version}"
        )
    run_id, sha = _store_report(client, settings, mv, report)
    if mv.tags.get(TAG_EVAL_RUN) == run_id and mv.tags.get(TAG_EVAL_SHA) == sha:
        return
    _set_version_tags(client, name, version, {TAG_EVAL_RUN: run_id, TAG_EVAL_SHA: sha})
    _write_model_card(client, name, version, None)
    log.info("%s v%s: evaluation recorded (run %s, sha256 %s)", name, version, run_id, sha[:12])


def _store_report(
    client: MlflowClient, settings: Settings, mv: ModelVersion, report: EvalReport
) -> tuple[str, str]:
    """(run id, sha256) of the evaluation run file that holds ``report`` whole; logged first if needed."""
    from components.evaluate import REPORT_ARTIFACT

    if report.run_id:
        data = _read_report_bytes(client, report.run_id)
        if data is not None:
            if EvalReport.model_validate_json(data) != report:
                raise InvalidInput(
                    f"the report differs from the {REPORT_ARTIFACT} its evaluation run {report.run_id} logged"
                )
            return report.run_id, _sha256(data)
        log.warning(
            "run %s holds no %s: recording the report in a run of its own", report.run_id, REPORT_ARTIFACT
        )
    with contextlib.suppress(FlywheelError):  # an unreadable earlier record is replaced below
        stored = _stored_report(client, mv)
        if stored is not None and stored.model_copy(update={"run_id": report.run_id}) == report:
            return mv.tags[TAG_EVAL_RUN], mv.tags[TAG_EVAL_SHA]
    return _log_report_run(client, settings, mv, report)


def _log_report_run(
    client: MlflowClient, settings: Settings, mv: ModelVersion, report: EvalReport
) -> tuple[str, str]:
    """Keep a report that no evaluation run logged in a run of its own (the report's ``run_id``)."""
    from components.evaluate import REPORT_ARTIFACT, report_text
    from components.tracking import experiment_id

    tags = {
        "flywheel.step": "evaluate",
        "flywheel.recorded_by": "registry",  # logged at record time, not by evaluate()
        "flywheel.candidate": report.candidate.model,
        "flywheel.candidate_version": str(mv.version),
        "flywheel.eval_sha256": report.eval_sha256,
    }
    run = client.create_run(
        experiment_id(client, settings), run_name=f"evaluation record v{mv.version}", tags=tags
    )
    run_id = run.info.run_id
    text = report_text(report.model_copy(update={"run_id": run_id}))
    client.log_text(run_id, text, REPORT_ARTIFACT)
    client.set_terminated(run_id, "FINISHED")
    return run_id, _sha256(text.encode("utf-8"))


def _stored_report(client: MlflowClient, mv: ModelVersion) -> EvalReport | None:
    """The version's recorded report, read from its evaluation run and checked against the sha256 tag."""
    from components.evaluate import REPORT_ARTIFACT

    run_id, sha = mv.tags.get(TAG_EVAL_RUN), mv.tags.get(TAG_EVAL_SHA)
    if not run_id or not sha:
        return None
    if (cached := _REPORTS.get((run_id, sha))) is not None:
        return cached
    data = _read_report_bytes(client, run_id)
    if data is None:
        raise EvaluationNotFound(
            f"{mv.name} v{mv.version}: evaluation run {run_id} no longer holds {REPORT_ARTIFACT}; evaluate again"
        )
    if _sha256(data) != sha:
        raise Conflict(
            f"{mv.name} v{mv.version}: {REPORT_ARTIFACT} of run {run_id} changed after it was recorded "
            f"(sha256 {_sha256(data)[:12]}, recorded {sha[:12]}); evaluate again"
        )
    report = EvalReport.model_validate_json(data)
    if len(_REPORTS) < _REPORT_CACHE_SIZE:
        _REPORTS[(run_id, sha)] = report
    return report


def _read_report_bytes(client: MlflowClient, run_id: str) -> bytes | None:
    """The bytes of a run's report file, or None when the run or the file is not there."""
    from mlflow.exceptions import MlflowException

    from components.evaluate import REPORT_ARTIFACT

    with tempfile.TemporaryDirectory(prefix="flywheel-report-") as tmp:
        try:
            path = client.download_artifacts(run_id, REPORT_ARTIFACT, tmp)
            return Path(path).read_bytes()
        except (MlflowException, OSError):
            log.debug("no %s in run %s", REPORT_ARTIFACT, run_id, exc_info=True)
            return None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# Reports ---------------------------------------------------------------------------------


def _report_is_for(report: EvalReport, mv: ModelVersion, name: str) -> bool:
    """Whether the report's candidate is this version (by version, or by the URI it was registered from)."""
    cand = report.candidate
    if cand.version is not None:
        match = _MODELS_URI.match(cand.model)
        return cand.version == str(mv.version) and (match is None or match["name"] == name)
    known = {mv.source, f"models:/{name}/{mv.version}", mv.tags.get(TAG_MODEL_URI)}
    if run_id := mv.tags.get(TAG_RUN_ID):
        known.add(f"runs:/{run_id}/model")
    return cand.model in known - {None}


# Model card --------------------------------------------------------------------------------


def _write_model_card(
    client: MlflowClient, name: str, version: str, validation: ValidationReport | None
) -> None:
    """Write the card to the training run (``model_card.md``) and a preview to the version's description."""
    from components.model_card import CardFacts, render

    mv = _get_version(client, name, version)
    run = client.get_run(mv.run_id) if mv.run_id else None
    tags = mv.tags
    try:
        report = _stored_report(client, mv)
    except FlywheelError as exc:  # a card is documentation: it says so rather than failing the step
        log.warning("model card of %s v%s without its evaluation: %s", name, version, exc)
        report = None
    text = render(
        CardFacts(
            name=name,
            version=str(mv.version),
            run_id=mv.run_id,
            dataset_sha256=tags.get(TAG_DATASET_SHA),
            dataset_uri=tags.get(TAG_DATASET_URI),
            dataset=_dataset_ref(tags.get(TAG_DATASET_URI)),
            validation=_validation_text(validation) if validation else tags.get(TAG_VALIDATION),
            steps=tags.get(TAG_STEPS),
            params_hash=tags.get(TAG_PARAMS_HASH),
            code_version=tags.get(TAG_GIT),
            parent_champion=tags.get(TAG_PARENT) or None,
            training=_training_facts(run),
            report=report,
        )
    )
    if run is not None:
        client.log_text(run.info.run_id, text, MODEL_CARD_ARTIFACT)
        card_uri = f"runs:/{run.info.run_id}/{MODEL_CARD_ARTIFACT}"
        if tags.get(TAG_CARD) != card_uri:
            _set_version_tags(client, name, version, {TAG_CARD: card_uri})
    # The description column is bounded: it holds a preview; the whole card is the run's file.
    description = (
        text
        if len(text) <= _DESCRIPTION_LIMIT
        else text[: _DESCRIPTION_LIMIT - 80] + "\n\n(continued in the card)"
    )
    if mv.description != description:
        client.update_model_version(name, version, description=description)


def _training_facts(run: Any) -> TrainingFacts | None:
    from components.model_card import TrainingFacts

    if run is None:
        return None
    info = run.info
    return TrainingFacts(
        params=dict(run.data.params),
        metrics=dict(run.data.metrics),
        runner=run.data.tags.get("flywheel.runner"),
        wall_seconds=(info.end_time - info.start_time) / 1000 if info.end_time else None,
    )


def _validation_text(validation: ValidationReport) -> str:
    verdict = "passed" if validation.success else f"FAILED ({', '.join(validation.failed)})"
    return f"{verdict}; Data Docs: {validation.data_docs_uri or 'n/a'}"


def _dataset_ref(uri: str | None) -> DatasetRef | None:
    """The snapshot's ref.json when the dataset is on this machine (cards are best-effort)."""
    from components.data import REF_FILE
    from components.uris import is_local, to_path

    if not uri or not is_local(uri):
        return None
    try:
        return DatasetRef.model_validate_json((to_path(uri) / REF_FILE).read_text())
    except (OSError, ValueError):
        return None


# MLflow helpers ----------------------------------------------------------------------------


def _client(settings: Settings) -> MlflowClient:
    from components.tracking import client

    return client(settings)


def _is_missing(exc: Exception) -> bool:
    return getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    """Create the registered model unless it exists (check before create; tolerate a concurrent create)."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return
    except MlflowException as exc:
        if not _is_missing(exc):
            raise
    try:
        client.create_registered_model(
            name, description="flywheel support assistant: aliases champion / challenger / previous."
        )
    except MlflowException as exc:
        if getattr(exc, "error_code", None) not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise


def _aliases(client: MlflowClient, name: str) -> dict[str, str]:
    from mlflow.exceptions import MlflowException

    try:
        registered = client.get_registered_model(name)
    except MlflowException as exc:
        if _is_missing(exc):
            raise ModelNotFound(f"no registered model named {name!r}") from None
        raise
    return {alias: str(version) for alias, version in registered.aliases.items()}


def _set_alias(client: MlflowClient, name: str, alias: str, version: str) -> bool:
    """Point ``alias`` at ``version`` unless it already does; True when it moved."""
    for attempt in _race_retrying():
        with attempt:  # each attempt checks again: a writer that won the race may have done it
            if _aliases(client, name).get(alias) == version:
                return False
            client.set_registered_model_alias(name, alias, version)
    log.info("%s: alias %s -> v%s", name, alias, version)
    return True


def _delete_alias(client: MlflowClient, name: str, alias: str) -> None:
    """Remove ``alias`` if it is set."""
    for attempt in _race_retrying():
        with attempt:
            if alias in _aliases(client, name):
                client.delete_registered_model_alias(name, alias)
                log.info("%s: alias %s removed", name, alias)


def _set_version_tags(client: MlflowClient, name: str, version: str, tags: Mapping[str, str]) -> None:
    """Set the tags whose value differs (check before set, again on each retry of a race)."""
    for attempt in _race_retrying():
        with attempt:
            current = _get_version(client, name, version).tags
            for key, value in tags.items():
                if current.get(key) != value:
                    client.set_model_version_tag(name, version, key, value)


def _race_retrying() -> Retrying:
    """Retries of a write that lost a race with another process on a shared store (or a busy SQLite)."""
    from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_random

    return Retrying(
        retry=retry_if_exception(_is_race),
        stop=stop_after_attempt(5),
        wait=wait_random(0.05, 0.5),
        reraise=True,
    )


def _is_race(exc: BaseException) -> bool:
    """A unique-key collision or a locked database: the write can be checked and tried again."""
    code = getattr(exc, "error_code", None)
    text = str(exc)
    return (
        code in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS", "TEMPORARILY_UNAVAILABLE")
        or "IntegrityError" in text
        or "UNIQUE constraint failed" in text
        or "database is locked" in text
    )


def _get_version(client: MlflowClient, name: str, version: str) -> ModelVersion:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, str(version))
    except MlflowException as exc:
        if _is_missing(exc) or getattr(exc, "error_code", None) == "INVALID_PARAMETER_VALUE":
            raise ModelNotFound(f"{name} has no version {version}") from None
        raise


def _get_by_alias(client: MlflowClient, name: str, alias: str) -> ModelVersion:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if _is_missing(exc) or getattr(exc, "error_code", None) == "INVALID_PARAMETER_VALUE":
            raise ModelNotFound(f"{name} has no version with alias '{alias}'") from None
        raise


def _search_versions(client: MlflowClient, filter_string: str) -> Iterator[ModelVersion]:
    token = None
    while True:
        page = client.search_model_versions(filter_string, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def _was_champion(client: MlflowClient, mv: ModelVersion) -> bool:
    """Whether a version held ``champion`` once: a later promotion replaced it, or a rollback moved off it.

    Its own promotion tags do not say: they are written before the alias moves (see :func:`promote`).
    """
    if TAG_ROLLED_BACK in mv.tags:
        return True
    replaced_it = f"name = '{_quote(mv.name)}' and tags.`{TAG_REPLACED}` = '{_quote(str(mv.version))}'"
    return next(iter(_search_versions(client, replaced_it)), None) is not None


def _find_registered(client: MlflowClient, name: str, result: TrainResult) -> ModelVersion | None:
    """The version registered earlier from the same run and model URI, if any."""
    for mv in _search_versions(client, f"name = '{_quote(name)}' and run_id = '{_quote(result.run_id)}'"):
        if mv.tags.get(TAG_MODEL_URI) == result.model_uri:
            return _get_version(client, name, str(mv.version))  # search results may lack aliases
    return None


def _registrable_source(client: MlflowClient, model_uri: str) -> tuple[str, str | None]:
    """(source, logged model id) to register: the model's artifact location, resolved with this client.

    A ``models:/m-…`` source would make the SQL registry store look the logged model up through
    the process-global tracking URI (mlflow/mlflow#17812), so the location is resolved here.
    """
    match = _MODELS_URI.match(model_uri)
    if match and not match["version"] and not match["alias"] and _LOGGED_MODEL_ID.match(match["name"]):
        return client.get_logged_model(match["name"]).artifact_location, match["name"]
    if model_uri.startswith("runs:/"):
        model = _run_logged_model(client, model_uri)
        if model is not None:
            return model.artifact_location, model.model_id
        return _run_model_location(client, model_uri), None
    return model_uri, None


def _run_logged_model(client: MlflowClient, uri: str) -> Any:
    run_id, _, path = uri.removeprefix("runs:/").partition("/")
    run = client.get_run(run_id)
    found = client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{_quote(run_id)}' AND name = '{_quote(path.strip('/'))}'",
    )
    return found[0] if found else None


def _run_model_location(client: MlflowClient, uri: str) -> str:
    model = _run_logged_model(client, uri)
    if model is not None:
        return model.artifact_location
    run_id, _, path = uri.removeprefix("runs:/").partition("/")
    return f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{path.strip('/')}"


def _link_logged_model(client: MlflowClient, model_id: str, name: str, version: str) -> None:
    """Record the version on the logged model, as ``mlflow.register_model`` does (the UI links them)."""
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    try:
        model = client.get_logged_model(model_id)
        versions = json.loads(model.tags.get(MLFLOW_MODEL_VERSIONS) or "[]")
        entry = {"name": name, "version": version}
        if entry not in versions:
            client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps([*versions, entry])})
    except Exception:  # a UI nicety: never fail a registration on it
        log.debug("could not link logged model %s to %s v%s", model_id, name, version, exc_info=True)


def _info(client: MlflowClient, mv: ModelVersion, aliases: Mapping[str, str]) -> ModelVersionInfo:
    tags = mv.tags
    try:
        report = _stored_report(client, mv)
    except FlywheelError as exc:  # a listing shows what it can
        log.warning("%s v%s: evaluation not readable: %s", mv.name, mv.version, exc)
        report = None
    metrics = {}
    if report is not None:
        metrics = {m: v for m in _KEY_METRICS if (v := getattr(report.candidate, m)) is not None}
    promoted = tags.get(TAG_PROMOTED)
    version = str(mv.version)
    return ModelVersionInfo(
        name=mv.name,
        version=version,
        aliases=sorted(a for a, v in aliases.items() if v == version),
        created_at=datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC),
        run_id=mv.run_id,
        source=mv.source,
        model_uri=f"models:/{mv.name}/{version}",
        dataset_sha256=tags.get(TAG_DATASET_SHA),
        parent_champion=tags.get(TAG_PARENT) or None,
        metrics=metrics,
        promoted=None if promoted is None else promoted == "true",
        rolled_back=TAG_ROLLED_BACK in tags,
    )


def _quote(value: str) -> str:
    return value.replace("'", "\\'")


def _git_commit() -> str | None:
    """The commit of the code doing the registering (``-dirty`` when it has local changes), if in git."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}-dirty" if dirty else commit or None
