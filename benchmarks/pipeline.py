"""What Airflow costs the training pipeline: task durations and the gaps between tasks under the scheduler.

Starts the local Airflow (``components.localstack``, ``airflow standalone``) on a fresh home
and a free port, seeds a dataset, triggers ``training_pipeline`` by hand through the REST API
with small params, waits for it, and reads each task's times from the Airflow metadata DB
(``<home>/airflow/airflow.db``, table ``task_instance``). Then it stops the stack.

    python benchmarks/pipeline.py                      # both configs, 30 steps, no Ray
    python benchmarks/pipeline.py --configs tuned --steps 60 --use-ray

A task's *gap* is the time from the end of its last upstream task to its own start: what the
scheduler and executor add. It splits into upstream end → ``scheduled_dttm`` (the scheduler
noticed), → ``queued_dttm`` (handed to the executor), → ``start_date`` (the task process runs).
Goal: gap p50 ≤ 2 s; Airflow's typical gap is 4–6 s.

A task's ``duration`` holds Airflow's start-up too: ``startup_s`` is its start → "Worker startup
parse complete" in the task log (the start call to the Execution API, the DAG file parsed again);
``overhead_s`` = gap + startup is what Airflow adds per task.

Configs (each on its own home, so no run re-uses another's trained version):
  default  the stack's Airflow environment as ``flywheel up`` sets it.
  tuned    plus ``TUNED`` (a shorter scheduler idle sleep) and one GET of ``/execution/health``
           after start: the API server builds its Execution API on the first request to it, ~10 s
           during which it answers nothing, so otherwise the first task's start call times out
           (5 s) and is retried.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(REPO))

DAG_ID = "training_pipeline"
# Scheduler settings that shorten the time between one task's end and the next one's start.
TUNED = {
    # The scheduler loop sleeps this long when a loop found nothing to do (default 1 s).
    "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.2",
}
# name → (extra environment, warm the Execution API before triggering)
CONFIGS: dict[str, tuple[dict[str, str], bool]] = {"default": ({}, False), "tuned": (TUNED, True)}
# Every task runs and the gate cannot refuse a small model: the benchmark times the pipeline, not the model.
LAX_GATE = {"min_fact_accuracy": 0.0, "min_behavioural_pass_rate": 0.0, "max_false_refusal_rate": None}


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="default,tuned", help="comma-separated: default, tuned")
    parser.add_argument(
        "--home",
        type=Path,
        help="parent folder of the homes, kept afterwards (default: a temp folder, removed)",
    )
    parser.add_argument("--rows", type=int, default=600, help="rows of the seeded dataset")
    parser.add_argument("--steps", type=int, default=30, help="max_steps of the training")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-examples", type=int, default=20, help="eval + holdout rows scored")
    parser.add_argument("--use-ray", action="store_true", help="train on Ray Train (default: in the task)")
    parser.add_argument("--timeout", type=float, default=900, help="longest wait for one run, seconds")
    parser.add_argument("--out", type=Path, default=RESULTS / "pipeline.json")
    return parser.parse_args(argv)


def _ts(value: str | None) -> datetime | None:
    if not value:
        return None
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _parsed_at(airflow_home: Path, run_id: str, task_id: str, try_number: int) -> datetime | None:
    """When the task process had parsed the DAG file (its own code starts next), from its JSON-lines log."""
    log = (
        airflow_home / "logs" / f"dag_id={DAG_ID}" / f"run_id={run_id}" / f"task_id={task_id}"
        / f"attempt={try_number}.log"
    )  # fmt: skip
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        if "Worker startup parse complete" in line:
            try:
                return _ts(json.loads(line)["timestamp"].replace("Z", "+00:00"))
            except (ValueError, KeyError):
                return None
    return None


def _secs(later: datetime | None, earlier: datetime | None) -> float | None:
    if later is None or earlier is None:
        return None
    return round((later - earlier).total_seconds(), 3)


def _task_rows(airflow_home: Path, run_id: str) -> dict[str, dict[str, Any]]:
    """task_id → times of the run's task instances, straight from the metadata DB (and the task logs)."""
    db = airflow_home / "airflow.db"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        conn.row_factory = sqlite3.Row
        rows = conn.execute(
            "SELECT task_id, state, try_number, scheduled_dttm, queued_dttm, start_date, end_date, duration "
            "FROM task_instance WHERE dag_id = ? AND run_id = ?",
            (DAG_ID, run_id),
        ).fetchall()
        run = conn.execute(
            "SELECT start_date, end_date, queued_at, run_after FROM dag_run WHERE dag_id = ? AND run_id = ?",
            (DAG_ID, run_id),
        ).fetchone()
    tasks = {
        row["task_id"]: {
            "state": row["state"],
            "try_number": row["try_number"],
            **{k: _ts(row[k]) for k in ("scheduled_dttm", "queued_dttm", "start_date", "end_date")},
            "parsed_at": _parsed_at(airflow_home, run_id, row["task_id"], row["try_number"]),
        }
        for row in rows
    }
    tasks["__run__"] = {k: _ts(run[k]) for k in ("start_date", "end_date", "queued_at", "run_after")}
    return tasks


def _analyse(tasks: dict[str, dict[str, Any]], upstream: dict[str, list[str]]) -> dict[str, Any]:
    """Per-task duration and gap (upstream end → start, split into its stages), in start order."""
    run = tasks.pop("__run__")
    order = sorted(tasks, key=lambda t: tasks[t]["start_date"] or datetime.max.replace(tzinfo=UTC))
    per_task = []
    for task_id in order:
        ti = tasks[task_id]
        ups = [tasks[u]["end_date"] for u in upstream.get(task_id, []) if tasks.get(u, {}).get("end_date")]
        # The first task waits for the run to start, the others for their last upstream.
        ready = max(ups) if ups else run["start_date"]
        gap, startup = _secs(ti["start_date"], ready), _secs(ti["parsed_at"], ti["start_date"])
        per_task.append(
            {
                "task_id": task_id,
                "state": ti["state"],
                "try_number": ti["try_number"],
                "duration_s": _secs(ti["end_date"], ti["start_date"]),
                "gap_s": gap,
                "startup_s": startup,
                "overhead_s": round(gap + startup, 3) if gap is not None and startup is not None else None,
                "ready_to_scheduled_s": _secs(ti["scheduled_dttm"], ready),
                "scheduled_to_queued_s": _secs(ti["queued_dttm"], ti["scheduled_dttm"]),
                "queued_to_start_s": _secs(ti["start_date"], ti["queued_dttm"]),
                "upstream": upstream.get(task_id, []),
            }
        )
    # Gaps between tasks: the first task's wait for the run's start is the run's own overhead.
    gaps = [t["gap_s"] for t in per_task if t["upstream"] and t["gap_s"] is not None]
    durations = [t["duration_s"] for t in per_task if t["duration_s"] is not None]
    startups = [t["startup_s"] for t in per_task if t["startup_s"] is not None]
    overheads = [t["overhead_s"] for t in per_task if t["upstream"] and t["overhead_s"] is not None]
    ends = [ti["end_date"] for ti in tasks.values() if ti["end_date"]]
    starts = [ti["start_date"] for ti in tasks.values() if ti["start_date"]]
    return {
        "tasks": per_task,
        "gap_p50_s": round(statistics.median(gaps), 3) if gaps else None,
        "gap_max_s": max(gaps) if gaps else None,
        "gap_sum_s": round(sum(gaps), 3),
        "startup_p50_s": round(statistics.median(startups), 3) if startups else None,
        "startup_max_s": max(startups) if startups else None,
        "overhead_p50_s": round(statistics.median(overheads), 3) if overheads else None,
        # Airflow's share of the run: every gap and every task's start-up.
        "overhead_sum_s": round(sum(gaps) + sum(startups), 3),
        "task_seconds_sum": round(sum(durations), 3),
        "first_task_wait_s": per_task[0]["gap_s"] if per_task else None,
        # Trigger (queued_at) → the run's end: what a user waits for.
        "run_total_s": _secs(run["end_date"], run["queued_at"]),
        "first_start_to_last_end_s": _secs(max(ends), min(starts)) if ends and starts else None,
    }


def _bench_config(name: str, home: Path, base_model: Path, args) -> dict[str, Any]:
    """One Airflow on its own home: seed, start, trigger, wait, read the metadata DB, stop."""
    from components import localstack, pipeline
    from components.settings import Settings
    from tests.conftest import free_port
    from tests.integration.airflow_api import AirflowAPI

    env, warm = CONFIGS[name]
    saved = dict(os.environ)
    # supervisord (and through it Airflow and each task process) inherits this environment.
    for key in [k for k in os.environ if k.startswith(("FLYWHEEL_", "AIRFLOW"))]:
        del os.environ[key]
    os.environ.update(
        {
            "FLYWHEEL_HOME": str(home),
            "FLYWHEEL_AIRFLOW_PORT": str(free_port()),
            "FLYWHEEL_BASE_MODEL": str(base_model),
            "RAY_AUTH_MODE": "disabled",
            "HF_HUB_OFFLINE": "1",
            **env,
        }
    )
    settings = Settings()
    ref = pipeline.seed(settings, rows=args.rows)
    conf = {
        "dataset": ref.sha256,
        "max_steps": args.steps,
        "workers": 1,
        "batch_size": args.batch_size,
        "use_ray": args.use_ray,
        "max_examples": args.max_examples,
        "gate": LAX_GATE,
    }
    api = None
    started = time.monotonic()
    try:
        (status,) = localstack.up(settings, ["airflow"])
        up_s = time.monotonic() - started
        api = AirflowAPI(status.url, settings.airflow_home)
        api.login()
        api.wait_for_dags([DAG_ID], timeout_s=180)
        parsed_s = time.monotonic() - started
        api.unpause(DAG_ID)
        warm_s = None
        if warm:
            clock = time.monotonic()
            httpx.get(f"{status.url}/execution/health", timeout=120).raise_for_status()
            warm_s = round(time.monotonic() - clock, 2)
        tasks = api.get(f"/dags/{DAG_ID}/tasks")["tasks"]
        upstream: dict[str, list[str]] = {t["task_id"]: [] for t in tasks}
        for t in tasks:
            for down in t["downstream_task_ids"]:
                upstream[down].append(t["task_id"])
        print(f"[{name}] Airflow up in {up_s:.0f} s, DAGs parsed at {parsed_s:.0f} s; triggering", flush=True)
        run = api.trigger(DAG_ID, conf)
        finished = api.wait_for_run(DAG_ID, run["dag_run_id"], timeout_s=args.timeout)
        result = _analyse(_task_rows(settings.airflow_home, run["dag_run_id"]), upstream)
    finally:
        if api is not None:
            api.close()
        localstack.down(settings)
        os.environ.clear()
        os.environ.update(saved)
    return {
        "config": name,
        "env": env,
        "execution_api_warmed_s": warm_s,
        "run_state": finished["state"],
        "airflow_up_s": round(up_s, 1),
        "dags_parsed_s": round(parsed_s, 1),
        **result,
    }


def _print(result: dict[str, Any]) -> None:
    print(
        f"\n== {result['config']} ({result['run_state']}) env={result['env'] or '{}'} "
        f"execution API warmed: {result['execution_api_warmed_s']}"
    )
    header = (
        f"{'task':<10} {'state':<8} {'duration':>9} {'gap':>7} {'→sched':>7} {'→queue':>7} {'→start':>7}"
        f" {'startup':>8} {'overhead':>9}"
    )
    print(header)
    print("-" * len(header))

    def f(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    for t in result["tasks"]:
        print(
            f"{t['task_id']:<10} {t['state']:<8} {f(t['duration_s']):>9} {f(t['gap_s']):>7} "
            f"{f(t['ready_to_scheduled_s']):>7} {f(t['scheduled_to_queued_s']):>7} {f(t['queued_to_start_s']):>7}"
            f" {f(t['startup_s']):>8} {f(t['overhead_s']):>9}"
        )
    print(
        f"gap p50 {f(result['gap_p50_s'])} s, max {f(result['gap_max_s'])} s, sum {f(result['gap_sum_s'])} s; "
        f"tasks {f(result['task_seconds_sum'])} s; trigger → end {f(result['run_total_s'])} s "
        f"(first task waited {f(result['first_task_wait_s'])} s)\n"
        f"task start-up p50 {f(result['startup_p50_s'])} s, max {f(result['startup_max_s'])} s; "
        f"gap + start-up p50 {f(result['overhead_p50_s'])} s; Airflow's share {f(result['overhead_sum_s'])} s"
    )


def main(argv: list[str] | None = None) -> int:
    """Benchmark each config and write the results JSON.

    Args:
        argv: command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        0 when every run succeeded.
    """
    args = _parse_args(argv)
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = set(names) - set(CONFIGS)
    if unknown:
        raise SystemExit(f"unknown config(s) {sorted(unknown)}; choose from {sorted(CONFIGS)}")
    from components.base_model import init_base

    parent = args.home or Path(tempfile.mkdtemp(prefix="fwbench-pipeline-"))
    base = parent / "base"
    if not (base / "config.json").is_file():
        init_base(base, seed=0)
    results = []
    try:
        for name in names:
            home = parent / name
            if home.exists():
                raise SystemExit(
                    f"{home} exists: give a fresh --home (a re-run would re-use its trained version)"
                )
            results.append(_bench_config(name, home, base, args))
            _print(results[-1])
    finally:
        if args.home is None:
            shutil.rmtree(parent, ignore_errors=True)
    import psutil

    record = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
        },
        "airflow": _airflow_version(),
        "params": {
            "rows": args.rows,
            "max_steps": args.steps,
            "batch_size": args.batch_size,
            "max_examples": args.max_examples,
            "use_ray": args.use_ray,
            "workers": 1,
        },
        "goal": "gap p50 <= 2 s",
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1, default=str) + "\n")
    print(f"\nwrote {args.out}")
    return 0 if all(r["run_state"] == "success" for r in results) else 1


def _airflow_version() -> str:
    from importlib.metadata import version

    return version("apache-airflow")


if __name__ == "__main__":
    sys.exit(main())
