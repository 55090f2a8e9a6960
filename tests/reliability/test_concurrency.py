"""Concurrency on one home and one registry: train + promote sequences at once, and racing promotions.

Two scenarios on one flywheel home (SQLite MLflow store, the home's lock files):

- Three train + promote sequences started at once as separate processes
  (``tests/reliability/trainfixtures.py``: ``pipeline.train_and_register`` then
  ``pipeline.promote``, evaluating first): two with the same params and data (one run must come
  of them) and one with another seed (a second run). Which one wins the champion depends on
  timing; what must hold does not.
- Promotions racing in threads, several rounds, each under a registered-model name of its own:
  a champion, then two candidates evaluated against it promoted at the same moment (one of
  them twice), together with a re-run of the promotion that made the champion (a retried old
  DAG run), which is run once more after the race. Reports are recorded data with equal scores,
  so the gate passes both candidates: only the registry's locking decides. The first to move
  the champion wins; every other promotion was evaluated against a champion that is gone and
  must be refused, without marking the old champion (now ``previous``) rejected.

Invariants checked on the registry after each scenario, and recorded as figures: never two
versions for one run; ``champion`` and ``previous`` never on a version the gate rejected;
``previous`` always the champion the current one replaced, and every alias move replaces the
champion of the move before it. (``challenger`` marks the latest registered candidate whether
or not it was gated: a rejected candidate keeps it, as tests/model/test_registry.py requires.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.reliability.trainfixtures import tiny_params

pytestmark = [pytest.mark.reliability]

SEQUENCE_TIMEOUT_S = 400
RACE_ROUNDS = 5


@pytest.fixture(scope="module")
def shared_home(tmp_path_factory: pytest.TempPathFactory, base_model_dir: Path, corpus):
    """(settings, dataset sha256) of one home every sequence of this module works on."""
    from components.data import snapshot
    from components.settings import Settings

    settings = Settings(
        home=tmp_path_factory.mktemp("concurrency") / "home", base_model=str(base_model_dir), _env_file=None
    )
    settings.ensure_home()
    return settings, snapshot(corpus, settings.datasets_dir).sha256


def _client(settings):
    from mlflow import MlflowClient

    return MlflowClient(settings.tracking_uri, registry_uri=settings.tracking_uri)


def _violations(settings, moves: list[dict]) -> dict[str, int]:
    """Broken invariants of the registry under ``settings.model_name``, after ``moves`` (decisions that moved it)."""
    from components import registry

    client = _client(settings)
    name = settings.model_name
    aliases = {a: str(v) for a, v in client.get_registered_model(name).aliases.items()}
    versions = client.search_model_versions(f"name = '{name}'")
    tags = {str(mv.version): mv.tags for mv in versions}
    by_run: dict[str, list[str]] = defaultdict(list)
    for mv in versions:
        by_run[mv.run_id].append(str(mv.version))

    rejected_aliases = sum(
        tags[aliases[a]].get(registry.TAG_PROMOTED) != "true"
        for a in ("champion", "previous")
        if a in aliases
    )
    chain = sorted(moves, key=lambda d: d["decided_at"])
    broken_chain = sum(
        d["previous_champion"] != (chain[i - 1]["version"] if i else None) for i, d in enumerate(chain)
    )
    champion = aliases.get("champion")
    replaced = (tags[champion].get(registry.TAG_REPLACED) or None) if champion else None
    last = chain[-1] if chain else None
    previous_wrong = int(
        aliases.get("previous") != replaced
        or (last is not None and (champion, replaced) != (last["version"], last["previous_champion"]))
    )
    return {
        "versions per run (most)": max(map(len, by_run.values()), default=0),
        "champion/previous on a rejected version": rejected_aliases,
        "previous not the last champion": previous_wrong + broken_chain,
    }


def _record(figures, violations: dict[str, int]) -> None:
    for name, value in violations.items():
        goal = 1 if name.startswith("versions per run") else 0
        figures.record(name, value, goal=str(goal), ok=value == goal)


def _moved(decision: dict) -> bool:
    """Whether a decision moved ``champion`` (a promotion that was not a no-op)."""
    return decision["promoted"] and not decision["checks"].get("already_champion")


def test_train_and_promote_sequences_at_once_keep_the_registry_consistent(shared_home, tmp_path, figures):
    settings, sha = shared_home
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    seeds = (1, 1, 2)  # two sequences of the same params and data, one of another seed
    procs = []
    try:
        for n, seed in enumerate(seeds):
            out = (tmp_path / f"sequence-{n}.out").open("w")
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "tests.reliability.trainfixtures",
                        str(settings.home),
                        str(settings.base_model),
                        sha,
                        str(seed),
                    ],
                    cwd=REPO_ROOT,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )  # fmt: skip
            )
            out.close()
        codes = [proc.wait(timeout=SEQUENCE_TIMEOUT_S) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
    outputs = [(tmp_path / f"sequence-{n}.out").read_text() for n in range(len(seeds))]
    assert codes == [0] * len(seeds), [o[-3000:] for o in outputs]
    done = [json.loads(o.strip().splitlines()[-1]) for o in outputs]

    # The same params and data are one run and one version, whoever trained it.
    assert done[0]["run_id"] == done[1]["run_id"] and done[0]["version"] == done[1]["version"]
    assert sorted(d["reused"] for d in done[:2]) == [False, True]
    assert done[2]["run_id"] != done[0]["run_id"] and done[2]["version"] != done[0]["version"]
    moves = [d["decision"] for d in done if _moved(d["decision"])]
    assert moves, [d["decision"]["reasons"] for d in done]  # the first promotion has no champion to beat

    violations = _violations(settings, moves)
    figures.record(
        "sequences finished", sum(c == 0 for c in codes), goal=str(len(seeds)), ok=codes == [0] * 3
    )
    figures.record("champion moves", len(moves), unit="", goal="1 or 2")
    _record(figures, violations)
    assert violations == {
        "versions per run (most)": 1,
        "champion/previous on a rejected version": 0,
        "previous not the last champion": 0,
    }
    assert sorted({d["version"] for d in done}) == ["1", "2"]


# Racing promotions --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def three_runs(shared_home):
    """Three finished tiny runs on the shared home (in-process), to register under many names."""
    from components.pipeline import resolve_dataset
    from components.train import train

    settings, sha = shared_home
    ref = resolve_dataset(settings, sha)
    return [
        train(ref, tiny_params(str(settings.base_model), seed), settings, use_ray=False)
        for seed in (11, 12, 13)
    ]


def _report(model: str, champion_uri: str | None):
    """An evaluation of equal scores for ``model`` against the champion (if any): every gate passes it."""
    from components.schemas import EvalReport, GenerationParams, ModelScores

    def scores(model: str, version: str | None) -> ModelScores:
        return ModelScores(
            model=model, version=version, eval_loss=1.0, perplexity=2.7, fact_accuracy=0.5, rouge_l=0.5,
            chrf=50, behavioural_pass_rate=0.5, latency_ms_p50=1.0, n_examples=1,
        )  # fmt: skip

    champion = scores(champion_uri, champion_uri.rsplit("/", 1)[1]) if champion_uri else None
    return EvalReport(
        candidate=scores(model, None), champion=champion, eval_sha256="0" * 64, generation=GenerationParams()
    )


def test_racing_promotions_move_the_champion_once_and_previous_is_the_last_champion(
    shared_home, three_runs, figures
):
    from components import registry
    from components.schemas import PromotionGate

    base, _ = shared_home
    gate = PromotionGate(min_fact_accuracy=0, min_behavioural_pass_rate=0)
    one_move = 0
    totals: dict[str, int] = defaultdict(int)
    for round_ in range(RACE_ROUNDS):
        settings = base.model_copy(update={"model_name": f"race-{round_}"})
        first, second, third = three_runs
        champion = registry.register(first, settings, eval_report=_report(first.model_uri, None))
        opening = registry.promote(champion, gate, settings)
        assert opening.promoted
        a, b = (
            registry.register(
                run, settings, eval_report=_report(run.model_uri, registry.champion_uri(settings))
            )
            for run in (second, third)
        )
        # Two candidates at once, one of them twice (a retried task), and a re-run of the promotion
        # that made the champion (an old DAG run retried): whichever lands first decides.
        racers = (a, b, a, champion)
        start = threading.Barrier(len(racers))

        def promote(version: str, start=start, settings=settings):
            start.wait()
            return registry.promote(version, gate, settings)

        with ThreadPoolExecutor(len(racers)) as pool:
            decisions = [d.model_dump(mode="json") for d in pool.map(promote, racers)]

        # The same re-run once more, now certainly after the move: refused, and `previous` keeps its record.
        decisions.append(registry.promote(champion, gate, settings).model_dump(mode="json"))
        moves = [d for d in decisions if _moved(d)]
        winner = moves[0]["version"] if len(moves) == 1 else None
        # Every refusal is for an evaluation against a champion that is gone, never of the winner.
        refused = [d for d in decisions if not d["promoted"]]
        one_move += int(
            winner in (a, b)
            and all(d["version"] != winner and not d["checks"]["same_champion"] for d in refused)
        )
        violations = _violations(settings, [opening.model_dump(mode="json"), *moves])
        for name, value in violations.items():
            totals[name] = max(totals[name], value) if name.startswith("versions") else totals[name] + value
        aliases = {
            k: str(v) for k, v in _client(settings).get_registered_model(settings.model_name).aliases.items()
        }
        assert aliases["champion"] == winner and aliases["previous"] == champion, (
            [d["reasons"] for d in decisions],
            aliases,
        )

    figures.record(
        "races with one champion move", one_move, goal=str(RACE_ROUNDS), ok=one_move == RACE_ROUNDS
    )
    _record(figures, dict(totals))
    assert one_move == RACE_ROUNDS
    assert dict(totals) == {
        "versions per run (most)": 1,
        "champion/previous on a rejected version": 0,
        "previous not the last champion": 0,
    }
