"""The training loop as a new user drives it: seed, init-base, train, promote, models, rollback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

FLYWHEEL = str(Path(sys.executable).with_name("flywheel"))


def _run(home: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for var in [v for v in env if v.startswith("FLYWHEEL_")]:
        env.pop(var)
    return subprocess.run(
        [FLYWHEEL, "--home", str(home), *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def _ok(result: subprocess.CompletedProcess, code: int = 0) -> dict | list:
    assert result.returncode == code, f"exit {result.returncode}\n{result.stdout}\n{result.stderr[-3000:]}"
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A home where the default loop ran: seed, init-base, train on 2 Ray workers."""
    home = tmp_path_factory.mktemp("loop") / "home"
    ref = _ok(_run(home, "data", "seed", "--json"))
    _ok(_run(home, "model", "init-base", "--json"))
    result = _ok(_run(home, "train", "--workers", "2", "--json"))
    return home, ref, result


def test_train_logs_a_run_with_curves_and_registers_a_challenger(trained):
    from mlflow import MlflowClient

    home, ref, result = trained
    assert result["dataset_sha256"] == ref["sha256"] and result["version"] == "1"
    client = MlflowClient(f"sqlite:///{home / 'mlflow' / 'mlflow.db'}")
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) > 10
    assert run.data.metrics["eval_loss"] < run.data.metrics["base_eval_loss"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert any(p.endswith(".png") for p in artifacts) or any(
        a.path.endswith(".png") for p in artifacts for a in client.list_artifacts(run.info.run_id, p)
    )
    models = _ok(_run(home, "models", "--json"))
    assert [m["aliases"] for m in models] == [["challenger"]]


def test_promote_makes_it_champion_and_models_shows_lineage(trained):
    home, ref, result = trained
    decision = _ok(_run(home, "promote", "--json"))
    assert decision["promoted"] is True and decision["version"] == "1"
    (model,) = _ok(_run(home, "models", "--json"))
    assert model["aliases"] == ["champion"]
    assert model["dataset_sha256"] == ref["sha256"] and model["run_id"] == result["run_id"]
    assert model["metrics"]["fact_accuracy"] >= 0.5
    # Promoting the champion again changes nothing.
    again = _ok(_run(home, "promote", "--version", "1", "--json"))
    assert again["promoted"] is True
    assert [m["aliases"] for m in _ok(_run(home, "models", "--json"))] == [["champion"]]
    human = _run(home, "models")
    assert human.returncode == 0 and "champion" in human.stdout


def test_a_worse_candidate_is_rejected_and_the_champion_stays(trained):
    home, _, _ = trained
    worse = _ok(_run(home, "train", "--max-steps", "2", "--no-ray", "--json"))
    rejected = _run(home, "promote", "--version", worse["version"], "--json")
    decision = _ok(rejected, code=3)
    assert decision["promoted"] is False and any(r.startswith("FAIL") for r in decision["reasons"])
    aliases = {m["version"]: m["aliases"] for m in _ok(_run(home, "models", "--json"))}
    assert aliases["1"] == ["champion"] and "champion" not in aliases[worse["version"]]
    # Nothing to roll back to: one clear line, no traceback.
    rollback = _run(home, "rollback")
    assert rollback.returncode == 2 and "Traceback" not in rollback.stderr
    assert len(rollback.stderr.strip().splitlines()) == 1


def test_a_policy_change_trains_a_new_champion_and_rollback_restores_the_old(trained):
    home, _, _ = trained
    v2 = _ok(_run(home, "data", "seed", "--policy", "v2", "--json"))
    # The champion fine-tuned further on the new data, as the feedback loop retrains.
    further = ["--init-from", "champion", "--params-json", '{"max_steps": 300, "learning_rate": 0.002}']
    candidate = _ok(_run(home, "train", "--workers", "2", *further, "--json"))
    assert candidate["dataset_sha256"] == v2["sha256"] and candidate["steps"] == 300
    # Scored on the new policy's data, the old champion states stale facts: the candidate wins.
    decision = _ok(_run(home, "promote", "--version", candidate["version"], "--json"))
    assert decision["promoted"] is True and decision["previous_champion"] == "1"
    report = _ok(_run(home, "evaluate", "--version", "champion", "--json"))
    assert report["candidate"]["version"] == candidate["version"] and report["champion"] is None
    aliases = {m["version"]: m["aliases"] for m in _ok(_run(home, "models", "--json"))}
    assert aliases["1"] == ["previous"] and aliases[candidate["version"]] == ["champion"]

    back = _ok(_run(home, "rollback", "--json"))
    assert back["version"] == "1"
    aliases = {m["version"]: m["aliases"] for m in _ok(_run(home, "models", "--json"))}
    assert aliases["1"] == ["champion"] and "champion" not in aliases[candidate["version"]]


def test_bad_params_are_a_clear_error(trained, tmp_path):
    home, _, _ = trained
    params = tmp_path / "params.yaml"
    params.write_text("learning_rate: -1\n")
    result = _run(home, "train", "--params", str(params))
    assert result.returncode == 2 and "learning_rate" in result.stderr and "Traceback" not in result.stderr
