"""The ``flywheel`` command line: one Typer app, a sub-app per lifecycle stage."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import BaseModel, ValidationError
from rich.console import Console

from components.settings import Settings

log = logging.getLogger(__name__)

app = typer.Typer(
    name="flywheel",
    help="flywheel: validated data, distributed fine-tuning, a gated registry, cached serving, feedback.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Generate, snapshot and validate datasets.", no_args_is_help=True)
model_app = typer.Typer(help="Base models.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(model_app, name="model")

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

# Exit codes: 0 ok, 1 data rejected, 2 usage or user error, 3 promotion rejected, 4 internal error.
EXIT_REJECTED = 1
EXIT_USAGE = 2
EXIT_PROMOTION_REJECTED = 3
EXIT_INTERNAL = 4

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of text.")]
F = TypeVar("F", bound=Callable[..., Any])


class Policy(StrEnum):
    v1 = "v1"
    v2 = "v2"


class CliError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or exc.title
        return f"invalid {where}: {first.get('msg')}"
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _handle_errors(fn: F) -> F:
    """Turn exceptions into one clear line on stderr and a non-zero exit code, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except (
            CliError,
            ValidationError,
            ValueError,
            LookupError,
            FileNotFoundError,
            PermissionError,
        ) as exc:
            log.debug("command failed", exc_info=True)
            err.print(f"[red]error:[/red] {_one_line(exc)}", markup=True, highlight=False)
            raise typer.Exit(EXIT_USAGE) from None
        except Exception as exc:  # the last line of defence: still one line, with a way to learn more
            log.debug("command failed", exc_info=True)
            err.print(
                f"[red]error:[/red] {type(exc).__name__}: {_one_line(exc)} (run with --verbose for details)",
                markup=True,
                highlight=False,
            )
            raise typer.Exit(EXIT_INTERNAL) from None

    return wrapper  # type: ignore[return-value]


def _settings(ctx: typer.Context) -> Settings:
    return ctx.obj["settings"]


def _emit(record: BaseModel | dict | list, as_json: bool, text: str | None = None) -> None:
    if as_json:
        payload = record.model_dump(mode="json") if isinstance(record, BaseModel) else record
        typer.echo(json.dumps(payload, indent=2, default=str))
    else:
        out.print(text if text is not None else record)


@app.callback()
def main(
    ctx: typer.Context,
    home: Annotated[
        Path,
        typer.Option(
            "--home",
            envvar="FLYWHEEL_HOME",
            help="Folder under which every embedded store lives.",
            file_okay=False,
            show_default=True,
        ),
    ] = Path(".flywheel"),
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log debug details and tracebacks.")
    ] = False,
) -> None:
    """flywheel: an LLM data flywheel you run yourself."""
    # Library progress bars would interleave with ours; the CLI draws its own.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # Idle OpenMP threads must not spin: training workers and evaluation share the cores.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        settings = Settings(home=home)
    except ValidationError as exc:
        err.print(f"[red]error:[/red] settings: {_one_line(exc)}", markup=True, highlight=False)
        raise typer.Exit(EXIT_USAGE) from None
    ctx.obj = {"settings": settings, "verbose": verbose}


# data ---------------------------------------------------------------------------------------

CURRENT_DATASET = "CURRENT"


def _seed(settings: Settings, policy: str, rows: int = 2400, seed: int | None = None):
    """Generate and snapshot the corpus; it becomes the default dataset of later commands."""
    from components.data import generate_corpus, snapshot

    splits = generate_corpus(rows=rows, policy_version=policy, seed=settings.seed if seed is None else seed)
    ref = snapshot(splits, settings.datasets_dir)
    (settings.datasets_dir / CURRENT_DATASET).write_text(ref.sha256 + "\n")
    return ref


def _current_dataset(settings: Settings, dataset: str | None) -> str:
    if dataset is not None:
        return dataset
    current = settings.datasets_dir / CURRENT_DATASET
    if not current.exists():
        raise CliError(f"no dataset given and none seeded under {settings.home}; run 'flywheel data seed'")
    return current.read_text().strip()


@data_app.command("seed")
@_handle_errors
def data_seed(
    ctx: typer.Context,
    policy: Annotated[Policy, typer.Option(help="Policy table the answers state.")] = Policy.v1,
    rows: Annotated[
        int, typer.Option(min=120, help="Total rows across the train/eval/holdout splits.")
    ] = 2400,
    seed: Annotated[int | None, typer.Option(help="Generator seed (default: FLYWHEEL_SEED).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Generate the support corpus and snapshot it under the home (same content, same sha256)."""
    ref = _seed(_settings(ctx), policy.value, rows, seed)
    _emit(ref, as_json, f"dataset {ref.sha256}\n  rows {ref.rows} {ref.splits}\n  uri  {ref.uri}")


@data_app.command("validate")
@_handle_errors
def data_validate(
    ctx: typer.Context,
    dataset: Annotated[
        str | None,
        typer.Argument(
            help="Snapshot sha256 (or prefix), snapshot folder or JSONL file; default: last seeded."
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Validate an SFT dataset; exit 0 when it passes, 1 when it is rejected."""
    from components.data import open_dataset
    from components.validate import format_report, validate

    settings = _settings(ctx)
    ref, rows = open_dataset(_current_dataset(settings, dataset), settings.datasets_dir)
    report = validate(ref, rows, settings)
    _emit(report, as_json, format_report(report))
    if not report.success:
        raise typer.Exit(EXIT_REJECTED)


# model --------------------------------------------------------------------------------------


@model_app.command("init-base")
@_handle_errors
def model_init_base(
    ctx: typer.Context,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Where to write it (default: <home>/models/base).")
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed of weights and tokenizer (default: FLYWHEEL_SEED).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Build the default base model offline (GPT-2 style + byte-level BPE) as a Hugging Face folder."""
    from transformers.utils import logging as hf_logging

    from components.base_model import init_base

    hf_logging.disable_progress_bar()
    settings = _settings(ctx)
    target = out_dir or settings.base_model_dir
    with err.status("building the base model…"):
        path = init_base(target, seed=settings.seed if seed is None else seed)
    _emit({"path": str(path)}, as_json, f"base model written to {path}")


# train, evaluate, promote -------------------------------------------------------------------


M = TypeVar("M", bound=BaseModel)


def _load_record(model: type[M], path: Path | None, **overrides: Any) -> M:
    """A settings record (TrainParams, PromotionGate) from a YAML/JSON file plus CLI overrides."""
    import yaml

    values: dict[str, Any] = {}
    if path is not None:
        if not path.is_file():
            raise CliError(f"{path} does not exist")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise CliError(f"{path} is not valid YAML/JSON: {exc}") from None
        if not isinstance(values, dict):
            raise CliError(f"{path} must hold a mapping of {model.__name__} fields")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return model.model_validate(values)


def _validated_dataset(settings: Settings, dataset: str | None, as_json: bool):
    """Open and validate a dataset; a rejected one ends the command with exit 1 and its report."""
    from components.data import open_dataset
    from components.validate import format_report, validate

    ref, rows = open_dataset(_current_dataset(settings, dataset), settings.datasets_dir)
    with err.status(f"validating dataset {ref.sha256[:12]}…"):
        report = validate(ref, rows, settings)
    if not report.success:
        _emit(report, as_json, format_report(report))
        err.print("[red]rejected:[/red] the dataset failed validation; nothing was trained", markup=True)
        raise typer.Exit(EXIT_REJECTED)
    return ref, report


def _train_and_register(settings: Settings, ref, params, use_ray: bool, validation):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from components.base_model import ensure_base
    from components.registry import register
    from components.train import train

    if settings.base_model is None:
        with err.status("building the base model…"):
            ensure_base(settings.base_model_dir, settings.seed)
    columns = (
        TextColumn("training"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task("train", total=params.max_steps, loss="-")

        def on_progress(event: dict) -> None:
            loss = event.get("loss")
            bar.update(task, completed=event.get("step", 0), loss=f"{loss:.3f}" if loss is not None else "-")

        result = train(ref, params, settings, progress=on_progress, use_ray=use_ray)
    version = register(result, settings, validation=validation)
    return result, version


@app.command("train")
@_handle_errors
def train_cmd(
    ctx: typer.Context,
    dataset: Annotated[
        str | None, typer.Option(help="Dataset sha256 (or prefix) or folder; default: last seeded.")
    ] = None,
    workers: Annotated[int | None, typer.Option(min=1, help="Ray Train workers (DDP).")] = None,
    max_steps: Annotated[int | None, typer.Option(min=1, help="Optimizer steps.")] = None,
    params_file: Annotated[
        Path | None, typer.Option("--params", help="YAML/JSON file of TrainParams fields.")
    ] = None,
    use_gpu: Annotated[bool | None, typer.Option("--gpu/--cpu", help="Train on GPUs (bf16).")] = None,
    use_ray: Annotated[
        bool, typer.Option("--ray/--no-ray", help="Run on Ray Train, or the same loop in this process.")
    ] = True,
    as_json: JsonOpt = False,
) -> None:
    """Validate a dataset, fine-tune on it, log an MLflow run and register the model as challenger."""
    from components.schemas import TrainParams

    settings = _settings(ctx)
    params = _load_record(TrainParams, params_file, workers=workers, max_steps=max_steps, use_gpu=use_gpu)
    ref, validation = _validated_dataset(settings, dataset, as_json)
    result, version = _train_and_register(settings, ref, params, use_ray, validation)
    payload = {"version": version, **result.model_dump(mode="json")}
    metrics = "  ".join(f"{k} {v:.4g}" for k, v in sorted(result.metrics.items()))
    _emit(
        payload,
        as_json,
        f"run {result.run_id}: {result.steps} steps on dataset {ref.sha256[:12]}\n  {metrics}\n"
        f"registered {settings.model_name} version {version} (alias challenger)",
    )


def _scores_table(report) -> str:
    champ = report.champion
    rows = [f"{'metric':<24} {'candidate':>10} {'champion':>10}"]
    for metric in (
        "fact_accuracy",
        "rouge_l",
        "chrf",
        "behavioural_pass_rate",
        "replay_fact_accuracy",
        "eval_loss",
        "perplexity",
        "latency_ms_p50",
    ):
        cand = getattr(report.candidate, metric)
        if cand is None:
            continue
        other = getattr(champ, metric) if champ is not None else None
        rows.append(f"{metric:<24} {cand:>10.4g} {'-' if other is None else format(other, '>10.4g'):>10}")
    rows.append(f"examples: {report.candidate.n_examples} (same for both models)")
    return "\n".join(rows)


def _evaluate_version(settings: Settings, version: str, dataset: str | None, max_examples: int):
    from components.data import DatasetNotFound, open_dataset
    from components.evaluate import evaluate
    from components.registry import champion_uri, record_evaluation, resolve

    info = resolve(version, settings)
    if dataset is not None:
        ref, _ = open_dataset(dataset, settings.datasets_dir)
    else:  # the version's own dataset when it is here, else the last seeded one
        try:
            ref, _ = open_dataset(info.dataset_sha256 or "-", settings.datasets_dir)
        except DatasetNotFound:
            ref, _ = open_dataset(_current_dataset(settings, None), settings.datasets_dir)
    champion = champion_uri(settings)
    if champion == info.model_uri:
        champion = None  # the champion is scored alone: there is nothing to compare it with
    with err.status(f"evaluating version {info.version}…"):
        report = evaluate(info.model_uri, champion, ref, None, settings, max_examples=max_examples)
    record_evaluation(info.version, report, settings)
    return info, report


@app.command("evaluate")
@_handle_errors
def evaluate_cmd(
    ctx: typer.Context,
    version: Annotated[str, typer.Option(help="Registered version or alias to score.")] = "challenger",
    dataset: Annotated[
        str | None, typer.Option(help="Dataset to score on; default: the one the version trained on.")
    ] = None,
    max_examples: Annotated[int, typer.Option(min=1, help="Eval + holdout rows scored.")] = 200,
    as_json: JsonOpt = False,
) -> None:
    """Score a version and the champion on the same examples; record the report with the version."""
    settings = _settings(ctx)
    info, report = _evaluate_version(settings, version, dataset, max_examples)
    _emit(report, as_json, f"{settings.model_name} version {info.version}\n{_scores_table(report)}")


def _decision_text(decision) -> str:
    verdict = "promoted to champion" if decision.promoted else "REJECTED"
    lines = [f"{decision.model_name} version {decision.version}: {verdict}"]
    lines += [f"  {reason}" for reason in decision.reasons]
    return "\n".join(lines)


@app.command("promote")
@_handle_errors
def promote_cmd(
    ctx: typer.Context,
    version: Annotated[str, typer.Option(help="Registered version or alias to promote.")] = "challenger",
    gate_file: Annotated[
        Path | None, typer.Option("--gate", help="YAML/JSON file of PromotionGate thresholds.")
    ] = None,
    max_examples: Annotated[
        int, typer.Option(min=1, help="Rows scored when the version has no evaluation yet.")
    ] = 200,
    as_json: JsonOpt = False,
) -> None:
    """Gate a version against the champion; exit 0 when promoted, 3 when rejected."""
    from components.registry import EvaluationNotFound, promote, resolve
    from components.schemas import PromotionGate

    settings = _settings(ctx)
    gate = _load_record(PromotionGate, gate_file)
    info = resolve(version, settings)
    try:
        decision = promote(info.version, gate, settings)
    except EvaluationNotFound:
        _evaluate_version(settings, info.version, None, max_examples)
        decision = promote(info.version, gate, settings)
    _emit(decision, as_json, _decision_text(decision))
    if not decision.promoted:
        raise typer.Exit(EXIT_PROMOTION_REJECTED)


@app.command("rollback")
@_handle_errors
def rollback_cmd(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Move the champion alias back to the previous champion."""
    from components.registry import rollback

    decision = rollback(_settings(ctx))
    _emit(decision, as_json, _decision_text(decision).replace("promoted to champion", "champion again"))


@app.command("models")
@_handle_errors
def models_cmd(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List registered versions with their aliases, key metrics and lineage."""
    from rich.table import Table

    from components.registry import list_models

    settings = _settings(ctx)
    versions = list_models(settings)
    if as_json:
        _emit([v.model_dump(mode="json") for v in versions], True)
        return
    if not versions:
        out.print(f"no versions of {settings.model_name} registered yet; run 'flywheel train'")
        return
    table = Table(title=f"{settings.model_name} ({settings.tracking_uri})")
    for column in ("version", "aliases", "fact acc.", "behaviour", "eval loss", "dataset", "run", "created"):
        table.add_column(column, no_wrap=True)
    for v in versions:
        m = v.metrics
        table.add_row(
            v.version,
            ", ".join(v.aliases) or "-",
            _fmt_metric(m.get("fact_accuracy")),
            _fmt_metric(m.get("behavioural_pass_rate")),
            _fmt_metric(m.get("eval_loss")),
            (v.dataset_sha256 or "-")[:12],
            (v.run_id or "-")[:12],
            v.created_at.strftime("%Y-%m-%d %H:%M"),
        )
    # A pipe gets 80 columns by default: give the table room so rows stay whole.
    (out if out.is_terminal else Console(width=160)).print(table)


def _fmt_metric(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


@app.command("demo")
@_handle_errors
def demo_cmd(
    ctx: typer.Context,
    policy: Annotated[Policy, typer.Option(help="Policy table of the seeded corpus.")] = Policy.v1,
    workers: Annotated[int, typer.Option(min=1, help="Ray Train workers (DDP).")] = 2,
    max_steps: Annotated[
        int | None, typer.Option(min=1, help="Optimizer steps (default: TrainParams).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """The local loop on embedded defaults: seed, validate, train, register, evaluate, promote."""
    from components.registry import promote
    from components.schemas import PromotionGate, TrainParams

    settings = _settings(ctx)
    ref = _seed(settings, policy.value)
    err.print(f"dataset {ref.sha256[:12]}: {ref.rows} rows {ref.splits}")
    ref, validation = _validated_dataset(settings, ref.sha256, as_json)
    err.print("validation passed")
    params = _load_record(TrainParams, None, workers=workers, max_steps=max_steps)
    result, version = _train_and_register(settings, ref, params, True, validation)
    err.print(f"trained: run {result.run_id}, registered version {version}")
    _, report = _evaluate_version(settings, version, ref.sha256, 200)
    decision = promote(version, PromotionGate(), settings)
    if as_json:
        _emit(
            {
                "dataset": ref.sha256,
                "run_id": result.run_id,
                "version": version,
                "evaluation": report.model_dump(mode="json"),
                "decision": decision.model_dump(mode="json"),
            },
            True,
        )
    else:
        out.print(_scores_table(report))
        out.print(_decision_text(decision))
        out.print(f"MLflow store: {settings.tracking_uri} (flywheel models lists the registry)")
    if not decision.promoted:
        raise typer.Exit(EXIT_PROMOTION_REJECTED)


# local stack --------------------------------------------------------------------------------


class Service(StrEnum):
    redis = "redis"
    mlflow = "mlflow"
    airflow = "airflow"


def _stack_table(statuses: list) -> str:
    lines = [f"{'service':<8} {'state':<8} {'pid':>8}  url"]
    for s in statuses:
        state = "running" if s.running else "stopped"
        lines.append(f"{s.name:<8} {state:<8} {s.pid or '-':>8}  {s.url}")
    return "\n".join(lines)


@app.command("up")
@_handle_errors
def stack_up(
    ctx: typer.Context,
    services: Annotated[
        list[Service] | None,
        typer.Argument(help="Services to start (default: redis, mlflow and airflow)."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Start local Redis, MLflow server and Airflow on 127.0.0.1, under <home>/stack/."""
    from components.localstack import SERVICES, StackError, up

    names = [s.value for s in services] if services else list(SERVICES)
    try:
        with err.status(f"starting {', '.join(names)}…"):
            statuses = up(_settings(ctx), names)
    except StackError as exc:
        raise CliError(str(exc)) from None
    _emit([s.model_dump() for s in statuses], as_json, _stack_table(statuses))


@app.command("down")
@_handle_errors
def stack_down(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Stop the local services that 'flywheel up' started (and nothing else)."""
    from components.localstack import StackError, down

    try:
        stopped = down(_settings(ctx))
    except StackError as exc:
        raise CliError(str(exc)) from None
    _emit({"stopped": stopped}, as_json, f"stopped: {', '.join(stopped) or 'nothing was running'}")


@app.command("status")
@_handle_errors
def stack_status(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Show the local services, their PIDs and URLs."""
    from components.localstack import status

    statuses = status(_settings(ctx))
    _emit([s.model_dump() for s in statuses], as_json, _stack_table(statuses))


if __name__ == "__main__":  # pragma: no cover
    app()
