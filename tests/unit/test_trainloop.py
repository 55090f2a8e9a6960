"""The plain training loop (no Ray, no MLflow): loss masking, data sharding, steps and resume."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.unit

ROWS = [
    {"prompt": "How long is the warranty?", "response": "The warranty is 12 months."},
    {
        "prompt": "Hi, Is shipping free? Thanks!",
        "response": "Shipping is free on orders over $50; below that it costs $4.99.",
    },
]


@pytest.fixture(scope="module")
def tokenizer(base_model_dir):
    from components.base_model import load_tokenizer

    return load_tokenizer(base_model_dir)


def test_labels_mask_the_prompt_and_end_in_eos(tokenizer):
    from components.prompt import format_prompt
    from components.trainloop import IGNORE_INDEX, build_examples

    examples = build_examples(ROWS, tokenizer, max_seq_len=128)
    assert len(examples) == len(ROWS)
    for row, ex in zip(ROWS, examples, strict=True):
        prompt_len = len(tokenizer(format_prompt(row["prompt"]))["input_ids"])
        # The prompt part carries no loss; every response token and the EOS do.
        assert ex.labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
        assert ex.labels[prompt_len:] == ex.input_ids[prompt_len:]
        assert ex.labels[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(ex.labels[prompt_len:-1]) == row["response"]


def test_collate_masks_padding(tokenizer):
    from components.trainloop import IGNORE_INDEX, build_examples, collate

    examples = build_examples(ROWS, tokenizer, max_seq_len=128)
    batch = collate(examples, tokenizer.pad_token_id)
    short = min(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    n = len(examples[short].input_ids)
    assert batch["input_ids"].shape[1] == max(len(e.input_ids) for e in examples)
    assert (batch["labels"][short, n:] == IGNORE_INDEX).all()
    assert (batch["attention_mask"][short, n:] == 0).all()
    assert (batch["input_ids"][short, n:] == tokenizer.pad_token_id).all()
    assert batch["labels"][short, n - 1] == tokenizer.eos_token_id


def test_truncation_keeps_max_seq_len_and_drops_examples_without_target(tokenizer):
    from components.prompt import format_prompt
    from components.trainloop import build_examples

    long_row = {"prompt": "How long is the warranty?", "response": "The warranty is 12 months. " * 20}
    prompt_len = len(tokenizer(format_prompt(long_row["prompt"]))["input_ids"])
    (ex,) = build_examples([long_row], tokenizer, max_seq_len=prompt_len + 10)
    assert len(ex.input_ids) == len(ex.labels) == prompt_len + 10
    # The prompt alone fills the budget: no target token left, so the row is dropped.
    assert build_examples([long_row], tokenizer, max_seq_len=prompt_len) == []


def test_question_dropout_drops_only_question_tokens_and_repeats_from_its_seed(tokenizer):
    import random

    from components.prompt import normalize_prompt
    from components.trainloop import IGNORE_INDEX, build_examples, drop_question_tokens

    for row, ex in zip(ROWS, build_examples(ROWS, tokenizer, max_seq_len=128), strict=True):
        start, end = ex.question
        assert tokenizer.decode(ex.input_ids[start:end]) == normalize_prompt(row["prompt"])
        assert drop_question_tokens(ex, 0.0, random.Random(0)) is ex
        dropped = drop_question_tokens(ex, 0.5, random.Random(7))
        assert dropped == drop_question_tokens(ex, 0.5, random.Random(7))
        d_start, d_end = dropped.question
        kept = dropped.input_ids[d_start:d_end]
        assert d_start == start and 0 < len(kept) < end - start
        # What stays is the question's tokens in order; template and target are untouched.
        rest = iter(ex.input_ids[start:end])
        assert all(token in rest for token in kept)
        assert dropped.input_ids[:start] == ex.input_ids[:start]
        assert dropped.input_ids[d_end:] == ex.input_ids[end:]
        assert dropped.labels == ex.labels[:start] + [IGNORE_INDEX] * len(kept) + ex.labels[end:]
        # Even when every token draws a drop, one stays.
        assert (
            len(drop_question_tokens(ex, 0.999, random.Random(0)).input_ids)
            == len(ex.input_ids) - (end - start) + 1
        )


def test_label_smoothing_mixes_the_target_with_the_uniform_distribution(tokenizer, base_model_dir):
    import torch
    import torch.nn.functional as F  # noqa: N812

    from components.base_model import load_model
    from components.trainloop import IGNORE_INDEX, build_examples, collate, train_step

    batch = collate(build_examples(ROWS, tokenizer, max_seq_len=128), tokenizer.pad_token_id)
    model, _ = load_model(base_model_dir)
    learn = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(5):  # away from the near-uniform start, where both losses coincide
        train_step(model, [batch], learn, None, max_grad_norm=None)
    frozen = torch.optim.SGD(model.parameters(), lr=0.0)  # the step leaves the weights alone
    plain = train_step(model, [batch], frozen, None, max_grad_norm=None).loss
    smooth = train_step(model, [batch], frozen, None, max_grad_norm=None, label_smoothing=0.1).loss

    with torch.no_grad():
        logp = F.log_softmax(
            model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits[:, :-1], -1
        )
    mask = batch["labels"][:, 1:] != IGNORE_INDEX
    target = logp.gather(-1, batch["labels"][:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)[mask]
    uniform = logp.mean(-1)[mask]
    assert plain == pytest.approx(float(-target.mean()), rel=1e-4)
    assert smooth == pytest.approx(float(-(0.9 * target + 0.1 * uniform).mean()), rel=1e-4)
    assert smooth > plain + 0.1


def test_batch_schedule_shards_by_rank_and_is_deterministic():
    from components.trainloop import BatchSchedule

    ranks = [BatchSchedule(n=40, batch_size=4, world_size=2, rank=r, seed=7) for r in range(2)]
    epoch = [i for k in range(5) for r in ranks for i in r.micro_batch(k)]
    assert sorted(epoch) == list(range(40))  # one epoch: every example once, ranks disjoint
    assert epoch != list(range(40))  # shuffled
    again = BatchSchedule(n=40, batch_size=4, world_size=2, rank=1, seed=7)
    assert [again.micro_batch(k) for k in (3, 12, 4)] == [ranks[1].micro_batch(k) for k in (3, 12, 4)]
    other_seed = BatchSchedule(n=40, batch_size=4, world_size=2, rank=1, seed=8)
    assert [other_seed.micro_batch(k) for k in range(5)] != [ranks[1].micro_batch(k) for k in range(5)]


def _params(**overrides):
    from components.schemas import TrainParams

    defaults = dict(
        max_steps=6,
        batch_size=8,
        grad_accum=2,
        learning_rate=3e-3,
        warmup_steps=1,
        eval_examples=32,
        workers=1,
    )
    return TrainParams(**{**defaults, **overrides})


def test_fit_runs_in_process_and_lowers_loss(seed_ref, settings, base_model_dir, tmp_path):
    from components.trainloop import fit

    seen = []
    result = fit(
        seed_ref,
        _params(base_model=str(base_model_dir)),
        settings,
        progress=seen.append,
        output_dir=tmp_path / "model",
    )
    assert result.steps == 6 and [p["step"] for p in seen] == list(range(1, 7))
    assert all(math.isfinite(p["loss"]) for p in seen)
    assert result.metrics["eval_loss"] < result.metrics["base_eval_loss"]
    assert result.metrics["tokens_per_second"] > 0
    assert (tmp_path / "model" / "model.safetensors").exists()


def test_fit_resumes_from_its_checkpoint(seed_ref, settings, base_model_dir, tmp_path):
    from components.trainloop import fit

    params = _params(base_model=str(base_model_dir), max_steps=4, checkpoint_every=2)
    first = fit(seed_ref, params, settings, checkpoint_dir=tmp_path / "ckpt")
    assert first.checkpoint_dir is not None and first.checkpoint_dir.name == "checkpoint_000004"
    # Two kept, like Ray's CheckpointConfig(num_to_keep=2).
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["checkpoint_000002", "checkpoint_000004"]
    longer = params.model_copy(update={"max_steps": 6})
    second = fit(seed_ref, longer, settings, checkpoint_dir=tmp_path / "ckpt")
    assert second.resumed_from_step == 4
    assert [r["step"] for r in second.history] == [5, 6]
    assert second.metrics["base_eval_loss"] == pytest.approx(first.metrics["base_eval_loss"])


def test_lora_trains_only_adapters_and_merges_for_export(seed_ref, settings, base_model_dir, tmp_path):
    from components.schemas import LoraParams
    from components.trainloop import fit

    params = _params(base_model=str(base_model_dir), max_steps=2, lora=LoraParams(r=4, alpha=8))
    result = fit(seed_ref, params, settings, output_dir=tmp_path / "merged")
    assert not hasattr(result.model, "peft_config")  # merged back into a plain model
    assert not any("lora" in name for name in result.model.state_dict())
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["model_type"] == "gpt2"


def test_plain_loop_imports_neither_ray_nor_mlflow(seed_ref, base_model_dir, tmp_path):
    code = f"""
import sys
from components.data import open_dataset
from components.schemas import TrainParams
from components.settings import Settings
from components.trainloop import fit
ref, _ = open_dataset({str(seed_ref.uri.removeprefix("file://"))!r}, {str(tmp_path)!r})
params = TrainParams(base_model={str(base_model_dir)!r}, max_steps=1, batch_size=2, eval_examples=4)
fit(ref, params, Settings(home={str(tmp_path / "home")!r}, _env_file=None))
heavy = sorted(m for m in ("ray", "mlflow") if m in sys.modules)
assert not heavy, heavy
"""
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
