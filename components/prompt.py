"""The one prompt template used for training, evaluation and serving."""

from __future__ import annotations

import unicodedata

PROMPT_TEMPLATE = "### Question:\n{prompt}\n### Answer:\n"


def normalize_prompt(prompt: str) -> str:
    """Normalize user text the same way everywhere: NFC and collapsed whitespace."""
    return " ".join(unicodedata.normalize("NFC", prompt).split())


def format_prompt(prompt: str) -> str:
    """The model input for a user prompt (what generation continues from)."""
    return PROMPT_TEMPLATE.format(prompt=normalize_prompt(prompt))


def format_example(prompt: str, response: str, eos_token: str) -> tuple[str, str]:
    """Split a training example into (context, target); the loss falls on the target only."""
    return format_prompt(prompt), response.strip() + eos_token
