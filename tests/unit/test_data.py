"""The support corpus generator and content-addressed snapshots."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import yaml

import components.data as data
from components.data import DatasetNotFound, generate_corpus, open_dataset, read_split, snapshot
from components.errors import InvalidInput, NotFound
from components.schemas import SFT_COLUMNS, SPLITS

pytestmark = pytest.mark.unit


def _template(row) -> str:
    return row.source.rsplit("/", 1)[-1] if hasattr(row, "source") else row["source"].rsplit("/", 1)[-1]


def test_default_size_intents_and_splits(corpus):
    assert sum(len(rows) for rows in corpus.values()) >= 2000
    assert set(corpus) == set(SPLITS)
    intents = Counter(row.intent for rows in corpus.values() for row in rows)
    assert len(intents) >= 8 and set(intents) == set(data.intents())
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
    assert data.policy_versions()[:2] == ("v1", "v2")  # the lead's demo versions may follow
    v1, v2_facts = data.policy_facts("v1"), data.policy_facts("v2")
    changed = [k for k in v1 if v1[k] != v2_facts[k]]
    assert len(changed) >= 5
    assert v1["return_window"] == "30 days" and v2_facts["return_window"] == "45 days"
    v2 = generate_corpus(rows=600, policy_version="v2")
    returns = [r for r in v2["train"] if r.intent == "returns"]
    assert returns and all("45 days" in r.response and r.policy_version == "v2" for r in returns)


def test_rows_are_unique_pairs_with_the_contract_columns(corpus):
    rows = [r for split in corpus.values() for r in split]
    assert len({(r.prompt, r.response) for r in rows}) == len(rows)
    assert len({r.id for r in rows}) == len(rows)
    assert tuple(rows[0].model_dump()) == SFT_COLUMNS


@pytest.mark.parametrize("rows", [0, 50, 200])
def test_too_few_rows_is_a_clear_error(rows):
    with pytest.raises(
        InvalidInput, match=r"rows must be at least \d+ \(one per phrasing template of eval"
    ) as caught:
        generate_corpus(rows=rows)
    least = int(str(caught.value).split("at least ")[1].split()[0])
    # The number it names is the least that fits: one row fewer does not.
    assert sum(map(len, generate_corpus(rows=least).values())) == least
    with pytest.raises(InvalidInput):
        data.split_rows(least - 1)


def test_unknown_policy_is_a_clear_error():
    with pytest.raises(NotFound, match="unknown policy version 'v9'; known: v1, v2"):
        generate_corpus(policy_version="v9")
    with pytest.raises(NotFound, match="known: v1, v2"):
        data.policy_facts("v9")


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
    with pytest.raises(InvalidInput, match="bad.jsonl:2: not valid JSON"):
        open_dataset(str(bad), tmp_path)


# The corpus as data -------------------------------------------------------------


def _corpus_copy(tmp_path: Path) -> Path:
    """A writable copy of the shipped corpus data."""
    from importlib import resources

    folder = tmp_path / "corpus"
    folder.mkdir()
    for name in ("policies.yaml", "intents.yaml", "slots.yaml"):
        (folder / name).write_text((resources.files("components") / "corpus" / name).read_text())
    return folder


def _edit(file: Path, change) -> None:
    doc = yaml.safe_load(file.read_text())
    change(doc)
    file.write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))


def test_the_shipped_data_is_the_corpus():
    spec = data.load_corpus()
    assert spec is data.load_corpus()  # read once per process
    assert data.intents() == tuple(spec.intents) and len(spec.intents) == 11
    assert data.OUT_OF_SCOPE in spec.intents
    assert data.policy_versions() == tuple(spec.policies) and data.policy_versions()[:2] == ("v1", "v2")
    assert all(len(intent.train) >= 40 for intent in spec.intents.values())
    assert all(len(intent.eval) >= 3 and len(intent.holdout) >= 3 for intent in spec.intents.values())
    assert len(spec.items) >= 100 and sum(" " in item for item in spec.items) >= 30


def test_a_frame_split_is_where_the_data_lists_it():
    intent = data.load_corpus().intents["returns"]
    assert intent.questions == intent.train + intent.eval + intent.holdout
    splits = [intent.split_of(t) for t in range(len(intent.questions))]
    assert splits == ["train"] * len(intent.train) + ["eval"] * len(intent.eval) + ["holdout"] * len(
        intent.holdout
    )
    with pytest.raises(ValueError, match="template 99"):
        intent.split_of(99)


def test_held_out_splits_get_a_fixed_share_of_the_rows(corpus):
    # Measuring sets keep their size however many training wordings the corpus has.
    assert {s: len(rows) for s, rows in corpus.items()} == data.split_rows(2400)
    assert data.split_rows(2400) == {"train": 1680, "eval": 360, "holdout": 360}
    assert data.split_rows(4801) == {"train": 3361, "eval": 720, "holdout": 720}


def test_train_frames_vary_the_syntax_and_words():
    spec = data.load_corpus()
    for name, intent in spec.intents.items():
        # Statements and fragments as well as questions: no punctuation mark carries the intent.
        assert sum(not q.rstrip().endswith("?") for q in intent.train) >= 5, name
        first_words = {q.split()[0].lower() for q in intent.train}
        assert len(first_words) >= 12, (name, sorted(first_words))
    words = {w for q in spec.intents["returns"].train for w in q.lower().split()}
    assert {"send", "back", "return"} <= words


def test_any_number_of_templates_per_intent(tmp_path):
    folder = _corpus_copy(tmp_path)

    def reshape(doc):
        doc["intents"]["returns"]["train"] = doc["intents"]["returns"]["train"][:5]
        doc["intents"]["payment"]["eval"] += ["Can I pay for a {item} in cash?", "Do you take gift cards?"]

    _edit(folder / "intents.yaml", reshape)
    spec = data.load_corpus(folder)
    corpus = generate_corpus(rows=1200, policy_version="v1", seed=0, spec=spec)

    sources = {split: {r.source for r in rows} for split, rows in corpus.items()}
    returns = {split: sorted(s for s in found if "/returns/" in s) for split, found in sources.items()}
    n_eval, n_holdout = len(spec.intents["returns"].eval), len(spec.intents["returns"].holdout)
    assert returns == {
        "train": [f"corpus/returns/t{t:02d}" for t in range(5)],
        "eval": [f"corpus/returns/t{t:02d}" for t in range(5, 5 + n_eval)],
        "holdout": [f"corpus/returns/t{t:02d}" for t in range(5 + n_eval, 5 + n_eval + n_holdout)],
    }
    payment = {split: len([s for s in found if "/payment/" in s]) for split, found in sources.items()}
    assert payment == {s: len(getattr(spec.intents["payment"], s)) for s in SPLITS}
    assert payment["eval"] == len(data.load_corpus().intents["payment"].eval) + 2
    assert sum(map(len, corpus.values())) == 1200


def test_a_third_policy_version_is_a_data_change(tmp_path):
    folder = _corpus_copy(tmp_path)
    _edit(
        folder / "policies.yaml",
        lambda doc: doc["policies"].update(v3={**doc["policies"]["v2"], "return_window": "90 days"}),
    )
    spec = data.load_corpus(folder)

    assert data.policy_versions(spec)[-1] == "v3" and data.policy_versions(spec)[:2] == ("v1", "v2")
    v3 = generate_corpus(rows=600, policy_version="v3", seed=0, spec=spec)
    returns = [r for rows in v3.values() for r in rows if r.intent == "returns"]
    assert returns and all("90 days" in r.response and r.policy_version == "v3" for r in returns)
    ref = snapshot(v3, tmp_path / "datasets")
    assert ref.policy_version == "v3"
    with pytest.raises(NotFound):
        generate_corpus(rows=600, policy_version="v3")  # the shipped data knows no v3


@pytest.mark.parametrize(
    ("file", "change", "names"),
    [
        (
            "intents.yaml",
            lambda d: d["intents"]["returns"].update(facts=["return_windw"]),
            ["intents.yaml", "intents.returns.facts", "return_windw"],
        ),
        (
            "intents.yaml",
            lambda d: d["intents"]["refunds"]["answers"].append("Refunds are quick."),
            ["intents.yaml", "intents.refunds.answers[4]", "refund_time"],
        ),
        (
            "intents.yaml",
            lambda d: d["intents"]["warranty"].update(holdout=[]),
            ["intents.yaml", "intents.warranty.holdout", "at least 1"],
        ),
        (
            "intents.yaml",
            lambda d: d["intents"]["account"]["eval"].insert(0, "Where is my {product}?"),
            ["intents.yaml", "intents.account.eval[0]", "product"],
        ),
        (
            "intents.yaml",
            lambda d: d["intents"]["payment"].update(answers=["We accept {payment_methods}."]),
            ["intents.yaml", "intents.payment.answers", "questions with {item} need an answer with {item}"],
        ),
        (
            "intents.yaml",
            lambda d: d["intents"]["refunds"]["train"].append(
                d["intents"]["refunds"]["holdout"][0].rstrip("?")
            ),
            ["intents.yaml", "intents.refunds.holdout[0]", "duplicate of refunds.train"],
        ),
        (
            "slots.yaml",
            lambda d: d["noise"].update(typo=2),
            ["slots.yaml", "noise.typo"],
        ),
        (
            "policies.yaml",
            lambda d: d["policies"]["v2"].pop("warranty"),
            ["policies.yaml", "policies.v2", "missing warranty"],
        ),
        ("slots.yaml", lambda d: d.update(items=[]), ["slots.yaml", "items"]),
        ("slots.yaml", lambda d: d.update(closer=["!"]), ["slots.yaml", "closer"]),
    ],
    ids=[
        "unknown-fact",
        "answer-without-fact",
        "too-few-templates",
        "unknown-slot",
        "no-product-answer",
        "frame-in-two-splits",
        "noise-rate",
        "policy-key",
        "no-items",
        "typo",
    ],
)
def test_bad_corpus_data_names_the_file_and_field(tmp_path, file, change, names):
    folder = _corpus_copy(tmp_path)
    _edit(folder / file, change)
    with pytest.raises(InvalidInput) as caught:
        data.load_corpus(folder)
    assert all(name in str(caught.value) for name in names), str(caught.value)


def test_corpus_file_that_is_not_yaml_is_named(tmp_path):
    folder = _corpus_copy(tmp_path)
    (folder / "slots.yaml").write_text("items: [unclosed\n")
    with pytest.raises(InvalidInput, match="slots.yaml: not valid YAML"):
        data.load_corpus(folder)


# Paths and missing files --------------------------------------------------------


@pytest.mark.parametrize("folder", ["my home", "maison é", "100% data"])
def test_snapshot_under_a_path_that_needs_encoding_reads_back(tmp_path, corpus, folder):
    ref = snapshot(corpus, tmp_path / folder / "datasets")
    assert data.dataset_path(ref) == tmp_path / folder / "datasets" / ref.sha256
    assert len(read_split(ref, "train")) == ref.splits["train"]
    assert len(read_split(ref.uri, "eval")) == ref.splits["eval"]


def test_snapshot_in_a_relative_folder(tmp_path, corpus, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ref = snapshot(corpus, Path("datasets"))
    assert data.dataset_path(ref) == tmp_path / "datasets" / ref.sha256


def test_a_listed_split_whose_file_is_missing_is_an_error(tmp_path, corpus):
    ref = snapshot(corpus, tmp_path)
    (tmp_path / ref.sha256 / "eval.jsonl").unlink()
    with pytest.raises(DatasetNotFound, match="eval.jsonl: no such file"):
        read_split(ref, "eval")
    with pytest.raises(DatasetNotFound, match="eval.jsonl"):
        read_split(tmp_path / ref.sha256, "eval")
    with pytest.raises(DatasetNotFound, match="eval.jsonl"):
        open_dataset(ref.sha256, tmp_path)
    assert issubclass(DatasetNotFound, NotFound)


def test_a_dataset_folder_that_is_gone_is_an_error(tmp_path, corpus):
    ref = snapshot(corpus, tmp_path / "datasets")
    moved = ref.model_copy(update={"uri": (tmp_path / "elsewhere").as_uri()})
    with pytest.raises(DatasetNotFound):
        read_split(moved, "train")


def test_a_split_the_dataset_does_not_have_reads_as_no_rows(tmp_path, corpus):
    ref = snapshot({"train": corpus["train"]}, tmp_path)
    assert read_split(ref, "eval") == [] and read_split(tmp_path / ref.sha256, "holdout") == []


def test_open_dataset_of_a_missing_absolute_path(tmp_path):
    with pytest.raises(DatasetNotFound, match="no such file"):
        open_dataset(str(tmp_path / "missing.jsonl"), tmp_path)
    with pytest.raises(DatasetNotFound, match="no such file"):
        open_dataset((tmp_path / "missing dir").as_uri(), tmp_path)


def test_open_dataset_by_percent_encoded_file_uri(tmp_path, corpus):
    ref = snapshot(corpus, tmp_path / "my home é")
    assert open_dataset(ref.uri, tmp_path)[0] == ref


def test_latest_snapshot_is_the_newest_by_created_at(tmp_path, corpus):
    assert data.latest_snapshot(tmp_path / "none") is None
    first = snapshot(corpus, tmp_path)
    second = snapshot({**corpus, "train": corpus["train"][1:]}, tmp_path)
    (tmp_path / ".half-written").mkdir()  # a snapshot being written is not a candidate
    assert data.latest_snapshot(tmp_path) == second
    assert snapshot(corpus, tmp_path) == first  # same content: no new snapshot, no new date
    assert data.latest_snapshot(tmp_path) == second


# Odd files -----------------------------------------------------------------------


def _lines(rows) -> list[str]:
    return [json.dumps(r.model_dump(mode="json")) for r in rows]


def test_bom_and_crlf_files_read_like_plain_ones(tmp_path, corpus):
    lines = _lines(corpus["eval"][:20])
    plain, bom, crlf = tmp_path / "plain.jsonl", tmp_path / "bom.jsonl", tmp_path / "crlf.jsonl"
    plain.write_text("\n".join(lines) + "\n", encoding="utf-8")
    bom.write_text("\n".join(lines) + "\n", encoding="utf-8-sig")
    crlf.write_bytes(("\r\n".join(lines) + "\r\n").encode())
    expected = open_dataset(str(plain), tmp_path)
    assert open_dataset(str(bom), tmp_path)[1] == expected[1]
    assert open_dataset(str(crlf), tmp_path)[1] == expected[1]
    assert open_dataset(str(bom), tmp_path)[0].sha256 == expected[0].sha256


def test_a_json_array_file_is_a_clear_error(tmp_path, corpus):
    rows = [r.model_dump(mode="json") for r in corpus["eval"][:3]]
    for name, text in (("one-line.json", json.dumps(rows)), ("pretty.json", json.dumps(rows, indent=2))):
        (tmp_path / name).write_text(text)
        with pytest.raises(InvalidInput, match="JSON array"):
            open_dataset(str(tmp_path / name), tmp_path)


def test_a_file_that_is_not_utf8_is_a_clear_error(tmp_path):
    file = tmp_path / "latin1.jsonl"
    file.write_bytes('{"prompt": "ok"}\n{"prompt": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(InvalidInput, match="latin1.jsonl:2: not UTF-8 text"):
        open_dataset(str(file), tmp_path)


def test_line_separators_inside_strings_do_not_split_rows(tmp_path, corpus):
    row = corpus["train"][0].model_dump(mode="json")
    row["response"] += "\u2028second line\u0085"
    ref = snapshot({"train": [row]}, tmp_path)
    assert open_dataset(ref.sha256, tmp_path)[1]["train"] == [row]


def test_a_lone_surrogate_survives_a_snapshot_as_valid_utf8(tmp_path, corpus):
    row = corpus["train"][0].model_dump(mode="json")
    row["prompt"] += " \ud800"
    ref = snapshot({"train": [row]}, tmp_path)
    (tmp_path / ref.sha256 / "train.jsonl").read_bytes().decode("utf-8")  # strict: no error
    assert read_split(ref, "train") == [row]
    assert open_dataset(ref.sha256, tmp_path)[0] == ref


# Composition, products and refusals -----------------------------------------------


def test_no_frame_is_shared_across_splits(corpus):
    spec = data.load_corpus()
    frames: dict[str, set[str]] = {split: set() for split in SPLITS}
    for rows in corpus.values():
        for row in rows:
            t = int(_template(row)[1:])
            frames[spec.intents[row.intent].split_of(t)].add(spec.intents[row.intent].questions[t].lower())
    assert all(frames.values())
    assert not frames["train"] & frames["eval"] and not frames["train"] & frames["holdout"]
    assert not frames["eval"] & frames["holdout"]
    # Each source (intent/frame) lands in exactly one split, and no prompt is in two.
    split_of: dict[str, set[str]] = {}
    for split, rows in corpus.items():
        for row in rows:
            split_of.setdefault(row.source, set()).add(split)
    assert all(len(splits) == 1 for splits in split_of.values())
    prompts = [" ".join(r.prompt.lower().split()) for rows in corpus.values() for r in rows]
    assert len(set(prompts)) == len(prompts)


def test_answers_name_the_product_of_their_own_question(corpus):
    from components.evaluate import asked_product

    spec = data.load_corpus()
    items = sorted(spec.items, key=len, reverse=True)
    named = 0
    for row in (r for rows in corpus.values() for r in rows):
        frame = spec.intents[row.intent].questions[int(_template(row)[1:])]
        in_prompt = next(i for i in items if i in row.prompt.lower()) if "{item}" in frame else None
        if in_prompt and row.intent != data.OUT_OF_SCOPE:
            # The longest product named in the prompt is the one the answer names (never another).
            assert asked_product(row.prompt, row.response, items) == in_prompt, row
            assert [i for i in items if i in row.response.lower() and i not in in_prompt] == [], row
            named += 1
        else:
            assert asked_product(row.prompt, row.response, items) is None, row
    assert named > 800


def test_out_of_scope_prompts_get_the_fixed_refusal(corpus):
    refusal = data.policy_facts("v1")["refusal"]
    assert refusal == data.policy_facts("v2")["refusal"] and "human support" in refusal
    rows = [r for rows in corpus.values() for r in rows if r.intent == data.OUT_OF_SCOPE]
    assert {r.response for r in rows} == {f"Sorry, {refusal}."}
    assert all(r.facts == [refusal] for r in rows)
    assert all(
        refusal not in r.response for rows_ in corpus.values() for r in rows_ if r.intent != data.OUT_OF_SCOPE
    )
    intent = data.load_corpus().intents[data.OUT_OF_SCOPE]
    assert {intent.split_of(int(_template(r)[1:])) for r in rows} == set(SPLITS)


def test_prompts_carry_openers_closers_synonyms_and_noise(corpus):
    spec = data.load_corpus()
    prompts = [r.prompt for rows in corpus.values() for r in rows]
    plain = {q.lower() for i in spec.intents.values() for q in i.questions}
    assert sum(p == p.lower() for p in prompts) / len(prompts) > 0.1  # casing noise
    assert sum("?" not in p and "." not in p for p in prompts) / len(prompts) > 0.05  # punctuation
    assert any(p.startswith("Could I") or " Could I" in p for p in prompts)  # a synonym of "Can I"
    # A typo: a word that is in no frame, opener, closer, synonym or product.
    known = set()
    for text in [
        *plain,
        *spec.openers,
        *spec.closers,
        *spec.items,
        *(a for v in spec.synonyms.values() for a in v),
    ]:
        known.update(w.strip("?!.,:;").lower() for w in text.split())
    unknown = {w.strip("?!.,:;").lower() for p in prompts for w in p.split()} - known
    assert len(unknown) > 50, sorted(unknown)[:20]


def test_composition_is_deterministic_from_the_seed():
    import random

    spec = data.load_corpus()
    frame = spec.intents["returns"].questions[0]
    first = [data.compose_prompt(frame, "wireless mouse", spec, random.Random(3)) for _ in range(5)]
    again = [data.compose_prompt(frame, "wireless mouse", spec, random.Random(3)) for _ in range(5)]
    assert first == again and all("wireless mouse" in p.lower() for p in first)
