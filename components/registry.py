"""The model registry: register trained models with lineage and a model card, gate promotion, roll back.

MLflow's registry on ``settings.tracking_uri`` under ``settings.model_name``. Three aliases:
``challenger`` (the latest registered candidate), ``champion`` (what serving loads) and
``previous`` (the champion before it, the target of a rollback). Every write checks before it
sets, so re-running a step changes nothing.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from components.schemas import (
    DatasetRef,
    EvalReport,
    MetricThreshold,
    ModelScores,
    PromotionDecision,
    PromotionGate,
    TrainResult,
    ValidationReport,
)

if TYPE_CHECKING:  # heavy imports stay inside functions
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

    from components.settings import Settings

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous"
CURRENT_CHAMPION = "@champion"  # register()'s default parent: whatever is champion at call time
MODEL_CARD_ARTIFACT = "model_card.md"
_DESCRIPTION_LIMIT = 5000  # MLflow's model version description column
_TAG_VALUE_LIMIT = 5000  # MLflow's model version tag value column (enforced by PostgreSQL)

# Version tags (lineage, evaluation, promotion).
TAG_RUN_ID = "flywheel.run_id"
TAG_MODEL_URI = "flywheel.model_uri"
TAG_DATASET_SHA = "flywheel.dataset.sha256"
TAG_DATASET_URI = "flywheel.dataset.uri"
TAG_PARAMS_HASH = "flywheel.params_hash"
TAG_PARENT = "flywheel.parent_champion"
TAG_GIT = "flywheel.git_commit"
TAG_STEPS = "flywheel.steps"
TAG_VALIDATION = "flywheel.validation"
TAG_CARD = "flywheel.model_card"
TAG_EVAL = "flywheel.eval.report"
TAG_EVAL_RUN = "flywheel.eval.run_id"
TAG_PROMOTED = "flywheel.promotion.promoted"
TAG_DECISION = "flywheel.promotion.decision"
TAG_REPLACED = "flywheel.promotion.replaced"  # the champion this version replaced when promoted
TAG_ROLLED_BACK = "flywheel.rolled_back_from"  # on a version rolled back: the version restored
_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w.-]+))?/?$")
_LOGGED_MODEL_ID = re.compile(r"^m-[0-9a-f]{32}$")
_KEY_METRICS = ("fact_accuracy", "behavioural_pass_rate", "eval_loss", "replay_fact_accuracy")


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


class ModelNotFound(LookupError):
    """No registered version matches what was named."""


class EvaluationNotFound(LookupError):
    """A version has no recorded evaluation, so the gate has nothing to judge."""


class NoPreviousChampion(LookupError):
    """Rollback was asked for but no version holds the ``previous`` alias."""


class PromotionRejected(Exception):
    """The gate rejected a version; carries the decision."""

    def __init__(self, decision: PromotionDecision) -> None:
        failed = [r for r in decision.reasons if r.startswith("FAIL")]
        super().__init__(f"version {decision.version} not promoted: {'; '.join(failed) or 'gate failed'}")
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
    is (no second version, no alias moved).

    Args:
        result: what training produced (run id, model URI, dataset and params lineage).
        settings: tracking URI and model name.
        parent_champion: the champion this model was trained to replace; default: the current one.
        eval_report: its evaluation, if done already (recorded with the version, shown on the card).
        validation: the dataset's validation report, if known (shown on the card).

    Returns:
        The version number.
    """
    client = _client(settings)
    name = settings.model_name
    _ensure_registered_model(client, name)
    existing = _find_registered(client, name, result)
    if existing is not None:
        version = str(existing.version)
        log.info("%s: run %s is already version %s", name, result.run_id, version)
        _finish_registration(client, name, existing, validation)
        if eval_report is not None:
            record_evaluation(version, eval_report, settings)
        return version

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
    if commit := _git_commit():
        tags[TAG_GIT] = commit
    if validation is not None:
        tags[TAG_VALIDATION] = _validation_text(validation)
    mv = client.create_model_version(
        name, source=source, run_id=result.run_id, tags=tags, model_id=model_id, await_creation_for=60
    )
    version = str(mv.version)
    log.info("%s: registered version %s from run %s (%s)", name, version, result.run_id, result.model_uri)
    if model_id:
        _link_logged_model(client, model_id, name, version)
    _finish_registration(client, name, mv, validation)
    if eval_report is not None:
        record_evaluation(version, eval_report, settings)  # also refreshes the model card
    return version


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


def record_evaluation(version: str, report: EvalReport, settings: Settings) -> None:
    """Store an evaluation with a version (tag), so :func:`promote` can judge it; refresh the model card.

    Args:
        version: registered version the report scored as its candidate.
        report: the evaluation.
        settings: tracking URI and model name.

    Raises:
        ModelNotFound: no such version.
        ValueError: the report scored a different model.
    """
    client = _client(settings)
    name = settings.model_name
    mv = _get_version(client, name, version)
    if not _report_is_for(report, mv, name):
        raise ValueError(
            f"the report scored {report.candidate.model!r} (version {report.candidate.version}), "
            f"not {name} version {version}"
        )
    payload = report.model_dump_json()
    if len(payload) > _TAG_VALUE_LIMIT:
        # The gate needs the scores, not the sample failures: those stay in the eval run's report.
        payload = report.model_copy(update={"failures": {}}).model_dump_json()
    if len(payload) > _TAG_VALUE_LIMIT:
        raise ValueError(f"evaluation report of {len(payload)} characters does not fit a version tag")
    if mv.tags.get(TAG_EVAL) == payload:
        return
    client.set_model_version_tag(name, version, TAG_EVAL, payload)
    if report.run_id:
        client.set_model_version_tag(name, version, TAG_EVAL_RUN, report.run_id)
    _write_model_card(client, name, version, None)
    log.info("%s v%s: evaluation recorded (run %s)", name, version, report.run_id)


def promote(
    version: str, gate: PromotionGate, settings: Settings, report: EvalReport | None = None
) -> PromotionDecision:
    """Judge a version with the gate; on pass move ``champion`` to it (the old champion becomes ``previous``).

    Promoting the current champion again is a no-op. The decision (pass or fail, one reason per
    check) is recorded as version tags either way.

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
        record_evaluation(version, report, settings)
    else:
        report = _stored_report(mv)
        if report is None:
            raise EvaluationNotFound(
                f"{name} version {version} has no recorded evaluation: run evaluate and record it first"
            )
    checks = list(_gate_checks(report, gate, champion))
    promoted = all(ok for _, ok, _ in checks)
    decision = PromotionDecision(
        model_name=name,
        version=version,
        promoted=promoted,
        reasons=[reason for _, _, reason in checks],
        checks={check: ok for check, ok, _ in checks},
        previous_champion=champion,
        decided_at=datetime.now(UTC),
    )
    tags = {TAG_PROMOTED: str(promoted).lower(), TAG_DECISION: decision.model_dump_json()}
    if promoted:
        tags[TAG_REPLACED] = champion or ""
    # The decision first, the aliases last: a crash in between leaves a version that is not
    # champion yet, and re-running promote judges it again and finishes the move.
    _set_version_tags(client, name, version, tags)
    if promoted:
        if champion is not None:
            _set_alias(client, name, PREVIOUS, champion)
        _set_alias(client, name, CHAMPION, version)
        if aliases.get(CHALLENGER) == version:  # the challenger won: it is the champion now
            client.delete_registered_model_alias(name, CHALLENGER)
        if TAG_ROLLED_BACK in mv.tags:  # promoted again after a rollback
            client.delete_model_version_tag(name, version, TAG_ROLLED_BACK)
    log.info(
        "%s v%s %s: %s", name, version, "promoted" if promoted else "rejected", "; ".join(decision.reasons)
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
        client.delete_registered_model_alias(name, PREVIOUS)
    now = datetime.now(UTC)
    if rolled_back is not None:
        client.set_model_version_tag(name, rolled_back, TAG_ROLLED_BACK, restored)
    reasons = [
        f"rollback: '{CHAMPION}' {rolled_back or '(none)'} -> {restored}",
        f"'{PREVIOUS}' -> {earlier}" if earlier else f"'{PREVIOUS}' removed: nothing earlier to return to",
    ]
    log.warning("%s: %s", name, "; ".join(reasons))
    return PromotionDecision(
        model_name=name,
        version=restored,
        promoted=True,
        reasons=reasons,
        checks={"rollback": True},
        previous_champion=rolled_back,
        decided_at=now,
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
    infos = [_info(mv, aliases) for mv in versions]
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
    info = _info(mv, _aliases(client, name))
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


# Gate --------------------------------------------------------------------------------------


def _gate_checks(
    report: EvalReport, gate: PromotionGate, champion: str | None
) -> Iterator[tuple[str, bool, str]]:
    """(check, passed, reason) for every check of the gate, in order; each reason starts PASS or FAIL."""
    cand, champ = report.candidate, report.champion
    floors = [
        (
            "min_fact_accuracy",
            cand.fact_accuracy >= gate.min_fact_accuracy,
            f"fact_accuracy {cand.fact_accuracy:.3f} >= {gate.min_fact_accuracy}",
        ),
        (
            "min_behavioural_pass_rate",
            cand.behavioural_pass_rate >= gate.min_behavioural_pass_rate,
            f"behavioural_pass_rate {cand.behavioural_pass_rate:.3f} >= {gate.min_behavioural_pass_rate}",
        ),
    ]
    if gate.max_eval_loss is not None:
        floors.append(
            (
                "max_eval_loss",
                cand.eval_loss <= gate.max_eval_loss,
                f"eval_loss {cand.eval_loss:.4f} <= {gate.max_eval_loss}",
            )
        )
    yield from ((check, ok, _verdict(ok, text)) for check, ok, text in floors)
    if champion is None:
        yield "champion", True, _verdict(True, "no champion yet: floors only")
        return
    if champ is None or champ.version != champion:
        if champ is None:
            compared = "no champion"
        else:
            compared = f"version {champ.version}" if champ.version else f"{champ.model} (no registry version)"
        text = f"evaluated against {compared}, but the champion is version {champion}: re-evaluate"
        yield "same_champion", False, _verdict(False, text)
        return
    yield "same_champion", True, _verdict(True, f"evaluated against champion version {champion}")
    for metric, threshold in gate.regressions.items():
        yield _regression(metric, threshold, cand, champ)


def _verdict(ok: bool, text: str) -> str:
    return f"{'PASS' if ok else 'FAIL'} {text}"


def _regression(
    metric: str, threshold: MetricThreshold, cand: ModelScores, champ: ModelScores
) -> tuple[str, bool, str]:
    new, old = getattr(cand, metric), getattr(champ, metric)
    check = f"regression.{metric}"
    if new is None or old is None:
        return check, True, _verdict(True, f"{metric}: not measured for both models, not compared")
    change = (new - old) if threshold.higher_is_better else (old - new)  # > 0: better
    ok = change >= -threshold.max_regression
    direction = "higher" if threshold.higher_is_better else "lower"
    text = (
        f"{metric} {new:.4f} vs champion {old:.4f} "
        f"({direction} is better; may regress by at most {threshold.max_regression})"
    )
    return check, ok, _verdict(ok, text)


def _stored_report(mv: ModelVersion) -> EvalReport | None:
    payload = mv.tags.get(TAG_EVAL)
    return EvalReport.model_validate_json(payload) if payload else None


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
    """Write the card to the training run (``model_card.md``) and to the version's description."""
    mv = _get_version(client, name, version)
    run = client.get_run(mv.run_id) if mv.run_id else None
    text = _model_card(name, mv, run, _stored_report(mv), validation)
    if run is not None:
        client.log_text(run.info.run_id, text, MODEL_CARD_ARTIFACT)
        card_uri = f"runs:/{run.info.run_id}/{MODEL_CARD_ARTIFACT}"
        if mv.tags.get(TAG_CARD) != card_uri:
            client.set_model_version_tag(name, version, TAG_CARD, card_uri)
    description = (
        text if len(text) <= _DESCRIPTION_LIMIT else text[: _DESCRIPTION_LIMIT - 80] + "\n\n(truncated)"
    )
    if mv.description != description:
        client.update_model_version(name, version, description=description)


_INTENDED_USE = """\
## Intended use
Answers customer-support questions of the store (returns, refunds, shipping time and fees, order
status, warranty, account access, cancellation, payment, exchanges) with the policy facts of the
data it was trained on. Served behind the flywheel API; users rate answers and send corrections,
which feed the next training round. Not for other domains, other languages than English, or
decisions that need a human (legal, medical, financial advice).
"""

_LIMITATIONS = """\
## Known limitations
- States only the policy facts it was trained on; after a policy change it is wrong until retrained.
- A small model: rephrasings far from the training questions, or several questions in one, can
  get a fluent answer with the wrong facts. Fact accuracy above is measured on unseen phrasings.
- Behavioural checks cover lowercase, punctuation and whitespace variants (invariance) and policy
  updates (directional) only. ALL-CAPS prompts (answered poorly), typos, other languages and
  adversarial prompts are not covered.
- Feedback-derived training data is redacted and capped per user, but poisoning is mitigated by
  the promotion gate, not ruled out.
"""

_CARD_METRICS = (
    "fact_accuracy", "behavioural_pass_rate", "rouge_l", "chrf", "eval_loss", "perplexity",
    "replay_fact_accuracy", "latency_ms_p50",
)  # fmt: skip


def _model_card(
    name: str, mv: ModelVersion, run: Any, report: EvalReport | None, validation: ValidationReport | None
) -> str:
    """The model card (markdown): intended use, data, training, evaluation, limitations."""
    sections = [
        f"# {name} v{mv.version}\n",
        _INTENDED_USE,
        _card_data(mv.tags, validation),
        _card_training(mv, run),
        _card_evaluation(report),
        _LIMITATIONS,
    ]
    return "\n".join(sections)


def _card_data(tags: Mapping[str, str], validation: ValidationReport | None) -> str:
    lines = [
        "## Data",
        f"- dataset sha256: `{tags.get(TAG_DATASET_SHA, 'unknown')}`",
        f"- uri: {tags.get(TAG_DATASET_URI, 'unknown')}",
    ]
    if (ref := _dataset_ref(tags.get(TAG_DATASET_URI))) is not None:
        derived = ", ".join(p[:12] for p in ref.parents) or "nothing (seed data)"
        lines += [
            f"- rows: {ref.rows} ({', '.join(f'{k} {v}' for k, v in ref.splits.items())})",
            f"- policy version: {ref.policy_version or 'unknown'}",
            f"- derived from: {derived}; feedback events used: {len(ref.feedback_ids)}",
        ]
    verdict = _validation_text(validation) if validation else tags.get(TAG_VALIDATION, "not recorded")
    lines.append(f"- validation: {verdict}")
    return "\n".join(lines) + "\n"


def _card_training(mv: ModelVersion, run: Any) -> str:
    tags = mv.tags
    lines = [
        "## Training",
        f"- run: `{mv.run_id}`; steps: {tags.get(TAG_STEPS, '?')}",
        f"- params hash: `{tags.get(TAG_PARAMS_HASH, '?')}`; code: git `{tags.get(TAG_GIT, 'unknown')}`",
        f"- parent champion: {tags.get(TAG_PARENT) or 'none (first model)'}",
    ]
    if run is not None:
        params, metrics = run.data.params, run.data.metrics

        def metric(key: str) -> str:
            return _fmt(metrics.get(f"final_{key}", metrics.get(key)))

        wall = f"{(run.info.end_time - run.info.start_time) / 1000:.0f} s" if run.info.end_time else "?"
        lines += [
            f"- base model: {params.get('base_model', '?')}",
            f"- compute: {run.data.tags.get('flywheel.runner', '?')}, workers {params.get('workers', '?')}, "
            f"GPU {params.get('use_gpu', '?')}; wall time {wall}, train seconds {metric('train_seconds')}",
            f"- hyper-parameters: max_steps {params.get('max_steps', '?')}, "
            f"batch {params.get('batch_size', '?')}, lr {params.get('learning_rate', '?')}, "
            f"LoRA {'on' if params.get('lora.r') else 'off'}",
            f"- eval loss {metric('eval_loss')} (base model {metric('base_eval_loss')})",
        ]
    return "\n".join(lines) + "\n"


def _card_evaluation(report: EvalReport | None) -> str:
    if report is None:
        return "## Evaluation\nNot evaluated yet.\n"
    cand, champ = report.candidate, report.champion
    champion = f"champion v{champ.version}" if champ and champ.version else "champion"
    lines = [
        "## Evaluation",
        f"Eval set `{report.eval_sha256[:12]}`, {cand.n_examples} examples, greedy decoding "
        f"({report.generation.max_new_tokens} new tokens); evaluation run `{report.run_id}`.",
        "",
        f"| metric | this version | {champion} |",
        "|---|---|---|",
    ]
    lines += [f"| {m} | {_fmt(getattr(cand, m))} | {_fmt(_get(champ, m))} |" for m in _CARD_METRICS]
    for check, rate in cand.behavioural.items():
        theirs = champ.behavioural.get(check) if champ is not None else None
        lines.append(f"| behavioural: {check} | {_fmt(rate)} | {_fmt(theirs)} |")
    return "\n".join(lines) + "\n"


def _validation_text(validation: ValidationReport) -> str:
    verdict = "passed" if validation.success else f"FAILED ({', '.join(validation.failed)})"
    return f"{verdict}; Data Docs: {validation.data_docs_uri or 'n/a'}"


def _dataset_ref(uri: str | None) -> DatasetRef | None:
    """The snapshot's ref.json when the dataset is on this machine (cards are best-effort)."""
    if not uri or not uri.startswith("file://"):
        return None
    ref_file = Path(uri.removeprefix("file://")) / "ref.json"
    try:
        return DatasetRef.model_validate_json(ref_file.read_text())
    except (OSError, ValueError):
        return None


def _get(scores: ModelScores | None, metric: str) -> Any:
    return getattr(scores, metric) if scores is not None else None


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


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
    if _aliases(client, name).get(alias) == version:
        return False
    client.set_registered_model_alias(name, alias, version)
    log.info("%s: alias %s -> v%s", name, alias, version)
    return True


def _set_version_tags(client: MlflowClient, name: str, version: str, tags: Mapping[str, str]) -> None:
    current = _get_version(client, name, version).tags
    for key, value in tags.items():
        if current.get(key) != value:
            client.set_model_version_tag(name, version, key, value)


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


def _info(mv: ModelVersion, aliases: Mapping[str, str]) -> ModelVersionInfo:
    tags = mv.tags
    report = _stored_report(mv)
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
