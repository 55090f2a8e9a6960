"""training_pipeline: snapshot → validate → train → evaluate → promote → deploy.

Runs when the SFT dataset asset is updated (the feedback loop does that; the event's ``extra``
names the snapshot, its replay set, the model to fine-tune further and its training fields), or
by hand with params. Wiring only: each task builds
``Settings`` and calls one ``components.pipeline`` step; records travel as small JSON dicts.

Endings: a dataset that fails validation fails ``validate`` (one ERROR line, no retry, nothing
trained); a candidate the gate refuses makes ``promote`` *skipped* with a ``REJECTED`` line
(``deploy`` skipped too, the decision in ``promote``'s XCom ``decision``): the champion is
untouched either way.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.sdk import Asset, Param, dag, get_current_context, task

from components.schemas import PromotionGate, TrainParams

# The same asset as feedback_loop's outlet (tests/dags check they are equal).
SFT_DATASET = Asset(name="flywheel_sft_dataset", uri="flywheel://datasets/sft", group="flywheel")
_TRAIN = TrainParams()
TRANSIENT = {"retries": 2, "retry_delay": timedelta(seconds=20)}  # train, evaluate, deploy: services may blip


def _settings():
    from components.settings import Settings

    return Settings()


@dag(
    dag_id="training_pipeline",
    schedule=[SFT_DATASET],
    catchup=False,
    max_active_runs=1,
    tags=["flywheel", "training"],
    default_args={"owner": "flywheel", "retries": 0},
    params={
        "dataset": Param(
            None, type=["null", "string"], description="sha256 (prefix), folder or file; None: latest."
        ),
        "replay": Param(
            None, type=["null", "string"], description="Replay set (folder or URI) scored on both models."
        ),
        "max_steps": Param(_TRAIN.max_steps, type="integer", minimum=1),
        "workers": Param(_TRAIN.workers, type="integer", minimum=1),
        "batch_size": Param(_TRAIN.batch_size, type="integer", minimum=1),
        "use_ray": Param(True, type="boolean", description="Ray Train (False: the same loop in the task)."),
        "init_from": Param(
            None,
            type=["null", "string"],
            description="Registry alias or version to fine-tune further (e.g. champion); None: the base model.",
        ),
        "train": Param(
            {},
            type="object",
            description="More TrainParams fields (e.g. learning_rate); they win over the above.",
        ),
        "gate": Param({}, type="object", description="PromotionGate fields; {}: the defaults."),
        "max_examples": Param(200, type="integer", minimum=1, description="eval + holdout rows scored."),
    },
    doc_md=__doc__,
)
def training_pipeline() -> None:
    @task
    def snapshot() -> dict[str, Any]:
        """The dataset this run trains on: the asset event's snapshot, else the param, else the latest."""
        from components import pipeline

        context = get_current_context()
        p = context["params"]
        dataset, replay, init_from, train = p["dataset"], p["replay"], p["init_from"], {}
        for events in (context.get("triggering_asset_events") or {}).values():
            for event in events:  # the newest event wins: it names the newest build
                dataset = event.extra.get("sha256") or dataset
                replay = event.extra.get("replay_uri") or replay
                init_from = event.extra.get("init_from", init_from)
                train = event.extra.get("train") or train
        ref = pipeline.resolve_dataset(_settings(), dataset)
        return {
            "dataset": ref.model_dump(mode="json"),
            "replay": replay,
            "init_from": init_from,
            "train": train,
        }

    @task(retries=0)
    def validate(snap: dict[str, Any]) -> dict[str, Any]:
        """Data validation: a rejected dataset fails here, once, with a one-line reason."""
        import logging

        from airflow.sdk.exceptions import AirflowFailException

        from components import pipeline
        from components.schemas import DatasetRef
        from components.validate import DataValidationError

        try:  # the ref itself: a file or folder outside the home's datasets is found by its URI
            ref = DatasetRef.model_validate(snap["dataset"])
            return pipeline.validate(_settings(), ref).model_dump(mode="json")
        except DataValidationError as exc:
            message = f"REJECTED dataset {snap['dataset']['sha256'][:12]}: {exc}"
            logging.getLogger("flywheel.dags").error(message)
            raise AirflowFailException(message) from None

    @task(**TRANSIENT)
    def train(snap: dict[str, Any], report: dict[str, Any]) -> dict[str, Any]:
        """Fine-tune and register (idempotent: a retry returns the same run and version)."""
        from components import pipeline
        from components.schemas import DatasetRef, ValidationReport

        p = get_current_context()["params"]
        fields = {"max_steps": p["max_steps"], "workers": p["workers"], "batch_size": p["batch_size"]}
        outcome = pipeline.train_and_register(
            _settings(),
            DatasetRef.model_validate(snap["dataset"]),
            TrainParams(**{**fields, **p["train"], **snap.get("train", {})}),
            use_ray=p["use_ray"],
            validation=ValidationReport.model_validate(report),
            init_from=snap.get("init_from"),
        )
        return outcome.model_dump(mode="json")

    @task(**TRANSIENT)
    def evaluate(snap: dict[str, Any], trained: dict[str, Any]) -> dict[str, Any]:
        """Score the candidate and the champion on the same examples (and the replay set)."""
        from components import pipeline
        from components.schemas import DatasetRef

        outcome = pipeline.evaluate_version(
            _settings(),
            trained["version"],
            DatasetRef.model_validate(snap["dataset"]),
            replay=snap["replay"],
            max_examples=get_current_context()["params"]["max_examples"],
        )
        return {
            "version": outcome.version,
            "model_uri": outcome.model_uri,
            "scores": outcome.report.candidate.model_dump(mode="json"),
        }

    @task
    def promote(evaluation: dict[str, Any]) -> dict[str, Any]:
        """The gate: promoted, or skipped with one REJECTED line (champion untouched)."""
        import logging

        from airflow.sdk.exceptions import AirflowSkipException

        from components import pipeline

        context = get_current_context()
        gate = PromotionGate(**context["params"]["gate"])
        decision = pipeline.promote(_settings(), evaluation["version"], gate, replay=None)
        record = decision.model_dump(mode="json")
        if not decision.promoted:
            context["ti"].xcom_push(key="decision", value=record)
            failed = "; ".join(r for r in decision.reasons if r.startswith("FAIL")) or "gate failed"
            message = (
                f"REJECTED version {decision.version}: {failed}; champion stays {decision.previous_champion}"
            )
            logging.getLogger("flywheel.dags").warning(message)
            raise AirflowSkipException(message)
        return record

    @task(**TRANSIENT)
    def deploy(decision: dict[str, Any]) -> dict[str, Any]:
        """Ask serving to load the new champion (a no-op when nothing serves)."""
        from components import pipeline

        return pipeline.deploy(_settings(), decision["version"]).model_dump(mode="json")

    snap = snapshot()
    trained = train(snap, validate(snap))
    deploy(promote(evaluate(snap, trained)))


training_pipeline()
