"""The default base model, built offline: a small GPT-2-style LM and a byte-level BPE tokenizer."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:  # heavy imports stay inside functions
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


class BaseModelSpec(BaseModel):
    """Shape of the locally built base model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vocab_size: int = Field(2048, ge=300)
    n_positions: int = Field(256, ge=32)
    # ~0.5 M parameters: on the support corpus this size answers unseen phrasings better than
    # 128 x 4 layers (which memorizes the training wordings) and trains twice as fast. 128 wide
    # with 3 layers states more facts on eval wordings (benchmarks/results/sweep_round4.json) at
    # ~1.4x the time, but the loop's retrain setting, chosen at this width, makes it forget more.
    n_embd: int = Field(96, ge=16)
    n_layer: int = Field(3, ge=1)
    n_head: int = Field(4, ge=1)
    # No dropout: with ~1,000 steps on noisy compositions the model underfits rather than
    # overfits, and dropout slowed down learning to copy product names (benchmarks/sweep.py).
    dropout: float = Field(0.0, ge=0, lt=1, description="Residual, embedding and attention dropout.")


def build_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerBase:
    """Train a byte-level BPE tokenizer on ``texts`` (deterministic for the same texts)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN
    )


def init_base(out_dir: Path, seed: int = 0, spec: BaseModelSpec | None = None) -> Path:
    """Build the default base model and save it as a Hugging Face directory (safetensors).

    Args:
        out_dir: folder to write; replaced if it exists.
        seed: seed of the weights and of the tokenizer's corpus.
        spec: model shape; defaults to a ~0.5 M-parameter GPT-2.

    Returns:
        ``out_dir``.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from components.data import corpus_texts
    from components.prompt import PROMPT_TEMPLATE

    spec = spec or BaseModelSpec()
    # Teach the tokenizer the template's markers too, so they are a few tokens each.
    texts = corpus_texts(seed) + [PROMPT_TEMPLATE] * 10
    tokenizer = build_tokenizer(texts, spec.vocab_size)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=spec.n_positions,
        n_embd=spec.n_embd,
        n_layer=spec.n_layer,
        n_head=spec.n_head,
        resid_pdrop=spec.dropout,
        embd_pdrop=spec.dropout,
        attn_pdrop=spec.dropout,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    log.info("base model: %d parameters -> %s", model.num_parameters(), out_dir)
    return out_dir


def ensure_base(out_dir: Path, seed: int = 0) -> Path:
    """The base model folder, built first if it does not exist yet."""
    if not (Path(out_dir) / "config.json").exists():
        init_base(out_dir, seed)
    return Path(out_dir)


def load_tokenizer(ref: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer by local path or Hugging Face id; a pad token is guaranteed."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(ref), trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(ref: str | Path, dtype: str | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer by local path or Hugging Face id (same code path).

    Weights load from safetensors only; a checkpoint that exists only as a pickle is refused.
    """
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(ref)
    model = AutoModelForCausalLM.from_pretrained(
        str(ref), use_safetensors=True, dtype=dtype or "auto", trust_remote_code=False
    )
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
