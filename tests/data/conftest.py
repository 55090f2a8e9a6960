"""Fixtures for the data validation tests: one tokenizer per session, fresh copies of the corpus."""

from __future__ import annotations

import copy

import pytest


@pytest.fixture(scope="session")
def tokenizer(base_model_dir):
    """The base model's tokenizer, loaded once (validate() would load it per call otherwise)."""
    from components.base_model import load_tokenizer

    return load_tokenizer(base_model_dir)


@pytest.fixture(scope="session")
def _corpus_rows(corpus) -> dict[str, list[dict]]:
    return {split: [row.model_dump(mode="json") for row in rows] for split, rows in corpus.items()}


@pytest.fixture
def rows(_corpus_rows) -> dict[str, list[dict]]:
    """A clean copy of the seed corpus as raw JSON rows, free to corrupt."""
    return copy.deepcopy(_corpus_rows)
