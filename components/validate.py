"""Data validation: a Great Expectations suite for SFT datasets, with Data Docs per snapshot.

Each split is one pandas batch. Checks that GX cannot express over raw columns (token budgets,
PII with checksums, facts contained in the response, eval prompts leaking into train) are
computed first as derived ``__`` columns, and GX expectations judge those columns.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from components.base_model import ensure_base, load_tokenizer
from components.data import intents, load_corpus, policy_versions, read_split
from components.errors import Rejected
from components.pii import find_pii
from components.prompt import normalize_prompt
from components.schemas import SFT_COLUMNS, SPLITS, DatasetRef, ExpectationResult, ValidationReport
from components.settings import Settings

if TYPE_CHECKING:  # heavy imports stay inside functions
    import pandas as pd
    from great_expectations.expectations import Expectation
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

TRAIN_SPLIT = "train"
SAMPLE_SIZE = 5
DATA_DOCS_SITE = "flywheel"

# Derived columns, added to every split's frame (so the expected column set is fixed).
_ROW = "__row"  # position of the row in its split: samples point back at raw rows with it
_PROMPT_TOKENS = "__prompt_tokens"
_RESPONSE_TOKENS = "__response_tokens"
_RESPONSE_PII = "__response_pii"
_FACTS_MISSING = "__facts_missing"
_EVAL_LEAK = "__eval_leak"
_WRONG_TYPES = "__wrong_types"
_DERIVED = (_ROW, _PROMPT_TOKENS, _RESPONSE_TOKENS, _RESPONSE_PII, _FACTS_MISSING, _EVAL_LEAK, _WRONG_TYPES)
# Columns that hold text; facts (a list of strings) is judged by facts_in_response.
_TEXT_COLUMNS = ("id", "prompt", "response", "intent", "policy_version", "source")

# C0 controls except tab and newline, DEL, C1 controls, and U+FFFD (a decoding error upstream;
# lone surrogates are turned into it before the frame is built, see _clean).
_BAD_TEXT = r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ufffd]"
_SURROGATE = re.compile("[\ud800-\udfff]")
_MAX_SAMPLE_CHARS = 160


class DataValidationError(Rejected):
    """A dataset failed validation; ``report`` says which expectations and rows."""

    report: ValidationReport

    def __init__(self, report: ValidationReport) -> None:
        super().__init__(f"dataset {report.dataset_sha256[:12]} failed validation", report=report)

    def __str__(self) -> str:
        where: dict[str, list[str]] = {}
        for r in self.report.results:
            if not r.success:
                count = "not evaluated" if r.note else str(r.unexpected_count)
                where.setdefault(r.name, []).append(f"{r.split}: {count}" if r.split else count)
        failed = ", ".join(f"{name} [{'; '.join(parts)}]" for name, parts in where.items())
        return f"dataset {self.report.dataset_sha256[:12]} failed validation: {failed}"


@dataclass(frozen=True)
class _Check:
    """One expectation of the suite, with what it needs to be evaluated at all."""

    name: str
    expectation: Expectation
    column: str | None  # the dataset column it judges (may differ from a derived GX column)
    needs: tuple[tuple[str, str], ...]  # (split, column) pairs that must exist


def validate(
    ref: DatasetRef,
    rows: Mapping[str, Sequence[Mapping]] | None,
    settings: Settings,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> ValidationReport:
    """Validate an SFT dataset snapshot with Great Expectations and build its Data Docs.

    Args:
        ref: the snapshot (its sha256 names the Data Docs folder).
        rows: raw rows by split; None reads the snapshot's split files.
        settings: token budgets, row minimums, the corpus data and the Data Docs location.
        tokenizer: measures token budgets; None loads the settings' base model tokenizer.

    Returns:
        The report: one result per expectation and split, and the Data Docs index URI.
    """
    splits = _load_rows(ref, rows)
    if tokenizer is None:
        tokenizer = _base_tokenizer(settings)
    frames = {split: _frame(records) for split, records in splits.items()}
    _add_derived(frames, splits, tokenizer)

    gx = _import_gx()
    site_dir = Path(settings.data_docs_dir) / ref.sha256
    # Rebuilt from scratch: the site shows exactly this validation of this snapshot.
    shutil.rmtree(site_dir, ignore_errors=True)
    context = _context(gx, site_dir)
    batch_definition = (
        context.data_sources.add_pandas("sft")
        .add_dataframe_asset("rows")
        .add_batch_definition_whole_dataframe("all")
    )
    from great_expectations.core.run_identifier import RunIdentifier

    # A fixed run id: validating the same snapshot again rewrites the same Data Docs pages.
    run_id = RunIdentifier(run_name=f"validate-{ref.sha256[:12]}", run_time=ref.created_at)

    results: list[ExpectationResult] = []
    for split in frames:
        results += _validate_split(context, batch_definition, split, frames, splits[split], settings, run_id)

    docs = context.build_data_docs(site_names=[DATA_DOCS_SITE])
    index = site_dir / "index.html"
    report = ValidationReport(
        dataset_sha256=ref.sha256,
        success=all(r.success for r in results),
        results=results,
        data_docs_uri=index.as_uri() if index.exists() else docs.get(DATA_DOCS_SITE),
    )
    if report.success:
        log.info("dataset %s valid: %d expectations on %s", ref.sha256[:12], len(results), list(splits))
    else:
        log.warning("dataset %s invalid: %s", ref.sha256[:12], ", ".join(report.failed))
    return report


def validate_or_raise(
    ref: DatasetRef,
    rows: Mapping[str, Sequence[Mapping]] | None,
    settings: Settings,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> ValidationReport:
    """Validate like :func:`validate`, and stop the pipeline when the data fails.

    Returns:
        The report of a dataset that passed.

    Raises:
        DataValidationError: any expectation failed; the error carries the report.
    """
    report = validate(ref, rows, settings, tokenizer)
    if not report.success:
        raise DataValidationError(report)
    return report


def format_report(report: ValidationReport) -> str:
    """A human summary: a verdict line, then one line per failed expectation with a sample.

    Args:
        report: what :func:`validate` returned.

    Returns:
        Plain text, no trailing newline.
    """
    failed = [r for r in report.results if not r.success]
    head = f"dataset {report.dataset_sha256[:12]}: "
    if not failed:
        lines = [head + f"passed ({len(report.results)} expectation results)"]
    else:
        lines = [head + f"FAILED {len(failed)} of {len(report.results)} expectation results"]
    for r in failed:
        where = f"[{r.split}]" if r.split else ""
        what = f" {r.column}" if r.column else ""
        detail = r.note or f"{r.unexpected_count} unexpected"
        example = f"; e.g. {_describe(r.sample[0])}" if r.sample else ""
        if r.name == "min_rows" and r.sample:
            detail, example = f"{r.sample[0]['rows']} rows, at least {r.sample[0]['min_rows']} required", ""
        lines.append(f"  x {r.name} {where}{what}: {detail}{example}")
    if report.data_docs_uri:
        lines.append(f"data docs: {report.data_docs_uri}")
    return "\n".join(lines)


# The suite --------------------------------------------------------------------------------


def _checks(split: str, settings: Settings) -> list[_Check]:
    """The expectations for one split, in report order."""
    import great_expectations.expectations as gxe

    def on(*columns: str) -> tuple[tuple[str, str], ...]:
        return tuple((split, c) for c in columns)

    corpus = load_corpus(settings.corpus_dir)
    min_rows = settings.min_train_rows if split == TRAIN_SPLIT else settings.min_eval_rows
    checks = [
        # An empty or near-empty split passes every row check but cannot train or measure
        # anything: training would fail later, or evaluation would score a handful of rows.
        _Check("min_rows", gxe.ExpectTableRowCountToBeBetween(min_value=min_rows), None, ()),
        # Training and serving read columns by name: a missing one breaks them, an extra one
        # is usually a mis-mapped export that would silently be dropped.
        _Check(
            "columns",
            gxe.ExpectTableColumnsToMatchSet(column_set=[*SFT_COLUMNS, *_DERIVED], exact_match=True),
            None,
            (),
        ),
        # A number or an object where text belongs is a mis-mapped export; reported as what it
        # is, not as an empty prompt (the other checks see its JSON text).
        _Check("column_types", gxe.ExpectColumnValuesToBeNull(column=_WRONG_TYPES), None, ()),
        # An empty prompt teaches the model to answer nothing in particular.
        _Check(
            "prompt_not_empty",
            gxe.ExpectColumnValuesToMatchRegex(column="prompt", regex=r"\S"),
            "prompt",
            on("prompt"),
        ),
        # An empty response teaches the model to stop right away.
        _Check(
            "response_not_empty",
            gxe.ExpectColumnValuesToMatchRegex(column="response", regex=r"\S"),
            "response",
            on("response"),
        ),
        # Over-long prompts are truncated in training, so the model learns from cut-off questions.
        _Check(
            "prompt_token_budget",
            gxe.ExpectColumnValuesToBeBetween(
                column=_PROMPT_TOKENS, min_value=0, max_value=settings.max_prompt_tokens
            ),
            "prompt",
            on("prompt"),
        ),
        # Over-long responses lose their end (and the EOS token) to truncation.
        _Check(
            "response_token_budget",
            gxe.ExpectColumnValuesToBeBetween(
                column=_RESPONSE_TOKENS, min_value=0, max_value=settings.max_response_tokens
            ),
            "response",
            on("response"),
        ),
        # Duplicate pairs over-weight one example and inflate metrics when they straddle a split.
        _Check(
            "unique_pairs",
            gxe.ExpectCompoundColumnsToBeUnique(column_list=["prompt", "response"]),
            None,
            on("prompt", "response"),
        ),
        # Row ids are provenance keys (feedback lineage, quarantine): they must name one row.
        _Check("unique_ids", gxe.ExpectColumnValuesToBeUnique(column="id"), "id", on("id")),
        # A model trained on PII can repeat it to other users.
        _Check(
            "response_no_pii",
            gxe.ExpectColumnValuesToBeNull(column=_RESPONSE_PII),
            "response",
            on("response"),
        ),
        # Control characters and U+FFFD come from broken exports and decoding errors; the
        # model would learn to emit them.
        _Check(
            "valid_text",
            gxe.ExpectColumnValuesToNotMatchRegex(column="prompt", regex=_BAD_TEXT),
            "prompt",
            on("prompt"),
        ),
        _Check(
            "valid_text",
            gxe.ExpectColumnValuesToNotMatchRegex(column="response", regex=_BAD_TEXT),
            "response",
            on("response"),
        ),
        # Evaluation and routing group rows by intent; an unknown one falls out of every report.
        _Check(
            "known_intent",
            gxe.ExpectColumnValuesToBeInSet(column="intent", value_set=list(intents(corpus))),
            "intent",
            on("intent"),
        ),
        # Facts are checked against a policy table; an unknown version has none to check against.
        _Check(
            "known_policy_version",
            gxe.ExpectColumnValuesToBeInSet(column="policy_version", value_set=list(policy_versions(corpus))),
            "policy_version",
            on("policy_version"),
        ),
        # Fact accuracy (the promotion gate's main metric) assumes the reference answer holds
        # its facts; a row that breaks this scores every model wrong.
        _Check(
            "facts_in_response",
            gxe.ExpectColumnValuesToBeNull(column=_FACTS_MISSING),
            "facts",
            on("facts", "response"),
        ),
    ]
    if split == TRAIN_SPLIT:
        # A prompt seen in training makes the eval/holdout score measure memory, not skill.
        checks.append(
            _Check(
                "no_eval_leak",
                gxe.ExpectColumnValuesToBeNull(column=_EVAL_LEAK),
                "prompt",
                on("prompt") + tuple((s, "prompt") for s in SPLITS if s != TRAIN_SPLIT),
            )
        )
    return checks


def _validate_split(
    context,
    batch_definition,
    split: str,
    frames: dict[str, pd.DataFrame],
    records: list[dict],
    settings: Settings,
    run_id,
) -> list[ExpectationResult]:
    """Run the suite on one split; checks whose columns are missing are reported, not run."""
    import great_expectations as gx

    checks = [(check, _missing(check, frames)) for check in _checks(split, settings)]
    for n, (check, _) in enumerate(checks):
        # GX reorders results; meta carries the check's position (and its name to Data Docs).
        check.expectation.meta = {"name": check.name, "check": n}
    # Expectations go in with the suite: one store write instead of one per expectation.
    suite = context.suites.add(
        gx.ExpectationSuite(
            name=f"sft-{split}", expectations=[c.expectation for c, gaps in checks if not gaps]
        )
    )
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=f"sft-{split}", data=batch_definition, suite=suite)
    )
    outcome = definition.run(
        batch_parameters={"dataframe": frames[split]},
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": [_ROW]},
        run_id=run_id,
    )
    by_check = {r.expectation_config.meta["check"]: r for r in outcome.results}
    return [
        _result(check, split, by_check[n], records, frames[split])
        if not gaps
        else _not_evaluated(check, split, gaps)
        for n, (check, gaps) in enumerate(checks)
    ]


# Frames and derived columns ---------------------------------------------------------------


def _load_rows(ref: DatasetRef, rows: Mapping[str, Sequence[Any]] | None) -> dict[str, list[dict]]:
    """Raw rows by split, known splits first; non-object rows become empty rows."""
    if rows is None:
        names = list(ref.splits) or list(SPLITS)
        rows = {split: read_split(ref, split) for split in names}
    ordered = sorted(rows, key=lambda s: (SPLITS.index(s) if s in SPLITS else len(SPLITS), s))
    return {split: [_as_dict(r) for r in rows[split]] for split in ordered}


def _as_dict(row: Any) -> dict:
    if hasattr(row, "model_dump"):
        return row.model_dump(mode="json")
    return dict(row) if isinstance(row, Mapping) else {}


def _clean(value: str) -> str:
    # Lone surrogates (from "\ud800" JSON escapes) cannot be encoded, so pandas' Arrow strings
    # and the JSON report would fail on them; U+FFFD keeps them visible to valid_text.
    return _SURROGATE.sub("\ufffd", value) if _SURROGATE.search(value) else value


def _cell(column: str, value: Any) -> Any:
    """A raw value made safe for GX: text columns are always strings (missing → "")."""
    if column in ("prompt", "response", "intent", "policy_version"):
        # "" rather than None: GX map expectations skip nulls, and these must catch them. A
        # value of the wrong type becomes its JSON text: column_types reports it, once.
        if value is None:
            return ""
        return _clean(value) if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    if column == "id":
        return _clean(value) if isinstance(value, str) else (None if value is None else str(value))
    if isinstance(value, str):
        return _clean(value)
    if isinstance(value, list | dict):
        return json.dumps(value, ensure_ascii=False, default=str)
    return value


def _frame(records: list[dict]) -> pd.DataFrame:
    """One split as a DataFrame of its raw columns (as found, in SFT order) plus a row index."""
    import pandas as pd

    found = (
        dict.fromkeys(key for record in records for key in record) if records else dict.fromkeys(SFT_COLUMNS)
    )
    columns = [c for c in SFT_COLUMNS if c in found] + [c for c in found if c not in SFT_COLUMNS]
    data = {c: pd.Series([_cell(c, r.get(c)) for r in records], dtype=object) for c in columns}
    frame = pd.DataFrame(data, index=pd.RangeIndex(len(records)))
    frame[_ROW] = range(len(records))
    return frame


def _add_derived(frames: dict[str, pd.DataFrame], splits: dict[str, list[dict]], tokenizer) -> None:
    """Compute the derived columns every split's frame carries (None where not computable)."""
    held_out: dict[str, str] = {}
    for split, frame in frames.items():
        if split != TRAIN_SPLIT and "prompt" in frame:
            for prompt in frame["prompt"]:
                held_out.setdefault(_leak_key(prompt), split)
    held_out.pop("", None)

    for split, frame in frames.items():
        n = len(frame)
        for column, derived in (("prompt", _PROMPT_TOKENS), ("response", _RESPONSE_TOKENS)):
            frame[derived] = (
                _token_counts(tokenizer, frame[column].tolist()) if column in frame else [None] * n
            )
        responses = frame["response"].tolist() if "response" in frame else [None] * n
        frame[_RESPONSE_PII] = [_pii_kinds(text) for text in responses]
        frame[_FACTS_MISSING] = [
            _facts_missing(record.get("facts"), text)
            for record, text in zip(splits[split], responses, strict=True)
        ]
        if split == TRAIN_SPLIT and "prompt" in frame:
            frame[_EVAL_LEAK] = [_leak(prompt, held_out) for prompt in frame["prompt"]]
        else:
            frame[_EVAL_LEAK] = [None] * n
        frame[_WRONG_TYPES] = [_wrong_types(record) for record in splits[split]]
        for column in (_RESPONSE_PII, _FACTS_MISSING, _EVAL_LEAK, _WRONG_TYPES):
            frame[column] = frame[column].astype(object)


def _token_counts(tokenizer, texts: list[str]) -> list[int]:
    if not texts:
        return []
    # One batched call: the fast tokenizer encodes the whole split in Rust.
    encoded = tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return [len(ids) for ids in encoded]


def _pii_kinds(text: str | None) -> str | None:
    if not text:
        return None
    kinds = sorted({match.kind for match in find_pii(text)})
    return ", ".join(kinds) or None


def _facts_missing(facts: Any, response: str | None) -> str | None:
    """None when every fact string is in the response, else what is wrong."""
    if response is None or not response.strip():
        return None  # nothing to hold facts: response_not_empty already rejects the row
    if not isinstance(facts, list) or not all(isinstance(f, str) for f in facts):
        return f"facts is not a list of strings: {_clip(repr(facts))}"
    missing = [f for f in facts if f not in response]
    return f"missing: {', '.join(map(repr, missing))}" if missing else None


def _wrong_types(record: dict) -> str | None:
    """None when every text column holds text (or nothing), else which ones do not."""
    wrong = [
        f"{column}: {_json_type(record[column])}"
        for column in _TEXT_COLUMNS
        if record.get(column) is not None and not isinstance(record[column], str)
    ]
    return ", ".join(wrong) or None


def _json_type(value: Any) -> str:
    for kind, name in ((bool, "boolean"), (int | float, "number"), (list, "array"), (dict, "object")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _leak_key(prompt: str) -> str:
    return normalize_prompt(prompt).lower()


def _leak(prompt: str, held_out: dict[str, str]) -> str | None:
    split = held_out.get(_leak_key(prompt)) if prompt else None
    return f"prompt also in {split}" if split else None


# Results ----------------------------------------------------------------------------------


def _missing(check: _Check, frames: dict[str, pd.DataFrame]) -> list[str]:
    """What a check needs but the dataset lacks: "column" or "column in split"."""
    own = next(iter(check.needs), (None, None))[0]
    gaps = []
    for split, column in check.needs:
        if split in frames and column not in frames[split]:
            gaps.append(column if split == own else f"{column} in {split}")
    return gaps


def _not_evaluated(check: _Check, split: str, gaps: list[str]) -> ExpectationResult:
    return ExpectationResult(
        name=check.name,
        expectation=check.expectation.expectation_type,
        column=check.column,
        split=split,
        success=False,
        note=f"not evaluated: missing column {', '.join(gaps)}",
    )


def _result(
    check: _Check, split: str, gx_result, records: list[dict], frame: pd.DataFrame
) -> ExpectationResult:
    """Map one GX result back to the report: name, counts and a sample naming row ids."""
    base = {
        "name": check.name,
        "expectation": gx_result.expectation_config.type,
        "column": check.column,
        "split": split,
        "success": bool(gx_result.success),
    }
    info = gx_result.exception_info or {}
    if info.get("raised_exception"):
        return ExpectationResult(**base, note=f"GX error: {_clip(str(info.get('exception_message')))}")
    result = gx_result.result or {}
    if check.name == "min_rows":
        rows, low = result.get("observed_value"), gx_result.expectation_config.kwargs.get("min_value")
        sample = [] if base["success"] else [{"rows": rows, "min_rows": low}]
        return ExpectationResult(**base, unexpected_count=len(sample), sample=sample)
    if check.name == "columns":
        mismatched = (result.get("details") or {}).get("mismatched") or {}
        sample = [{"column": c, "problem": "missing"} for c in mismatched.get("missing", [])]
        sample += [{"column": c, "problem": "unexpected"} for c in mismatched.get("unexpected", [])]
        return ExpectationResult(**base, unexpected_count=len(sample), sample=sample[:SAMPLE_SIZE])

    gx_column = gx_result.expectation_config.kwargs.get("column")
    column_list = gx_result.expectation_config.kwargs.get("column_list")
    sample = []
    for entry in (result.get("unexpected_index_list") or [])[:SAMPLE_SIZE]:
        row = int(entry[_ROW])
        record = records[row] if row < len(records) else {}
        if column_list:
            value = {c: _jsonable(record.get(c)) for c in column_list}
        elif gx_column == check.column:
            value = _jsonable(record.get(gx_column))  # the raw value, not the frame's ""
        else:
            value = _jsonable(frame.at[row, gx_column])
        sample.append({"id": _jsonable(record.get("id")), "row": row, "value": value})
    return ExpectationResult(**base, unexpected_count=int(result.get("unexpected_count") or 0), sample=sample)


def _jsonable(value: Any) -> Any:
    """A JSON-safe, short copy of a value for report samples."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, str):
        return _clip(_clean(value))
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value[:SAMPLE_SIZE]]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in list(value.items())[:SAMPLE_SIZE]}
    if hasattr(value, "item"):  # numpy scalar
        return _jsonable(value.item())
    return _clip(repr(value))


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_SAMPLE_CHARS else text[: _MAX_SAMPLE_CHARS - 1] + "…"


def _describe(entry: Any) -> str:
    if isinstance(entry, dict) and "value" in entry:
        who = f"id={entry['id']}" if entry.get("id") is not None else f"row {entry.get('row')}"
        return f"{who} value={entry['value']!r}"
    return json.dumps(entry, ensure_ascii=False)


# Great Expectations plumbing --------------------------------------------------------------


def _import_gx():
    """Import GX lazily (≈3 s) and keep its INFO chatter out of pipeline logs."""
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    import great_expectations as gx

    return gx


def _context(gx, site_dir: Path):
    """A fresh in-memory GX context whose one Data Docs site is ``site_dir``."""
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        data_docs_sites={
            DATA_DOCS_SITE: {
                "class_name": "SiteBuilder",
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(site_dir),
                },
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            }
        },
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
    )
    return gx.get_context(mode="ephemeral", project_config=config)


def _base_tokenizer(settings: Settings) -> PreTrainedTokenizerBase:
    """The tokenizer of the settings' base model (the local default is built if missing)."""
    if settings.base_model is None:
        return load_tokenizer(ensure_base(settings.base_model_dir, settings.seed))
    return load_tokenizer(settings.base_model)
