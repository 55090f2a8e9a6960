"""The SFT data suite (Great Expectations): a clean seed passes, each corruption fails exactly its check."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from components.validate import DataValidationError, format_report, validate, validate_or_raise

pytestmark = pytest.mark.data

Rows = dict[str, list[dict]]


def _failures(report, name: str) -> list:
    return [r for r in report.results if r.name == name and not r.success]


def test_clean_seed_passes_and_writes_data_docs(seed_ref, settings, tokenizer):
    report = validate(seed_ref, None, settings, tokenizer)

    assert report.success, format_report(report)
    assert report.failed == []
    assert report.dataset_sha256 == seed_ref.sha256
    assert {r.split for r in report.results} == {"train", "eval", "holdout"}
    assert {r.name for r in report.results} >= {
        "columns",
        "response_no_pii",
        "no_eval_leak",
        "facts_in_response",
    }
    docs = Path(report.data_docs_uri.removeprefix("file://"))
    assert docs.is_file() and docs.name == "index.html"
    assert docs.is_relative_to(settings.data_docs_dir / seed_ref.sha256)
    assert "sft-train" in docs.read_text()
    assert format_report(report).startswith(f"dataset {seed_ref.sha256[:12]}: passed")


def test_default_tokenizer_comes_from_the_settings_base_model(seed_ref, settings, base_model_dir):
    settings = settings.model_copy(update={"base_model": str(base_model_dir)})
    assert validate(seed_ref, None, settings).success


def test_revalidating_rewrites_the_same_data_docs(seed_ref, settings, tokenizer, rows):
    rows["train"][0]["response"] = ""
    first = validate(seed_ref, rows, settings, tokenizer)
    second = validate(seed_ref, None, settings, tokenizer)

    assert not first.success and second.success
    assert first.data_docs_uri == second.data_docs_uri
    pages = list((settings.data_docs_dir / seed_ref.sha256 / "validations").rglob("*.html"))
    assert len(pages) == 3  # one per split: the earlier run's pages are gone


# One corruption per expectation -------------------------------------------------------------
# Each returns (split, needle): the split whose result must fail and what its sample must name.


def _blank_prompt(rows: Rows):
    rows["train"][3]["prompt"] = "   \n"
    return "train", rows["train"][3]["id"]


def _null_prompt(rows: Rows):
    rows["eval"][3]["prompt"] = None
    return "eval", rows["eval"][3]["id"]


def _empty_response(rows: Rows):
    rows["holdout"][2]["response"] = ""
    return "holdout", rows["holdout"][2]["id"]


def _long_prompt(rows: Rows):
    rows["train"][5]["prompt"] = "Where is my order for the jacket, and when will it arrive? " * 30
    return "train", rows["train"][5]["id"]


def _long_response(rows: Rows):
    rows["train"][6]["response"] += " Thank you for shopping with us, we hope to see you again." * 30
    return "train", rows["train"][6]["id"]


def _duplicate_pair(rows: Rows):
    rows["holdout"].append(dict(rows["holdout"][7], id="copy-of-holdout-7"))
    return "holdout", "copy-of-holdout-7"


def _duplicate_id(rows: Rows):
    rows["eval"][5]["id"] = rows["eval"][4]["id"]
    return "eval", rows["eval"][4]["id"]


def _pii(suffix: str) -> Callable[[Rows], tuple[str, str]]:
    def corrupt(rows: Rows):
        rows["train"][8]["response"] += suffix
        return "train", rows["train"][8]["id"]

    return corrupt


def _control_char(rows: Rows):
    rows["train"][9]["prompt"] += "\x07"
    return "train", rows["train"][9]["id"]


def _replacement_char(rows: Rows):
    rows["eval"][9]["response"] = rows["eval"][9]["response"].replace(" ", " \ufffd", 1)
    return "eval", rows["eval"][9]["id"]


def _lone_surrogate(rows: Rows):
    rows["train"][9]["prompt"] += " \ud800"  # what json.loads makes of a "\ud800" escape
    return "train", rows["train"][9]["id"]


def _number_prompt(rows: Rows):
    rows["train"][14]["prompt"] = 12345
    return "train", rows["train"][14]["id"]


def _object_response(rows: Rows):
    rows["eval"][14]["response"] = {"text": rows["eval"][14]["response"]}
    return "eval", rows["eval"][14]["id"]


def _unknown_intent(rows: Rows):
    rows["train"][10]["intent"] = "billing"
    return "train", rows["train"][10]["id"]


def _null_intent(rows: Rows):
    rows["train"][10]["intent"] = None
    return "train", rows["train"][10]["id"]


def _unknown_policy(rows: Rows):
    rows["holdout"][10]["policy_version"] = "v3"
    return "holdout", rows["holdout"][10]["id"]


def _eval_prompt_in_train(rows: Rows):
    # Same prompt up to case and whitespace: normalization must still see the leak.
    rows["train"][11]["prompt"] = "  " + rows["eval"][0]["prompt"].upper().replace(" ", "  ") + "\n"
    return "train", rows["train"][11]["id"]


def _holdout_prompt_in_train(rows: Rows):
    rows["train"][12]["prompt"] = rows["holdout"][0]["prompt"]
    return "train", rows["train"][12]["id"]


def _fact_missing(rows: Rows):
    rows["train"][13]["response"] = "Please contact our support team for the details."
    return "train", rows["train"][13]["id"]


def _facts_not_a_list(rows: Rows):
    rows["eval"][13]["facts"] = rows["eval"][13]["facts"][0]
    return "eval", rows["eval"][13]["id"]


def _missing_column(rows: Rows):
    for row in rows["train"]:
        del row["source"]
    return "train", {"column": "source", "problem": "missing"}


def _extra_column(rows: Rows):
    for row in rows["eval"]:
        row["notes"] = "exported by hand"
    return "eval", {"column": "notes", "problem": "unexpected"}


CASES = {
    "missing-column": ("columns", _missing_column),
    "extra-column": ("columns", _extra_column),
    "blank-prompt": ("prompt_not_empty", _blank_prompt),
    "null-prompt": ("prompt_not_empty", _null_prompt),
    "empty-response": ("response_not_empty", _empty_response),
    "long-prompt": ("prompt_token_budget", _long_prompt),
    "long-response": ("response_token_budget", _long_response),
    "duplicate-pair": ("unique_pairs", _duplicate_pair),
    "duplicate-id": ("unique_ids", _duplicate_id),
    "pii-email": ("response_no_pii", _pii(" Write to jane.doe@example.com for help.")),
    "pii-phone": ("response_no_pii", _pii(" Call us on +1 (415) 555-2671.")),
    "pii-card": ("response_no_pii", _pii(" The card 4111 1111 1111 1111 is on file.")),
    "pii-iban": ("response_no_pii", _pii(" Refunds go to DE89 3704 0044 0532 0130 00.")),
    "control-char": ("valid_text", _control_char),
    "replacement-char": ("valid_text", _replacement_char),
    "lone-surrogate": ("valid_text", _lone_surrogate),
    "number-prompt": ("column_types", _number_prompt),
    "object-response": ("column_types", _object_response),
    "unknown-intent": ("known_intent", _unknown_intent),
    "null-intent": ("known_intent", _null_intent),
    "unknown-policy": ("known_policy_version", _unknown_policy),
    "eval-leak": ("no_eval_leak", _eval_prompt_in_train),
    "holdout-leak": ("no_eval_leak", _holdout_prompt_in_train),
    "fact-missing": ("facts_in_response", _fact_missing),
    "facts-not-a-list": ("facts_in_response", _facts_not_a_list),
}


@pytest.mark.parametrize(("name", "corrupt"), list(CASES.values()), ids=list(CASES))
def test_each_corruption_fails_exactly_its_expectation(seed_ref, settings, tokenizer, rows, name, corrupt):
    split, needle = corrupt(rows)

    report = validate(seed_ref, rows, settings, tokenizer)

    assert not report.success
    assert report.failed == [name], format_report(report)
    (failure,) = _failures(report, name)
    assert failure.split == split
    assert failure.unexpected_count >= 1 and failure.note is None
    assert 1 <= len(failure.sample) <= 5
    if isinstance(needle, dict):
        assert needle in failure.sample
    else:
        assert needle in [entry["id"] for entry in failure.sample]
    json.loads(report.model_dump_json())  # samples stay JSON-safe, surrogates included


def test_pii_sample_names_the_kind_not_the_value(seed_ref, settings, tokenizer, rows):
    _pii(" Mail jane.doe@example.com or call +44 20 7946 0958.")(rows)
    (failure,) = _failures(validate(seed_ref, rows, settings, tokenizer), "response_no_pii")
    assert failure.sample[0]["value"] == "email, phone"
    assert failure.expectation == "expect_column_values_to_be_null"


def test_combined_corruptions_are_all_reported_and_raise(seed_ref, settings, tokenizer, rows):
    rows["train"][20]["response"] += " Questions? jane.doe@example.com"
    rows["train"].append(dict(rows["train"][21], id="copy-of-train-21"))
    rows["train"][22]["response"] = ""
    empty_id = rows["train"][22]["id"]

    report = validate(seed_ref, rows, settings, tokenizer)

    assert report.success is False
    assert sorted(report.failed) == ["response_no_pii", "response_not_empty", "unique_pairs"]
    assert empty_id in [entry["id"] for entry in _failures(report, "response_not_empty")[0].sample]
    text = format_report(report)
    assert all(name in text for name in report.failed) and empty_id in text

    with pytest.raises(DataValidationError) as caught:
        validate_or_raise(seed_ref, rows, settings, tokenizer)
    assert caught.value.report.failed == report.failed
    assert all(name in str(caught.value) for name in report.failed)


def test_validate_or_raise_returns_the_report_of_clean_data(seed_ref, settings, tokenizer):
    assert validate_or_raise(seed_ref, None, settings, tokenizer).success


# Structure problems: reported, never raised ---------------------------------------------------


def test_missing_column_fails_columns_and_only_the_checks_that_need_it(seed_ref, settings, tokenizer, rows):
    for row in rows["train"]:
        del row["response"]

    report = validate(seed_ref, rows, settings, tokenizer)

    failed = [r for r in report.results if not r.success]
    assert {r.split for r in failed} == {"train"}
    assert set(report.failed) == {
        "columns",
        "response_not_empty",
        "response_token_budget",
        "unique_pairs",
        "response_no_pii",
        "valid_text",
        "facts_in_response",
    }
    (columns,) = _failures(report, "columns")
    assert columns.sample == [{"column": "response", "problem": "missing"}] and columns.note is None
    for result in failed:
        if result.name != "columns":
            assert result.note == "not evaluated: missing column response", result
            assert result.unexpected_count == 0
    # The prompt-side half of valid_text still ran, and passed.
    assert [r.success for r in report.results if r.name == "valid_text" and r.split == "train"] == [
        True,
        False,
    ]


def test_missing_eval_prompts_block_the_leak_check(seed_ref, settings, tokenizer, rows):
    for row in rows["eval"]:
        del row["prompt"]

    report = validate(seed_ref, rows, settings, tokenizer)

    (leak,) = _failures(report, "no_eval_leak")
    assert leak.split == "train" and leak.note == "not evaluated: missing column prompt in eval"
    assert {r.split for r in report.results if not r.success} == {"train", "eval"}


def test_malformed_rows_are_reported_not_raised(seed_ref, settings, tokenizer, rows):
    rows["holdout"][0] = ["not", "an", "object"]
    rows["holdout"][1]["prompt"] = 12345
    rows["holdout"][2]["facts"] = {"return_window": "30 days"}
    del rows["holdout"][3]["facts"]

    report = validate(seed_ref, rows, settings, tokenizer)

    assert "columns" not in report.failed  # every column still exists in some row
    prompt = _failures(report, "prompt_not_empty")[0]
    assert prompt.sample == [{"id": None, "row": 0, "value": None}]  # the non-object row
    (types,) = _failures(report, "column_types")  # a number is a type error, not an empty prompt
    assert types.sample == [{"id": rows["holdout"][1]["id"], "row": 1, "value": "prompt: number"}]
    facts = _failures(report, "facts_in_response")[0]
    assert {entry["id"] for entry in facts.sample} == {rows["holdout"][2]["id"], rows["holdout"][3]["id"]}
    assert "row 0" in format_report(report)
    json.loads(report.model_dump_json())


def test_train_only_dataset_passes_without_eval_splits(seed_ref, settings, tokenizer, rows):
    report = validate(seed_ref, {"train": rows["train"]}, settings, tokenizer)

    assert report.success
    assert {r.split for r in report.results} == {"train"}


def test_an_empty_split_fails_min_rows(seed_ref, settings, tokenizer, rows):
    rows["holdout"] = []
    rows["eval"] = rows["eval"][:4]

    report = validate(seed_ref, rows, settings, tokenizer)

    assert report.failed == ["min_rows"], format_report(report)
    assert [(r.split, r.sample) for r in _failures(report, "min_rows")] == [
        ("eval", [{"rows": 4, "min_rows": 5}]),
        ("holdout", [{"rows": 0, "min_rows": 5}]),
    ]
    assert "[holdout]: 0 rows, at least 5 required" in format_report(report)
    relaxed = settings.model_copy(update={"min_eval_rows": 0})
    assert validate(seed_ref, rows, relaxed, tokenizer).success


# Files as a user has them -------------------------------------------------------


def test_an_empty_dataset_file_is_rejected(tmp_path, settings, tokenizer):
    from components.data import open_dataset

    (tmp_path / "empty.jsonl").write_text("")
    ref, rows = open_dataset(str(tmp_path / "empty.jsonl"), tmp_path)

    report = validate(ref, rows, settings, tokenizer)

    assert report.failed == ["min_rows"], format_report(report)
    assert _failures(report, "min_rows")[0].sample == [{"rows": 0, "min_rows": settings.min_train_rows}]


def test_a_utf8_file_with_a_bom_and_crlf_passes(tmp_path, settings, tokenizer, rows):
    from components.data import open_dataset

    file = tmp_path / "export.jsonl"
    file.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\r\n" for r in rows["train"]).encode())
    ref, read = open_dataset(str(file), tmp_path)

    report = validate(ref, read, settings, tokenizer)

    assert report.success, format_report(report)
    assert read["train"] == rows["train"]


def test_validation_error_is_a_rejection_that_carries_its_report(seed_ref, settings, tokenizer, rows):
    from components.errors import Rejected

    rows["train"][0]["response"] = ""
    with pytest.raises(Rejected) as caught:
        validate_or_raise(seed_ref, rows, settings, tokenizer)
    assert isinstance(caught.value, DataValidationError) and caught.value.exit_code == 1
    assert caught.value.report.failed == ["response_not_empty"]


def test_a_third_policy_version_seeds_and_validates_with_no_code_change(tmp_path, settings, tokenizer):
    """A policy version added to a copy of the corpus data is generated and accepted by validation."""
    from importlib import resources

    import yaml

    from components.data import generate_corpus, load_corpus, snapshot

    folder = tmp_path / "corpus"
    folder.mkdir()
    for name in ("policies.yaml", "intents.yaml", "slots.yaml"):
        (folder / name).write_text((resources.files("components") / "corpus" / name).read_text())
    policies = yaml.safe_load((folder / "policies.yaml").read_text())
    policies["policies"]["v3"] = {
        **policies["policies"]["v2"],
        "return_window": "90 days",
        "warranty": "36 months",
    }
    (folder / "policies.yaml").write_text(yaml.safe_dump(policies, sort_keys=False))
    settings = settings.model_copy(update={"corpus_dir": folder})

    ref = snapshot(generate_corpus(600, "v3", 0, load_corpus(settings.corpus_dir)), settings.datasets_dir)
    report = validate(ref, None, settings, tokenizer)

    assert report.success, format_report(report)
    assert ref.policy_version == "v3"
    shipped = validate(ref, None, settings.model_copy(update={"corpus_dir": None}), tokenizer)
    assert shipped.failed == ["known_policy_version"]  # the shipped data knows no v3
