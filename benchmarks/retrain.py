"""How should the feedback loop retrain? From the base model, or the champion fine-tuned further?

The demo's policy change (v1 → v1.1: the return window and the free-shipping threshold) is what
a feedback build teaches: the v1.1 corpus stands in for the merged dataset (the builder updates
the changed facts across the base rows). On a fresh home the v1 champion is trained with the
defaults; then each variant trains on the v1.1 data — ``base``: ``TrainParams()`` from the base
model, as the first training did; ``continue``: the champion exported and fine-tuned further
(``pipeline.train_and_register(init_from="champion")``) with fewer steps at a lower rate.

Every model answers the eval and holdout prompts greedily; a row counts when the answer states
all of its facts. Figures are split by the intents the change touched and the rest. The retrain
policy's fields (``components.feedback.RETRAIN_FIELDS``) are chosen on the eval split.

    python benchmarks/retrain.py
    python benchmarks/retrain.py --variants '[{"max_steps": 300, "learning_rate": 0.002}]'
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_VARIANTS = [
    {"max_steps": 150, "learning_rate": 2e-3, "warmup_steps": 10},
    {"max_steps": 300, "learning_rate": 2e-3, "warmup_steps": 20},
    {"max_steps": 500, "learning_rate": 2e-3, "warmup_steps": 20},
    {"max_steps": 800, "learning_rate": 2e-3, "warmup_steps": 20},
]


def score(settings, version: str, rows_by_split: dict[str, list[dict]], changed: set[str]) -> dict:
    """Share of rows whose answer states every fact, by split, for changed and untouched intents."""
    from components.evaluate import DEFAULT_GENERATION, states_fact
    from components.predict import load

    predictor = load(version, settings, device="cpu")
    out = {}
    for split, rows in rows_by_split.items():
        answers = predictor.generate([r["prompt"] for r in rows], DEFAULT_GENERATION)
        ok = [all(states_fact(a.text, f) for f in r["facts"]) for r, a in zip(rows, answers, strict=True)]
        for group, member in (("changed", True), ("untouched", False)):
            hits = [o for r, o in zip(rows, ok, strict=True) if (r["intent"] in changed) == member]
            out[f"{split}_{group}"] = sum(hits) / len(hits) if hits else 0.0
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--variants", type=json.loads, default=DEFAULT_VARIANTS, help="continue variants (JSON)"
    )
    parser.add_argument("--no-base", action="store_true", help="skip the from-the-base-model variant")
    parser.add_argument("--rows", type=int, default=400, help="eval and holdout rows scored (evenly spread)")
    parser.add_argument("--seed", type=int, default=0, help="training seed of the champion and every variant")
    parser.add_argument(
        "--base-spec",
        type=json.loads,
        default=None,
        help="BaseModelSpec fields of the champion's base (JSON)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "retrain.json")
    args = parser.parse_args()

    from mlflow import MlflowClient

    from components import pipeline
    from components.base_model import BaseModelSpec, init_base
    from components.data import load_corpus, read_split
    from components.demo import BASE_POLICY, NEW_POLICY, changed_intents
    from components.schemas import TrainParams
    from components.settings import Settings

    work = Path(tempfile.mkdtemp(prefix="fw-retrain-"))
    settings = Settings(home=work / "home", _env_file=None)
    settings.ensure_home()
    changed = changed_intents(load_corpus(settings.corpus_dir))
    rows = []
    try:
        started = time.perf_counter()
        base = None
        if args.base_spec:
            base = str(init_base(work / "base", seed=0, spec=BaseModelSpec(**args.base_spec)))
        champion = pipeline.train_and_register(
            settings, pipeline.seed(settings, BASE_POLICY), TrainParams(seed=args.seed, base_model=base)
        )
        v1_seconds = time.perf_counter() - started
        client = MlflowClient(settings.tracking_uri, registry_uri=settings.tracking_uri)
        client.set_registered_model_alias(settings.model_name, "champion", champion.version)
        new = pipeline.seed(settings, NEW_POLICY)
        splits = {split: _spread(read_split(new, split), args.rows) for split in ("eval", "holdout")}
        rows.append(
            {"variant": "champion (v1)", "seconds": v1_seconds}
            | score(settings, champion.version, splits, changed)
        )
        variants = ([] if args.no_base else [("base", {}, None)]) + [
            ("continue", v, "champion") for v in args.variants
        ]
        for kind, fields, init_from in variants:
            started = time.perf_counter()
            params = TrainParams(**{"seed": args.seed, **fields})
            outcome = pipeline.train_and_register(settings, new, params, init_from=init_from)
            seconds = time.perf_counter() - started
            label = f"{kind} {json.dumps(fields, sort_keys=True)}" if fields else kind
            rows.append(
                {"variant": label, "seconds": seconds} | score(settings, outcome.version, splits, changed)
            )
            print(rows[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    columns = ("eval_changed", "eval_untouched", "holdout_changed", "holdout_untouched")
    print(f"\n{'variant':<72} {'train s':>8} " + " ".join(f"{c:>17}" for c in columns))
    for row in rows:
        print(f"{row['variant']:<72} {row['seconds']:>8.0f} " + " ".join(f"{row[c]:>17.3f}" for c in columns))
    best = max(rows[1:], key=lambda r: (r["eval_changed"] + r["eval_untouched"], -r["seconds"]))
    print(f"\nbest on eval (changed + untouched): {best['variant']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d"),
                "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
                "seed": args.seed,
                "base_spec": args.base_spec,
                "changed_intents": sorted(changed),
                "rows": rows,
                "best_on_eval": best["variant"],
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.out}")


def _spread(rows: list[dict], n: int) -> list[dict]:
    """At most ``n`` rows, evenly spread over the split (every wording keeps its share)."""
    step = max(1, len(rows) // n)
    return rows[::step][:n]


if __name__ == "__main__":
    main()
