"""The foundation commands as a new user runs them: the real `flywheel` console script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

FLYWHEEL = str(Path(sys.executable).with_name("flywheel"))


def _run(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("FLYWHEEL_HOME", None)
    return subprocess.run(
        [FLYWHEEL, "--home", str(home), *args], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    home = tmp_path_factory.mktemp("cli") / "home"
    first = _run(home, "data", "seed", "--json")
    assert first.returncode == 0, first.stderr
    return home, json.loads(first.stdout)


def test_help_lists_the_commands():
    result = subprocess.run([FLYWHEEL, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for command in ("data", "model"):
        assert command in result.stdout


def test_seed_is_large_deterministic_and_split_by_template(seeded):
    home, ref = seeded
    assert ref["rows"] >= 2000 and set(ref["splits"]) == {"train", "eval", "holdout"}
    again = _run(home, "data", "seed", "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["sha256"] == ref["sha256"]
    folder = home / "datasets" / ref["sha256"]
    templates = {}
    intents = set()
    for split in ("train", "eval", "holdout"):
        rows = [json.loads(line) for line in (folder / f"{split}.jsonl").read_text().splitlines()]
        templates[split] = {r["source"] for r in rows}
        intents |= {r["intent"] for r in rows}
    assert len(intents) >= 8
    assert not templates["train"] & templates["eval"] and not templates["train"] & templates["holdout"]
    assert not templates["eval"] & templates["holdout"]


def test_validate_passes_the_seed(seeded):
    home, ref = seeded
    result = _run(home, "data", "validate")
    assert result.returncode == 0, result.stdout + result.stderr
    as_json = _run(home, "data", "validate", ref["sha256"][:12], "--json")
    report = json.loads(as_json.stdout)
    assert as_json.returncode == 0 and report["success"] is True
    assert Path(report["data_docs_uri"].removeprefix("file://")).exists()


def test_validate_rejects_a_corrupted_copy_naming_each_problem(seeded, tmp_path):
    home, ref = seeded
    copy = tmp_path / "copy"
    shutil.copytree(home / "datasets" / ref["sha256"], copy)
    train = copy / "train.jsonl"
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    rows[3]["response"] += " Write to jane.doe@example.com for help."
    rows.append(dict(rows[10]))  # one duplicated (prompt, response) pair
    rows[20]["response"] = ""
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))

    result = _run(home, "data", "validate", str(copy), "--json")
    assert result.returncode == 1, result.stderr
    failed = {r["name"] for r in json.loads(result.stdout)["results"] if not r["success"]}
    assert {"response_no_pii", "unique_pairs", "response_not_empty"} <= failed
    human = _run(home, "data", "validate", str(copy))
    assert human.returncode == 1
    for name in ("response_no_pii", "unique_pairs", "response_not_empty"):
        assert name in human.stdout


def test_errors_are_one_line_without_traceback(seeded):
    home, _ = seeded
    missing = _run(home, "data", "validate", "no-such-dataset")
    assert missing.returncode == 2
    assert "Traceback" not in missing.stderr and "no dataset matches" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1


def test_init_base_loads_offline_with_auto_classes(tmp_path):
    home = tmp_path / "home"
    result = _run(home, "model", "init-base", "--json")
    assert result.returncode == 0, result.stderr
    path = json.loads(result.stdout)["path"]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert (Path(path) / "model.safetensors").exists()
    assert tokenizer.eos_token is not None and model.config.vocab_size == len(tokenizer)
    ids = tokenizer("How long do I have to return the jacket?", return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape[-1] == len(tokenizer)
