"""Training helpers of the reliability suite: tiny params, and a train + promote sequence as a command.

``python -m tests.reliability.trainfixtures HOME BASE_MODEL DATASET SEED`` runs one sequence on a
home, as a DAG run or two CLI commands would: ``pipeline.train_and_register`` (in-process, two
optimizer steps), then ``pipeline.promote`` (evaluating first, on a few examples, with a lax
gate). It prints one JSON line: the run, the version, and the gate's decision.
"""

from __future__ import annotations

import json
import sys
from typing import Any

# Two optimizer steps in-process: the machinery is under test, not the model.
TINY_TRAIN = dict(
    max_steps=2,
    workers=1,
    batch_size=4,
    warmup_steps=0,
    eval_every=0,
    eval_examples=8,
    checkpoint_every=2,
    max_seq_len=96,
)
# Floors any model clears; the regression limits are the defaults (a candidate may lose on them).
LAX_GATE = {"min_fact_accuracy": 0.0, "min_behavioural_pass_rate": 0.0}
EVAL_EXAMPLES = 6


def tiny_params(base_model: str, seed: int):
    """TrainParams of a two-step run; the seed makes it another run of the same data."""
    from components.schemas import TrainParams

    return TrainParams(base_model=base_model, seed=seed, **TINY_TRAIN)


def train_and_promote(settings: Any, dataset: str, seed: int) -> dict[str, Any]:
    """One train + promote sequence on ``settings``' home; what it did, as JSON-ready data."""
    from components import pipeline
    from components.schemas import PromotionGate

    outcome = pipeline.train_and_register(
        settings, dataset, tiny_params(str(settings.base_model), seed), use_ray=False
    )
    decision = pipeline.promote(
        settings, outcome.version, PromotionGate(**LAX_GATE), max_examples=EVAL_EXAMPLES
    )
    return {
        "run_id": outcome.result.run_id,
        "reused": outcome.result.reused,
        "version": outcome.version,
        "decision": decision.model_dump(mode="json"),
    }


def main(argv: list[str]) -> int:
    import logging

    from components.settings import Settings

    logging.basicConfig(level=logging.WARNING)
    home, base_model, dataset, seed = argv
    settings = Settings(home=home, base_model=base_model, _env_file=None)
    print(json.dumps(train_and_promote(settings, dataset, int(seed))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
