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
    from components.data import generate_corpus, snapshot

    settings = _settings(ctx)
    splits = generate_corpus(
        rows=rows, policy_version=policy.value, seed=settings.seed if seed is None else seed
    )
    ref = snapshot(splits, settings.datasets_dir)
    (settings.datasets_dir / CURRENT_DATASET).write_text(ref.sha256 + "\n")
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
    if dataset is None:
        current = settings.datasets_dir / CURRENT_DATASET
        if not current.exists():
            raise CliError(
                f"no dataset given and none seeded under {settings.home}; run 'flywheel data seed'"
            )
        dataset = current.read_text().strip()
    ref, rows = open_dataset(dataset, settings.datasets_dir)
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
