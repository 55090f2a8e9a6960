"""`flywheel demo` at small size, as a user runs it: the loop learns a policy change from feedback.

One run through the real engines (Airflow `dags test`, Ray Serve over HTTP, embedded Redis,
MLflow, the feedback store), with 5 % of the feedback from one hostile key. Every assertion is
on what the run measured.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.conftest import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

FLYWHEEL = str(Path(sys.executable).with_name("flywheel"))


_OURS = ("ray", "raylet", "gcs_server", "serving", "airflow", "redis-server", "supervisord")


def _our_processes() -> dict[int, str]:
    found = {}
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if any(word in cmdline for word in _OURS):
            found[proc.pid] = cmdline
    return found


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    home = tmp_path_factory.mktemp("demo") / "home"
    before = _our_processes()
    env = {**os.environ, "FLYWHEEL_SERVE_PORT": str(free_port()), "HF_HUB_OFFLINE": "1"}
    env.pop("FLYWHEEL_HOME", None)
    # The README's run (two Ray Train workers, the default gate) with fewer users and 5 % poison.
    args = ["--users", "5", "--questions", "12", "--poison-share", "0.05", "--json"]
    result = subprocess.run(
        [FLYWHEEL, "--home", str(home), "demo", *args], capture_output=True, text=True, env=env, timeout=1500
    )
    (home.parent / "summary.json").write_text(result.stdout)  # kept for whoever reads the run
    return home, result, before


def test_the_demo_runs_and_promotes_a_new_champion(demo):
    _, result, _ = demo
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["promoted"] and summary["version_after"] != summary["version_before"]
    assert "Traceback" not in result.stderr


def test_the_new_champion_states_the_changed_facts_on_held_out_paraphrases(demo):
    summary = json.loads(demo[1].stdout)
    before, after = summary["accuracy_before"], summary["accuracy_after"]
    assert before["n_changed"] > 0 and after["n_changed"] == before["n_changed"]
    assert after["changed"] > before["changed"], (before, after)
    # The old champion states the replaced facts; the new one has dropped them, so its misses on
    # these intents are wordings it did not recognise, not the change.
    assert before["stale"] >= 0.5 and after["stale"] <= 0.1, (before, after)
    # Untouched intents: the champion is fine-tuned further, so what it knew stays (the goal:
    # at most 2 points lost over the held-out paraphrases of the intents the change left alone).
    assert after["untouched"] >= before["untouched"] - 0.02, (before, after)
    assert any("return_window" in change for change in summary["facts_changed"])


def test_poisoned_feedback_changes_no_fact_and_is_quarantined(demo):
    summary = json.loads(demo[1].stdout)
    assert not any("365 days" in change for change in summary["facts_changed"])
    assert summary["feedback_quarantined"] >= 1
    assert summary["feedback_redacted"] >= 1  # the user who left an e-mail address


def test_the_demo_leaves_nothing_running(demo):
    _, _, before = demo
    left = {pid: cmd for pid, cmd in _our_processes().items() if pid not in before}
    assert not left, left
