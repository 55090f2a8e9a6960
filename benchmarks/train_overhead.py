"""What Ray Train costs the training loop: the same model, data and steps in-process and on 1 Ray worker.

Each run is its own process (so its peak RSS is its own); runs are repeated and interleaved,
and the best of each configuration counts, which discounts other load on a shared machine.

    python benchmarks/train_overhead.py                     # default model + corpus, 300 steps
    python benchmarks/train_overhead.py --steps 60 --repeats 1 --threads auto

Modes:
  loop        ``components.trainloop.fit``: the bare loop, no tracking, no checkpoints.
  loop+mlflow ``train(use_ray=False)``: the loop in-process with MLflow logging and checkpoints.
  ray         ``train()`` on Ray Train with 1 worker: the same logging and checkpoints, plus Ray.

Each mode runs with every ``--threads`` setting (``auto``: all the node's cores for the one
worker; a number: ``TrainParams.cpu_threads``). tokens/s is measured inside the loop (optimizer
steps only): the median step's rate, which other load on the machine disturbs least, decides
the ratio; the run's mean is recorded too. Wall seconds include start-up (Ray, worker spawn),
evaluation and model logging.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("loop", "loop+mlflow", "ray")
KEY = "median_step_tokens_per_second"


class _RssSampler:
    """Peak resident memory of this process and every descendant (Ray's raylet and workers)."""

    def __init__(self, interval: float = 0.1) -> None:
        import psutil

        self._root = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self.peak_total = 0
        self.peak_by_name: dict[str, int] = {}
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(self._interval):
            total = 0
            for proc in [self._root, *self._root.children(recursive=True)]:
                try:
                    rss = proc.memory_info().rss
                    cmd = " ".join(proc.cmdline()[:1]) or proc.name()
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                total += rss
                key = "driver" if proc.pid == self._root.pid else _short_name(cmd)
                self.peak_by_name[key] = max(self.peak_by_name.get(key, 0), rss)
            self.peak_total = max(self.peak_total, total)

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _short_name(cmd: str) -> str:
    # Ray names actor processes "ray::<Actor>"; keep that, else the executable's name.
    return cmd.split(".")[0] if cmd.startswith("ray::") else Path(cmd.split()[0]).name


def _setup(home: Path):
    """Settings, base model and dataset snapshot for the benchmark (built once, reused)."""
    from components.base_model import ensure_base
    from components.data import generate_corpus, snapshot
    from components.settings import Settings

    settings = Settings(home=home, _env_file=None)
    ensure_base(settings.base_model_dir, seed=0)
    ref = snapshot(generate_corpus(rows=2400, policy_version="v1", seed=0), settings.datasets_dir)
    return settings, ref


def child(mode: str, home: Path, steps: int, threads: int | None) -> dict:
    """Run one configuration in this process and return its measurements."""
    from components.schemas import TrainParams
    from components.train import train
    from components.trainloop import fit

    settings, ref = _setup(home)
    params = TrainParams(max_steps=steps, workers=1, cpu_threads=threads)
    started = time.perf_counter()
    with _RssSampler() as rss:
        if mode == "loop":
            result = fit(ref, params, settings)
            metrics, per_step = result.metrics, [r["tokens_per_second"] for r in result.history]
        else:
            from mlflow import MlflowClient

            tracked = train(ref, params, settings, use_ray=mode == "ray")
            metrics = tracked.metrics
            client = MlflowClient(settings.tracking_uri)
            per_step = [m.value for m in client.get_metric_history(tracked.run_id, "tokens_per_second")]
    wall = time.perf_counter() - started
    trainers = [k for k in rss.peak_by_name if "RayTrainWorker" in k] or ["driver"]
    trainer = max(trainers, key=rss.peak_by_name.get)
    return {
        "mode": mode,
        "threads": threads or os.cpu_count(),  # auto: the one worker gets every core
        "steps": steps,
        KEY: statistics.median(per_step),
        "tokens_per_second": metrics["tokens_per_second"],
        "train_seconds": metrics["train_seconds"],
        "wall_seconds": wall,
        "eval_loss": metrics["eval_loss"],
        "peak_rss_trainer_mib": rss.peak_by_name.get(trainer, 0) / 2**20,
        "peak_rss_total_mib": rss.peak_total / 2**20,
        "load_average": os.getloadavg()[0],
    }


def _run_child(mode: str, home: Path, steps: int, threads: str) -> dict:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "TOKENIZERS_PARALLELISM": "false",
    }
    cmd = [sys.executable, __file__, "--child", mode, "--home", str(home), "--steps", str(steps)]
    cmd += ["--threads", threads]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} run failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _print_table(best: dict[str, dict], ratios: dict[str, dict[str, float]]) -> None:
    header = (
        "config",
        "tokens/s median step",
        "tokens/s mean",
        "train s",
        "wall s",
        "RSS trainer MiB",
        "RSS all MiB",
    )
    rows = [
        (
            name,
            f"{r[KEY]:,.0f}",
            f"{r['tokens_per_second']:,.0f}",
            f"{r['train_seconds']:.1f}",
            f"{r['wall_seconds']:.1f}",
            f"{r['peak_rss_trainer_mib']:,.0f}",
            f"{r['peak_rss_total_mib']:,.0f}",
        )
        for name, r in best.items()
    ]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain text is enough
        for row in (header, *rows):
            print("  ".join(f"{c:>20}" for c in row))
    else:
        table = Table(title="Training loop: in-process vs Ray Train (1 worker), best of the repeats")
        for column in header:
            table.add_column(column, justify="left" if column == "config" else "right")
        for row in rows:
            table.add_row(*row)
        Console(width=150).print(table)
    for threads, r in ratios.items():
        print(
            f"threads={threads}: ray / loop+mlflow = {r['ray_vs_loop_mlflow']:.3f} (goal >= 0.97),"
            f" ray / bare loop = {r['ray_vs_loop']:.3f}"
        )


def main() -> None:
    """Run every mode x thread setting ``--repeats`` times, interleaved; print and record the best."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    parser.add_argument("--repeats", type=int, default=2, help="runs per configuration (the best counts)")
    parser.add_argument("--threads", default="auto,1", help="comma-separated: auto (all cores) or a number")
    parser.add_argument(
        "--home", type=Path, default=Path("/tmp/flywheel-bench"), help="scratch flywheel home"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "train_overhead.json")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        threads = None if args.threads == "auto" else int(args.threads)
        print(json.dumps(child(args.child, args.home, args.steps, threads)))
        return

    _setup(args.home)  # build base model + snapshot once, outside the timed runs
    thread_settings = [t.strip() for t in args.threads.split(",") if t.strip()]
    configs = [(mode, t) for t in thread_settings for mode in MODES]
    runs: dict[str, list[dict]] = {f"{m} threads={t}": [] for m, t in configs}
    for i in range(args.repeats):
        for mode, threads in configs:
            name = f"{mode} threads={threads}"
            result = _run_child(mode, args.home, args.steps, threads)
            runs[name].append(result)
            print(
                f"[{i + 1}/{args.repeats}] {name}: median step {result[KEY]:,.0f} tokens/s,"
                f" mean {result['tokens_per_second']:,.0f} (load {result['load_average']:.1f})",
                flush=True,
            )
    best = {name: max(rs, key=lambda r: r[KEY]) for name, rs in runs.items()}
    ratios = {
        t: {
            "ray_vs_loop_mlflow": best[f"ray threads={t}"][KEY] / best[f"loop+mlflow threads={t}"][KEY],
            "ray_vs_loop": best[f"ray threads={t}"][KEY] / best[f"loop threads={t}"][KEY],
        }
        for t in thread_settings
    }
    _print_table(best, ratios)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": "train_overhead",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "steps": args.steps,
        "repeats": args.repeats,
        "ratio_metric": KEY,
        "goal_ratio": 0.97,
        "ratios": ratios,
        "best": best,
        "runs": runs,
    }
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
