"""The support corpus generator and content-addressed snapshots."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from components.data import (
    POLICIES,
    DatasetNotFound,
    generate_corpus,
    open_dataset,
    read_split,
    snapshot,
)
from components.schemas import SFT_COLUMNS, SPLITS, Intent

pytestmark = pytest.mark.unit


def _template(row) -> str:
    return row.source.rsplit("/", 1)[-1] if hasattr(row, "source") else row["source"].rsplit("/", 1)[-1]


def test_default_size_intents_and_splits(corpus):
    assert sum(len(rows) for rows in corpus.values()) >= 2000
    assert set(corpus) == set(SPLITS)
    intents = Counter(row.intent for rows in corpus.values() for row in rows)
    assert len(intents) >= 8 and set(intents) == set(Intent)
    assert all(corpus[split] for split in SPLITS)


def test_generator_is_deterministic():
    first = generate_corpus(rows=600, policy_version="v2", seed=7)
    again = generate_corpus(rows=600, policy_version="v2", seed=7)
    other = generate_corpus(rows=600, policy_version="v2", seed=8)
    assert first == again
    assert first != other


def test_splits_share_no_phrasing_template(corpus):
    by_split = {split: {r.source for r in rows} for split, rows in corpus.items()}
    assert not by_split["train"] & by_split["eval"]
    assert not by_split["train"] & by_split["holdout"]
    assert not by_split["eval"] & by_split["holdout"]
    train_prompts = {r.prompt.lower() for r in corpus["train"]}
    assert not train_prompts & {r.prompt.lower() for r in corpus["eval"] + corpus["holdout"]}


def test_every_answer_states_its_policy_facts(corpus):
    for rows in corpus.values():
        for row in rows:
            assert row.facts, row
            assert all(fact in row.response for fact in row.facts), row


def test_policy_versions_differ_in_several_facts():
    changed = [k for k in POLICIES["v1"] if POLICIES["v1"][k] != POLICIES["v2"][k]]
    assert len(changed) >= 5
    assert POLICIES["v1"]["return_window"] == "30 days" and POLICIES["v2"]["return_window"] == "45 days"
    v2 = generate_corpus(rows=600, policy_version="v2")
    returns = [r for r in v2["train"] if r.intent == Intent.returns]
    assert returns and all("45 days" in r.response and r.policy_version == "v2" for r in returns)


def test_rows_are_unique_pairs_with_the_contract_columns(corpus):
    rows = [r for split in corpus.values() for r in split]
    assert len({(r.prompt, r.response) for r in rows}) == len(rows)
    assert len({r.id for r in rows}) == len(rows)
    assert tuple(rows[0].model_dump()) == SFT_COLUMNS


@pytest.mark.parametrize("rows", [0, 50])
def test_too_few_rows_is_a_clear_error(rows):
    with pytest.raises(ValueError, match="at least"):
        generate_corpus(rows=rows)


def test_unknown_policy_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown policy"):
        generate_corpus(policy_version="v9")


def test_snapshot_is_content_addressed_and_idempotent(tmp_path, corpus):
    ref = snapshot(corpus, tmp_path)
    folder = tmp_path / ref.sha256
    assert ref.rows == sum(map(len, corpus.values()))
    assert ref.splits == {s: len(corpus[s]) for s in SPLITS}
    assert sorted(p.name for p in folder.iterdir()) == [
        "eval.jsonl",
        "holdout.jsonl",
        "ref.json",
        "train.jsonl",
    ]
    mtime = (folder / "train.jsonl").stat().st_mtime_ns
    again = snapshot(corpus, tmp_path)
    assert again == ref  # same sha, same created_at: nothing rewritten
    assert (folder / "train.jsonl").stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [ref.sha256]  # no temp leftovers
    assert read_split(ref, "eval")[0] == corpus["eval"][0].model_dump(mode="json")


def test_snapshot_sha_changes_with_content_and_records_lineage(tmp_path, corpus):
    ref = snapshot(corpus, tmp_path)
    changed = {**corpus, "train": corpus["train"][1:]}
    child = snapshot(changed, tmp_path, parents=[ref.sha256], feedback_ids=["fb-2", "fb-1"])
    assert child.sha256 != ref.sha256
    assert child.parents == [ref.sha256] and child.feedback_ids == ["fb-1", "fb-2"]


def test_open_dataset_by_sha_prefix_folder_and_file(tmp_path, corpus):
    ref = snapshot(corpus, tmp_path)
    by_prefix, rows = open_dataset(ref.sha256[:10], tmp_path)
    assert by_prefix == ref and len(rows["train"]) == len(corpus["train"])
    assert open_dataset(str(tmp_path / ref.sha256), tmp_path)[0] == ref
    single, rows = open_dataset(str(tmp_path / ref.sha256 / "eval.jsonl"), tmp_path)
    assert single.splits == {"train": len(corpus["eval"])}


def test_open_dataset_recomputes_sha_of_an_edited_copy(tmp_path, corpus):
    ref = snapshot(corpus, tmp_path / "datasets")
    copy = tmp_path / "copy"
    copy.mkdir()
    for split in SPLITS:
        rows = read_split(ref, split)
        if split == "train":
            rows[0]["response"] = ""
        (copy / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    edited, rows = open_dataset(str(copy), tmp_path / "datasets")
    assert edited.sha256 != ref.sha256 and rows["train"][0]["response"] == ""


def test_open_dataset_errors_are_named(tmp_path):
    with pytest.raises(DatasetNotFound):
        open_dataset("deadbeef", tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"ok": 1}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        open_dataset(str(bad), tmp_path)
