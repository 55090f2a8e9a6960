"""The ``flywheel`` command line: one Typer app, a sub-app per lifecycle stage."""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
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
keys_app = typer.Typer(help="API keys of the serving endpoint (stored hashed).", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(model_app, name="model")
app.add_typer(keys_app, name="keys")

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

# Exit codes: 0 ok, 1 data rejected, 2 usage or user error, 3 promotion rejected, 4 internal error.
EXIT_REJECTED = 1
EXIT_USAGE = 2
EXIT_PROMOTION_REJECTED = 3
EXIT_INTERNAL = 4

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of text.")]
F = TypeVar("F", bound=Callable[..., Any])
M = TypeVar("M", bound=BaseModel)
EXIT_INTERRUPTED = 130

# What the running command has made so far: told to the user when it is interrupted.
_kept: dict[str, str] = {}
_stage: list[str] = []
_signalled: list[int] = []  # SIGINT / SIGTERM received by this command


def _on_signal(signum: int, frame: Any) -> None:
    """Ctrl-C or SIGTERM: unwind as KeyboardInterrupt so every step cleans up (runs marked KILLED)."""
    _signalled.append(signum)
    raise KeyboardInterrupt


def _exit_code_of_signal() -> int:
    return 128 + (_signalled[0] if _signalled else signal.SIGINT)


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or exc.title
        return f"invalid {where}: {first.get('msg')}"
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _interrupted() -> None:
    what = _stage[-1] if _stage else "the command"
    kept = ", ".join(f"{k} {v}" for k, v in _kept.items()) or "nothing new"
    err.print(
        f"[yellow]interrupted[/yellow] during {what}; kept: {kept}. "
        "Run the same command again: finished steps are reused, training resumes from its last checkpoint.",
        markup=True,
        highlight=False,
    )


def _handle_errors(fn: F) -> F:
    """Turn exceptions into one clear line on stderr and the README's exit code, never a traceback."""
    from components.errors import FlywheelError

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _kept.clear()
        _stage.clear()
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            if _signalled:  # a library turned our interrupt into its own exit
                _interrupted()
                raise typer.Exit(_exit_code_of_signal()) from None
            raise
        except KeyboardInterrupt:
            _interrupted()
            raise typer.Exit(_exit_code_of_signal()) from None
        except SystemExit:
            if not _signalled:
                raise
            _interrupted()
            raise typer.Exit(_exit_code_of_signal()) from None
        except FlywheelError as exc:
            log.debug("command failed", exc_info=True)
            if exc.exit_code == EXIT_INTERRUPTED:
                _interrupted()
            else:
                err.print(f"[red]error:[/red] {_one_line(exc)}", markup=True, highlight=False)
            raise typer.Exit(exc.exit_code) from None
        except ValidationError as exc:  # a params or gate file with a bad field
            log.debug("command failed", exc_info=True)
            err.print(f"[red]error:[/red] {_one_line(exc)}", markup=True, highlight=False)
            raise typer.Exit(EXIT_USAGE) from None
        except Exception as exc:  # the last line of defence: still one line, with a way to learn more
            log.debug("command failed", exc_info=True)
            if _signalled:  # e.g. Ray reports the interrupted job as its own failure
                _interrupted()
                raise typer.Exit(_exit_code_of_signal()) from None
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


def _load_record(model: type[M], path: Path | None, **overrides: Any) -> M:
    """A record (TrainParams, PromotionGate) from a YAML/JSON file plus CLI overrides."""
    import yaml

    from components.errors import InvalidInput

    values: dict[str, Any] = {}
    if path is not None:
        if not path.is_file():
            raise InvalidInput(f"{path}: no such file")
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8-sig")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"{path} is not valid YAML/JSON: {_one_line(exc)}") from None
        if not isinstance(values, dict):
            raise InvalidInput(f"{path} must hold a mapping of {model.__name__} fields")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return model.model_validate(values)


def _rejected(exc: Any, as_json: bool) -> typer.Exit:
    """Print a rejected dataset's report; the command ends with exit 1."""
    from components.validate import format_report

    _emit(exc.report, as_json, format_report(exc.report))
    return typer.Exit(EXIT_REJECTED)


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
    # flywheel runs offline and self-hosted: no usage reports leave the machine.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
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
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)


# data ---------------------------------------------------------------------------------------


@data_app.command("seed")
@_handle_errors
def data_seed(
    ctx: typer.Context,
    policy: Annotated[str, typer.Option(help="Policy version the answers state (v1, v2, …).")] = "v1",
    rows: Annotated[
        int,
        typer.Option(
            min=1,
            help="Total rows across the train/eval/holdout splits (at least one per eval and held-out wording).",
        ),
    ] = 7200,
    seed: Annotated[int | None, typer.Option(help="Generator seed (default: FLYWHEEL_SEED).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Generate the support corpus and snapshot it under the home (same content, same sha256)."""
    from components import pipeline

    ref = pipeline.seed(_settings(ctx), policy, rows, seed)
    _emit(ref, as_json, f"dataset {ref.sha256}\n  rows {ref.rows} {ref.splits}\n  uri  {ref.uri}")


@data_app.command("validate")
@_handle_errors
def data_validate(
    ctx: typer.Context,
    dataset: Annotated[
        str | None,
        typer.Argument(
            help="Snapshot sha256 (or prefix), snapshot folder or JSONL file; default: the latest snapshot."
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Validate an SFT dataset; exit 0 when it passes, 1 when it is rejected."""
    from components import pipeline
    from components.validate import format_report

    report = pipeline.check(_settings(ctx), dataset)
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
    with err.status("building the base model…"):
        path = init_base(out_dir or settings.base_model_dir, seed=settings.seed if seed is None else seed)
    _emit({"path": str(path)}, as_json, f"base model written to {path}")


# train, evaluate, promote -------------------------------------------------------------------


def _training_bar(max_steps: int) -> tuple[Any, Callable[[dict], None]]:
    """A rich progress bar for training and the callback that advances it."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn("training"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    )
    task = bar.add_task("train", total=max_steps, loss="-")

    def on_progress(event: dict) -> None:
        loss = event.get("loss")
        bar.update(task, completed=event.get("step", 0), loss=f"{loss:.3f}" if loss is not None else "-")

    return bar, on_progress


@app.command("train")
@_handle_errors
def train_cmd(
    ctx: typer.Context,
    dataset: Annotated[
        str | None,
        typer.Option(help="Dataset sha256 (or prefix), folder or file; default: the latest snapshot."),
    ] = None,
    workers: Annotated[int | None, typer.Option(min=1, help="Ray Train workers (DDP).")] = None,
    max_steps: Annotated[int | None, typer.Option(min=1, help="Optimizer steps.")] = None,
    params_file: Annotated[
        Path | None, typer.Option("--params", help="YAML/JSON file of TrainParams fields.")
    ] = None,
    params_json: Annotated[
        str | None,
        typer.Option("--params-json", help="TrainParams fields as inline JSON (used by Ray jobs)."),
    ] = None,
    use_gpu: Annotated[bool | None, typer.Option("--gpu/--cpu", help="Train on GPUs (bf16).")] = None,
    use_ray: Annotated[
        bool, typer.Option("--ray/--no-ray", help="Run on Ray Train, or the same loop in this process.")
    ] = True,
    init_from: Annotated[
        str | None,
        typer.Option(
            help="Fine-tune this registered model further (e.g. champion) instead of the base model."
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Validate a dataset, fine-tune on it, log an MLflow run and register the model as challenger."""
    from components import pipeline
    from components.errors import InvalidInput
    from components.schemas import TrainParams
    from components.validate import DataValidationError

    settings = _settings(ctx)
    if params_json is not None and params_file is not None:
        raise InvalidInput("give --params or --params-json, not both")
    try:
        inline = json.loads(params_json) if params_json else {}
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"--params-json is not valid JSON: {exc.msg}") from None
    overrides = {"workers": workers, "max_steps": max_steps, "use_gpu": use_gpu}
    params = _load_record(
        TrainParams, params_file, **{**inline, **{k: v for k, v in overrides.items() if v is not None}}
    )
    _stage.append("validation")
    try:
        report = pipeline.validate(settings, dataset)
    except DataValidationError as exc:
        err.print("[red]rejected:[/red] the dataset failed validation; nothing was trained", markup=True)
        raise _rejected(exc, as_json) from None
    _kept["dataset"] = report.dataset_sha256[:12]
    _stage.append("training")
    bar, on_progress = _training_bar(params.max_steps)
    with bar:
        trained = pipeline.train_and_register(
            settings,
            report.dataset_sha256,
            params,
            use_ray=use_ray,
            validation=report,
            progress=on_progress,
            on_log=lambda line: err.print(line, markup=False, highlight=False),
            init_from=init_from,
        )
    result = trained.result
    payload = {"version": trained.version, **result.model_dump(mode="json")}
    metrics = "  ".join(f"{k} {v:.4g}" for k, v in sorted(result.metrics.items()))
    _emit(
        payload,
        as_json,
        f"{'already trained: ' if result.reused else ''}run {result.run_id}: {result.steps} steps on dataset "
        f"{result.dataset_sha256[:12]}\n  {metrics}\n"
        f"registered {settings.model_name} version {trained.version} (alias challenger)",
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
    from components import pipeline

    settings = _settings(ctx)
    with err.status(f"evaluating {version}…"):
        outcome = pipeline.evaluate_version(settings, version, dataset, max_examples=max_examples)
    _emit(
        outcome.report,
        as_json,
        f"{settings.model_name} version {outcome.version}\n{_scores_table(outcome.report)}",
    )


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
    from components import pipeline
    from components.schemas import PromotionGate

    gate = _load_record(PromotionGate, gate_file)
    with err.status(f"gating {version}…"):
        decision = pipeline.promote(_settings(ctx), version, gate, max_examples=max_examples)
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
    workers: Annotated[int, typer.Option(min=1, help="Ray Train workers (DDP) of each training run.")] = 2,
    max_steps: Annotated[
        int | None,
        typer.Option(
            min=1, help="Optimizer steps of the first training (the retrain uses the retrain policy's)."
        ),
    ] = None,
    users: Annotated[int, typer.Option(min=3, help="Simulated users (one API key each).")] = 6,
    questions: Annotated[int, typer.Option(min=4, help="Questions each user asks.")] = 16,
    poison_share: Annotated[
        float,
        typer.Option(min=0, max=0.5, help="Share of feedback from one hostile key (malicious corrections)."),
    ] = 0.0,
    use_ray: Annotated[
        bool, typer.Option("--ray/--no-ray", help="Train on Ray Train, or the same loop in the task.")
    ] = True,
    gate_file: Annotated[
        Path | None, typer.Option("--gate", help="YAML/JSON file of PromotionGate thresholds.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """The whole loop on embedded defaults: train through Airflow, serve, collect feedback, retrain, reload."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from components.demo import DemoOptions, run
    from components.schemas import PromotionGate

    settings = _settings(ctx)
    gate = _load_record(PromotionGate, gate_file).model_dump(mode="json", exclude_unset=True)
    options = DemoOptions(
        gate=gate,
        workers=workers, max_steps=max_steps, users=users, questions=questions, poison_share=poison_share,
        use_ray=use_ray,
    )  # fmt: skip
    bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err)
    tasks: dict[str, Any] = {}

    def on_stage(name: str, finished: bool) -> None:
        if finished:
            bar.update(tasks[name], description=f"[green]✓[/green] {name}", completed=1)
            bar.stop_task(tasks[name])
            done = _kept.get("finished stages")
            _kept["finished stages"] = f"{done}, {name}" if done else name
        else:
            _stage.append(name)
            tasks[name] = bar.add_task(name, total=1)

    with bar:
        summary = run(settings, options, on_stage)
    if as_json:
        _emit({**summary.model_dump(mode="json"), "cache_hit_rate": summary.cache_hit_rate}, True)
    else:
        _demo_summary(summary)
    if not summary.promoted:
        raise typer.Exit(EXIT_PROMOTION_REJECTED)


def _demo_summary(s) -> None:
    from rich.table import Table

    table = Table(title="flywheel demo: policy change learned from user feedback")
    table.add_column("measured")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_row("champion version", s.version_before, s.version_after)
    b, a = s.accuracy_before, s.accuracy_after
    table.add_row(
        f"fact accuracy, changed intents ({', '.join(s.changed_intents)}; {a.n_changed} held-out)",
        f"{b.changed:.2f}",
        f"{a.changed:.2f}",
    )
    table.add_row("  of those, still the old fact", f"{b.stale:.2f}", f"{a.stale:.2f}")
    table.add_row(
        f"fact accuracy, untouched intents ({a.n_untouched} held-out)",
        f"{b.untouched:.2f}",
        f"{a.untouched:.2f}",
    )
    out.print(table)
    out.print(
        f"held-out paraphrases (wordings never in training or feedback) of the changed intents "
        f"({', '.join(s.changed_intents)}) and of the others, asked through the API before and after"
    )
    out.print(f"facts changed by feedback: {'; '.join(s.facts_changed) or 'none'}")
    out.print(
        f"user traffic: {s.requests} requests, cache hit rate {s.cache_hit_rate:.2f}; "
        f"feedback: {s.feedback_events} events, {s.feedback_used} rows used, {s.feedback_redacted} PII redacted, "
        f"{s.feedback_quarantined} quarantined, {s.feedback_review} held for review"
    )
    stages = ", ".join(f"{name} {sec:.0f}s" for name, sec in s.stages.items())
    out.print(f"time: {stages}; total {s.total_seconds:.0f}s")
    out.print(
        "see it in the UIs: flywheel ui  (Airflow http://127.0.0.1:8080, MLflow http://127.0.0.1:5000); "
        "serve it: flywheel keys create --name me && flywheel serve"
    )


# serving ------------------------------------------------------------------------------------


@app.command("serve")
@_handle_errors
def serve_cmd(
    ctx: typer.Context,
    host: Annotated[
        str | None, typer.Option(help="Interface to bind (default: FLYWHEEL_SERVE_HOST).")
    ] = None,
    port: Annotated[
        int | None, typer.Option(min=1, max=65535, help="HTTP port (default: FLYWHEEL_SERVE_PORT).")
    ] = None,
    alias: Annotated[str, typer.Option(help="Registry alias to serve and watch for moves.")] = "champion",
    max_batch_size: Annotated[int, typer.Option(min=1, help="Most requests per generate call.")] = 8,
    replicas: Annotated[int, typer.Option(min=1, help="Model and ingress replicas.")] = 1,
    dashboard: Annotated[
        bool, typer.Option(help="Start the Ray dashboard (127.0.0.1:8265; metrics, logs).")
    ] = False,
) -> None:
    """Serve the champion with Ray Serve on 127.0.0.1 (OpenAI-compatible API, cache, feedback); Ctrl-C stops it."""
    import subprocess

    settings = _settings(ctx)
    argv = [sys.executable, "-m", "serving", "--alias", alias, "--max-batch-size", str(max_batch_size)]
    argv += ["--replicas", str(replicas)] + (["--dashboard"] if dashboard else [])
    argv += ["--host", host] if host else []
    argv += ["--port", str(port)] if port else []
    # The app runs in its own process (components never import serving): same home, same settings.
    env = {**os.environ, "FLYWHEEL_HOME": str(settings.home)}
    child = subprocess.Popen(argv, env=env)
    try:
        code = child.wait()
    except KeyboardInterrupt:
        child.send_signal(signal.SIGINT)  # it stops Serve, Ray and the embedded Redis itself
        try:
            code = child.wait(timeout=60)
        except subprocess.TimeoutExpired:
            child.kill()
            code = child.wait()
        err.print("stopped serving")
        _signalled.clear()  # Ctrl-C is how serving is meant to end
        raise typer.Exit(0 if code in (0, -signal.SIGINT) else code) from None
    if code != 0:
        raise typer.Exit(code)


# API keys -----------------------------------------------------------------------------------


def _key_store(ctx: typer.Context):
    from components.feedback_store import FeedbackStore

    store = FeedbackStore.from_settings(_settings(ctx))
    store.migrate()
    return store


@keys_app.command("create")
@_handle_errors
def keys_create(
    ctx: typer.Context,
    name: Annotated[str, typer.Option(help="Who the key is for (letters, digits, ._@-).")],
    admin: Annotated[bool, typer.Option(help="Allow /admin/* (reload the model).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Create an API key and print it once: only its hash is stored."""
    info, key = _key_store(ctx).create_key(name, admin=admin)
    _emit(
        {"key": key, **info.model_dump(mode="json")},
        as_json,
        f"{key}\n  id {info.id}, name {info.name}, admin {info.admin}\n"
        "  save it now: it is stored hashed and cannot be shown again",
    )


@keys_app.command("list")
@_handle_errors
def keys_list(
    ctx: typer.Context,
    include_revoked: Annotated[bool, typer.Option("--all", help="Also list revoked keys.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """List API keys (id, name, prefix, scope; never the key itself)."""
    from rich.table import Table

    keys = _key_store(ctx).list_keys(include_revoked=include_revoked)
    if as_json:
        _emit([k.model_dump(mode="json") for k in keys], True)
        return
    table = Table()
    for column in ("id", "name", "prefix", "admin", "created", "revoked"):
        table.add_column(column, no_wrap=True)
    for k in keys:
        revoked = k.revoked_at.strftime("%Y-%m-%d %H:%M") if k.revoked_at else "-"
        table.add_row(
            str(k.id), k.name, k.prefix, str(k.admin), k.created_at.strftime("%Y-%m-%d %H:%M"), revoked
        )
    (out if out.is_terminal else Console(width=160)).print(table)


@keys_app.command("revoke")
@_handle_errors
def keys_revoke(
    ctx: typer.Context,
    key: Annotated[str, typer.Argument(help="Name or id of the key.")],
    as_json: JsonOpt = False,
) -> None:
    """Revoke an API key: requests with it get 401 from then on."""
    info = _key_store(ctx).revoke_key(key)
    _emit(info, as_json, f"revoked key {info.id} ({info.name})")


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
    from components.localstack import SERVICES, up

    names = [s.value for s in services] if services else list(SERVICES)
    with err.status(f"starting {', '.join(names)}…"):
        statuses = up(_settings(ctx), names)
    _emit([s.model_dump() for s in statuses], as_json, _stack_table(statuses))


@app.command("ui")
@_handle_errors
def stack_ui(ctx: typer.Context) -> None:
    """Open the Airflow UI and the MLflow UI on this home's stores (127.0.0.1); Ctrl-C stops them."""
    from components.localstack import foreground

    def ready(statuses: list) -> None:
        out.print(_stack_table(statuses))
        out.print("Ctrl-C stops them.")

    foreground(_settings(ctx), ["mlflow", "airflow"], on_ready=ready)


@app.command("down")
@_handle_errors
def stack_down(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Stop the local services that 'flywheel up' started (and nothing else)."""
    from components.localstack import down

    stopped = down(_settings(ctx))
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
