"""The bad-data table: each kind of corruption a dataset arrives with, and what must stop it.

Two shapes of kind:

- :class:`RowKind` corrupts rows of a clean corpus (a dict of split -> JSON rows); the result is
  snapshotted as the feedback loop would, and the pipeline gets its sha256. Each must fail the
  named expectations of ``components.validate`` and no other.
- :class:`FileKind` writes a file as a user hands it over (``training_pipeline``'s ``dataset``
  param takes a file). ``error`` is a pattern the refusal must match; ``ok`` kinds must pass.

Corruptions touch one row (or one file) so that the failing expectation points at exactly that.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

Rows = dict[str, list[dict]]


@dataclass(frozen=True)
class RowKind:
    """Rows corrupted in place by ``corrupt``; ``expect``: the expectations that must fail, and only they."""

    name: str
    expect: tuple[str, ...]
    corrupt: Callable[[Rows], None]
    pii: str | None = None  # the PII kind the report must name


@dataclass(frozen=True)
class FileKind:
    """A JSONL file written by ``write``; ``error`` the refusal must match (None: the file is fine)."""

    name: str
    error: str | None
    write: Callable[[Sequence[Mapping], Path], Path]

    @property
    def ok(self) -> bool:
        return self.error is None


# Rows -----------------------------------------------------------------------------------------


def _nulls(rows: Rows) -> None:
    rows["train"][3]["prompt"] = None


def _empty_split(rows: Rows) -> None:
    rows["train"].clear()


def _empty_response(rows: Rows) -> None:
    rows["train"][4]["response"] = ""


def _oversize_prompt(rows: Rows) -> None:
    rows["train"][5]["prompt"] = "Where is my order for the jacket, and when will it arrive? " * 30


def _oversize_response(rows: Rows) -> None:
    rows["train"][6]["response"] += " Thank you for shopping with us, we hope to see you again." * 30


def _duplicate_rows(rows: Rows) -> None:
    # An export that wrote one row twice: the same pair under the same id.
    rows["train"].append(copy.deepcopy(rows["train"][7]))


def _pii(text: str) -> Callable[[Rows], None]:
    def corrupt(rows: Rows) -> None:
        rows["train"][8]["response"] += text

    return corrupt


def _eval_overlap(rows: Rows) -> None:
    # An eval prompt in train, up to case and spacing: the eval score would measure memory.
    rows["train"][9]["prompt"] = "  " + rows["eval"][0]["prompt"].upper().replace(" ", "  ")


def _wrong_schema(rows: Rows) -> None:
    # A mis-mapped export: the text columns under other names.
    for row in rows["train"]:
        row["question"], row["answer"] = row.pop("prompt"), row.pop("response")


def _wrong_types(rows: Rows) -> None:
    rows["train"][10]["prompt"] = 12345


def _unknown_intent(rows: Rows) -> None:
    rows["train"][11]["intent"] = "billing"


def _unknown_policy(rows: Rows) -> None:
    rows["holdout"][2]["policy_version"] = "v9"


def _mojibake(rows: Rows) -> None:
    # Text that went through a wrong decoding upstream: U+FFFD and a control character.
    rows["train"][12]["response"] = rows["train"][12]["response"].replace(" ", " \ufffd\x07", 1)


ROW_KINDS: tuple[RowKind, ...] = (
    RowKind("nulls", ("prompt_not_empty",), _nulls),
    RowKind("empty-split", ("min_rows",), _empty_split),
    RowKind("empty-response", ("response_not_empty",), _empty_response),
    RowKind("oversize-prompt", ("prompt_token_budget",), _oversize_prompt),
    RowKind("oversize-response", ("response_token_budget",), _oversize_response),
    RowKind("duplicate-rows", ("unique_ids", "unique_pairs"), _duplicate_rows),
    RowKind("pii-email", ("response_no_pii",), _pii(" Write to jane.doe@example.com for help."), "email"),
    RowKind("pii-phone", ("response_no_pii",), _pii(" Call us on +1 (415) 555-2671."), "phone"),
    RowKind("pii-card", ("response_no_pii",), _pii(" The card 4111 1111 1111 1111 is on file."), "card"),
    RowKind("pii-iban", ("response_no_pii",), _pii(" Refunds go to DE89 3704 0044 0532 0130 00."), "iban"),
    RowKind("eval-overlap", ("no_eval_leak",), _eval_overlap),
    RowKind(
        "wrong-schema",
        # The renamed columns fail `columns`; every check that reads them is reported as not evaluated.
        (
            "columns",
            "facts_in_response",
            "no_eval_leak",
            "prompt_not_empty",
            "prompt_token_budget",
            "response_no_pii",
            "response_not_empty",
            "response_token_budget",
            "unique_pairs",
            "valid_text",
        ),
        _wrong_schema,
    ),
    RowKind("wrong-types", ("column_types",), _wrong_types),
    RowKind("unknown-intent", ("known_intent",), _unknown_intent),
    RowKind("unknown-policy", ("known_policy_version",), _unknown_policy),
    RowKind("mojibake", ("valid_text",), _mojibake),
)


def corrupted(clean: Rows, kind: RowKind) -> Rows:
    """A corrupted deep copy of ``clean``."""
    rows = copy.deepcopy(clean)
    kind.corrupt(rows)
    return rows


# Files ----------------------------------------------------------------------------------------


def _jsonl(rows: Sequence[Mapping], end: str = "\n") -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + end for row in rows)


def _latin1(rows: Sequence[Mapping], folder: Path) -> Path:
    # A spreadsheet export in Windows-1252/Latin-1: "à" is the single byte 0xE0, not UTF-8.
    rows = [dict(rows[0], response=rows[0]["response"] + " Merci, à bientôt."), *rows[1:]]
    file = folder / "latin1.jsonl"
    file.write_bytes(_jsonl(rows).encode("latin-1"))
    return file


def _truncated(rows: Sequence[Mapping], folder: Path) -> Path:
    # A copy that stopped mid-row (disk full, interrupted transfer).
    data = _jsonl(rows).encode()
    file = folder / "truncated.jsonl"
    file.write_bytes(data[: len(data) - len(json.dumps(rows[-1])) // 2])
    return file


def _json_array(rows: Sequence[Mapping], folder: Path) -> Path:
    file = folder / "array.json"
    file.write_text(json.dumps(list(rows), ensure_ascii=False, indent=1), encoding="utf-8")
    return file


def _bom_crlf(rows: Sequence[Mapping], folder: Path) -> Path:
    # What a Windows editor saves: a UTF-8 byte-order mark and CRLF line ends. Nothing is wrong.
    file = folder / "windows.jsonl"
    file.write_bytes(b"\xef\xbb\xbf" + _jsonl(rows, end="\r\n").encode("utf-8"))
    return file


FILE_KINDS: tuple[FileKind, ...] = (
    FileKind("bad-encoding", r"not UTF-8 text \(byte 0x[89a-f][0-9a-f]\)", _latin1),
    FileKind("truncated-file", r":\d+: not valid JSON", _truncated),
    FileKind("json-array", r"holds a JSON array; a dataset file is JSON Lines", _json_array),
    FileKind("bom-crlf", None, _bom_crlf),
)
