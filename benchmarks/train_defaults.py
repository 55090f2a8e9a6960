"""Do the default training settings deliver? Time ``train()`` with defaults and score the model's facts.

What ``flywheel train --workers 2`` does on a fresh home: build the default base model, snapshot
the default 2,400-row corpus, train with ``TrainParams()`` on Ray Train (2 CPU workers), log to
MLflow. Then the logged model answers every eval and holdout prompt greedily from
``format_prompt(prompt)``; an answer counts when it contains all of the row's ``facts``.

    python benchmarks/train_defaults.py
    python benchmarks/train_defaults.py --seeds 0,1,2     # training seeds (data order)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def fact_accuracy(
    model, tokenizer, rows: list[dict], batch_size: int = 64, max_new_tokens: int = 48
) -> float:
    """Share of rows whose greedy answer contains every one of the row's facts."""
    import torch

    from components.prompt import format_prompt

    model.eval()
    tokenizer.padding_side = "left"  # generation continues from the end of every prompt
    hits = 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        enc = tokenizer([format_prompt(r["prompt"]) for r in chunk], return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        answers = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        hits += sum(all(f in a for f in r["facts"]) for r, a in zip(chunk, answers, strict=True))
    return hits / len(rows)


def run_once(home: Path, seed: int) -> dict:
    """One default training run on a fresh home, then the fact accuracy of the logged model."""
    import mlflow

    from components.base_model import init_base
    from components.data import generate_corpus, read_split, snapshot
    from components.schemas import TrainParams
    from components.settings import Settings
    from components.train import train

    shutil.rmtree(home, ignore_errors=True)
    settings = Settings(home=home, _env_file=None)
    init_base(settings.base_model_dir, seed=0)
    ref = snapshot(generate_corpus(rows=2400, policy_version="v1", seed=0), settings.datasets_dir)
    params = TrainParams(seed=seed)
    started = time.perf_counter()
    result = train(ref, params, settings)
    seconds = time.perf_counter() - started
    mlflow.set_tracking_uri(settings.tracking_uri)
    components = mlflow.transformers.load_model(result.model_uri, return_type="components")
    model, tokenizer = components["model"], components["tokenizer"]
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return {
        "seed": seed,
        "train_call_seconds": seconds,
        "steps": result.steps,
        "workers": params.workers,
        "metrics": result.metrics,
        "fact_accuracy": {
            s: fact_accuracy(model, tokenizer, read_split(ref, s)) for s in ("eval", "holdout")
        },
    }


def main() -> None:
    """Run the default training for each seed; print and record time and fact accuracy."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds")
    parser.add_argument("--out", type=Path, default=RESULTS / "train_defaults.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from components.schemas import TrainParams

    runs = []
    with tempfile.TemporaryDirectory(prefix="fw-defaults-", dir="/tmp") as tmp:
        for seed in [int(s) for s in args.seeds.split(",")]:
            run = run_once(Path(tmp) / f"home{seed}", seed)
            runs.append(run)
            acc = run["fact_accuracy"]
            print(
                f"seed {seed}: train() {run['train_call_seconds']:.0f} s, eval loss {run['metrics']['eval_loss']:.3f}"
                f" (base {run['metrics']['base_eval_loss']:.2f}), fact accuracy eval {acc['eval']:.1%}"
                f" holdout {acc['holdout']:.1%}",
                flush=True,
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": "train_defaults",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "params": TrainParams().model_dump(mode="json"),
        "runs": runs,
    }
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
