"""Do the default training settings deliver? Time ``train()`` with defaults and score the model's answers.

What ``flywheel train --workers 2`` does on a fresh home: build the default base model, snapshot
the default 7,200-row corpus, train with ``TrainParams()`` on Ray Train (2 CPU workers), log to
MLflow. Then the logged model answers every eval and holdout prompt greedily through
``components.predict`` (what evaluation and serving use), and the answers are scored with
``components.evaluate.answer_quality`` (the gate's metrics): fact accuracy, product-name
accuracy, refusal accuracy on out-of-scope prompts and false refusals on in-scope ones, per
split and per intent. The goals are read on the holdout split (wordings kept out of training
and out of every choice); the eval split is the one to choose corpus and settings by.

    python benchmarks/train_defaults.py
    python benchmarks/train_defaults.py --seeds 0,1,2                 # training seeds (data order)
    python benchmarks/train_defaults.py --seeds 0,1,2 --policy v2     # the policy-change path
    python benchmarks/train_defaults.py --answers /tmp/answers.jsonl  # what the model answered
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
METRICS = ("fact_accuracy", "product_accuracy", "refusal_accuracy", "false_refusal_rate")
SHORT = {
    "fact_accuracy": "fact",
    "product_accuracy": "product",
    "refusal_accuracy": "refusal",
    "false_refusal_rate": "false ref.",
}


def run_once(home: Path, seed: int, policy: str, rows: int, answers_file: Path | None = None) -> dict:
    """One default training run on a fresh home, then the answer figures of the logged model.

    With ``answers_file``, every eval and holdout prompt, its reference and the model's answer
    are appended there as JSON lines (to read what the model gets wrong).
    """
    from components.base_model import init_base
    from components.data import generate_corpus, load_corpus, read_split, snapshot
    from components.evaluate import DEFAULT_GENERATION, answer_quality, refusal_facts
    from components.predict import load
    from components.schemas import TrainParams
    from components.settings import Settings
    from components.train import train

    shutil.rmtree(home, ignore_errors=True)
    settings = Settings(home=home, _env_file=None)
    started = time.perf_counter()
    init_base(settings.base_model_dir, seed=0)
    ref = snapshot(generate_corpus(rows=rows, policy_version=policy, seed=0), settings.datasets_dir)
    prepared = time.perf_counter() - started
    params = TrainParams(seed=seed)
    started = time.perf_counter()
    result = train(ref, params, settings)
    seconds = time.perf_counter() - started
    spec = load_corpus()
    predictor = load(result.model_uri, settings)
    figures = {}
    for split in ("eval", "holdout"):
        split_rows = read_split(ref, split)
        answers = [c.text for c in predictor.generate([r["prompt"] for r in split_rows], DEFAULT_GENERATION)]
        figures[split] = answer_quality(split_rows, answers, spec.items, refusal_facts(spec))
        if answers_file is not None:
            with answers_file.open("a", encoding="utf-8") as out:
                for row, answer in zip(split_rows, answers, strict=True):
                    keep = {k: row[k] for k in ("intent", "source", "prompt", "response")}
                    out.write(json.dumps({"seed": seed, "split": split, **keep, "answer": answer}) + "\n")
    return {
        "seed": seed,
        "policy": policy,
        "base_and_data_seconds": prepared,
        "train_call_seconds": seconds,
        "steps": result.steps,
        "workers": params.workers,
        "metrics": result.metrics,
        "figures": figures,
    }


def _fmt(value: float | None) -> str:
    return "  -  " if value is None else f"{value:.3f}"


def table(runs: list[dict], split: str = "holdout") -> str:
    """Per seed and per intent figures of one split, as a plain-text table."""
    lines = [f"{split}: " + " | ".join(f"{SHORT[m]:>9}" for m in METRICS)]
    for run in runs:
        f = run["figures"][split]
        lines.append(f"seed {run['seed']:<4} " + " | ".join(f"{_fmt(f[m]):>9}" for m in METRICS))
    mean = {m: [r["figures"][split][m] for r in runs if r["figures"][split][m] is not None] for m in METRICS}
    lines.append(
        "mean      " + " | ".join(f"{_fmt(statistics.fmean(v) if v else None):>9}" for m, v in mean.items())
    )
    intents = sorted({i for r in runs for i in r["figures"][split]["by_intent"]})
    lines.append(f"per intent (mean over seeds), {split}:")
    for intent in intents:
        cells = []
        for m in METRICS:
            values = [r["figures"][split]["by_intent"][intent][m] for r in runs]
            values = [v for v in values if v is not None]
            cells.append(f"{_fmt(statistics.fmean(values) if values else None):>9}")
        lines.append(f"  {intent:<14} " + " | ".join(cells))
    return "\n".join(lines)


def main() -> None:
    """Run the default training for each seed; print and record time and answer figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds")
    parser.add_argument("--policy", default="v1", help="policy version of the corpus")
    parser.add_argument("--rows", type=int, default=7200, help="corpus rows (generate_corpus's default)")
    parser.add_argument(
        "--out", type=Path, default=None, help="default: results/train_defaults[_<policy>].json"
    )
    parser.add_argument(
        "--answers", type=Path, default=None, help="also write every eval/holdout answer to this JSONL file"
    )
    args = parser.parse_args()
    out = args.out or RESULTS / (
        "train_defaults.json" if args.policy == "v1" else f"train_defaults_{args.policy}.json"
    )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from components.base_model import BaseModelSpec
    from components.schemas import TrainParams

    runs = []
    with tempfile.TemporaryDirectory(prefix="fw-defaults-", dir="/tmp") as tmp:
        for seed in [int(s) for s in args.seeds.split(",")]:
            run = run_once(Path(tmp) / f"home{seed}", seed, args.policy, args.rows, args.answers)
            runs.append(run)
            h = run["figures"]["holdout"]
            print(
                f"seed {seed}: train() {run['train_call_seconds']:.0f} s, eval loss {run['metrics']['eval_loss']:.3f};"
                f" holdout fact {h['fact_accuracy']:.3f} product {_fmt(h['product_accuracy'])}"
                f" refusal {_fmt(h['refusal_accuracy'])} false refusals {_fmt(h['false_refusal_rate'])}",
                flush=True,
            )
    print(table(runs, "eval"))
    print(table(runs, "holdout"))
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": "train_defaults",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "load_after": os.getloadavg(),
        },
        "policy": args.policy,
        "rows": args.rows,
        "base_model": BaseModelSpec().model_dump(),
        "params": TrainParams().model_dump(mode="json"),
        "runs": runs,
    }
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
