"""The model card of a registered version: facts gathered by the registry, prose in a template.

The text lives in ``components/templates/model_card.md.j2`` (package data); this module only
holds the record the template reads and renders it.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from components.schemas import DatasetRef, EvalReport

if TYPE_CHECKING:
    from jinja2 import Template

TEMPLATE = "model_card.md.j2"


@dataclass(frozen=True)
class TrainingFacts:
    """What the training run recorded: its params, metrics, runner tag and wall time."""

    params: Mapping[str, str] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)
    runner: str | None = None
    wall_seconds: float | None = None

    def metric(self, key: str) -> float | None:
        """The final value of a metric (``final_<key>`` when logged, else ``<key>``)."""
        return self.metrics.get(f"final_{key}", self.metrics.get(key))


@dataclass(frozen=True)
class CardFacts:
    """Everything a model card states about one registered version."""

    name: str
    version: str
    run_id: str | None = None
    dataset_sha256: str | None = None
    dataset_uri: str | None = None
    dataset: DatasetRef | None = None
    validation: str | None = None
    steps: str | None = None
    params_hash: str | None = None
    code_version: str | None = None
    parent_champion: str | None = None
    training: TrainingFacts | None = None
    report: EvalReport | None = None


def render(card: CardFacts) -> str:
    """The model card in markdown: intended use, data, training, evaluation, known limitations.

    Args:
        card: the facts about the version.

    Returns:
        The card's text.
    """
    return _template().render(card=card)


@functools.cache
def _template() -> Template:
    from importlib.resources import files

    from jinja2 import Environment, StrictUndefined

    env = Environment(
        autoescape=False,  # markdown, not HTML  # noqa: S701
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["fmt"] = _fmt
    return env.from_string((files("components") / "templates" / TEMPLATE).read_text(encoding="utf-8"))


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    return f"{value:.4f}" if isinstance(value, float) else str(value)
