"""``flywheel demo``: the whole loop on embedded defaults, as a user meets it.

seed (policy v1) → ``training_pipeline`` through Airflow → champion → serving (Ray Serve, embedded
Redis) → a policy change (``v1.1``: a longer return window, a lower free-shipping threshold) →
simulated users ask through the HTTP API and correct wrong answers → ``feedback_loop`` → the
feedback dataset → ``training_pipeline`` → gate → new champion → serving reloads → ask again.
Every figure of the summary is measured on this run.

Airflow runs as its own command (``airflow dags test``): its runs land in the home's Airflow
metadata DB, so ``flywheel ui`` shows them, and ``components`` never imports Airflow.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from components.errors import FlywheelError, UsageError

if TYPE_CHECKING:
    import httpx

    from components.feedback import FeedbackBuild
    from components.settings import Settings

log = logging.getLogger(__name__)

BASE_POLICY = "v1"
NEW_POLICY = "v1.1"  # policies.yaml: v1 with return_window 45 days and free shipping over $35
_READY_TIMEOUT_S = 300
_MAX_TOKENS = 64

# on_stage(name, finished): the demo starts or finishes a stage (for a progress display).
StageFn = Callable[[str, bool], None]


class DemoOptions(BaseModel):
    """How big the demo is; the defaults are the README's main job."""

    model_config = ConfigDict(frozen=True)

    workers: int = Field(2, ge=1, description="Ray Train workers of each training run.")
    max_steps: int | None = Field(
        None, ge=1, description="Optimizer steps of the first training; None: TrainParams' default."
    )
    use_ray: bool = True
    users: int = Field(6, ge=3, description="Simulated users, each with an API key of their own.")
    questions: int = Field(16, ge=4, description="Questions each user asks.")
    poison_share: float = Field(
        0.0, ge=0, le=0.5, description="Share of feedback a single hostile key adds (malicious corrections)."
    )
    # 400: the untouched intents' figure then moves by about one point from sampling alone, so a
    # two-point loss can be told from noise (160 moved it by two).
    measure_prompts: int = Field(400, ge=10, description="Held-out paraphrases asked before and after.")
    max_examples: int = Field(200, ge=10, description="eval + holdout rows each evaluation scores.")
    gate: dict[str, Any] = Field(default_factory=dict, description="PromotionGate fields; {}: the defaults.")


class Accuracy(BaseModel):
    """Fact accuracy on held-out paraphrases, of the intents the policy change touched and of the rest."""

    changed: float
    untouched: float
    n_changed: int
    n_untouched: int
    stale: float = Field(
        0.0,
        description="Share of the changed intents' answers that still state a fact the policy replaced "
        "(what a model that missed the change says); a miss that states none is a wording it did not place.",
    )


class DemoSummary(BaseModel):
    """What one demo run measured."""

    dataset: str
    feedback_dataset: str | None
    version_before: str
    version_after: str
    promoted: bool
    changed_intents: list[str]
    facts_changed: list[str]
    accuracy_before: Accuracy
    accuracy_after: Accuracy
    requests: int
    cache_hits: int
    feedback_events: int
    feedback_used: int
    feedback_redacted: int
    feedback_quarantined: int
    feedback_review: int
    stages: dict[str, float] = Field(description="Seconds per stage, in order.")
    total_seconds: float
    serve_url: str
    airflow_home: str
    tracking_uri: str

    @property
    def cache_hit_rate(self) -> float:
        return self.cache_hits / self.requests if self.requests else 0.0


def run(settings: Settings, options: DemoOptions, on_stage: StageFn | None = None) -> DemoSummary:
    """Run the demo loop end to end and measure it.

    Args:
        settings: the home and its stores (embedded defaults unless set).
        options: sizes of the run.
        on_stage: told when each stage starts and finishes.

    Returns:
        The summary; every figure measured on this run.
    """
    from components import pipeline
    from components.data import load_corpus
    from components.feedback import RetrainPolicy

    clock = _Stages(on_stage)
    started = time.monotonic()
    spec = load_corpus(settings.corpus_dir)
    changed = changed_intents(spec)
    settings.ensure_home()
    logs = settings.home / "demo" / time.strftime("%Y%m%d-%H%M%S")
    logs.mkdir(parents=True, exist_ok=True)
    train_conf = {
        "workers": options.workers,
        "use_ray": options.use_ray,
        "max_examples": options.max_examples,
        "gate": options.gate,
    }
    if options.max_steps is not None:
        train_conf["max_steps"] = options.max_steps

    with clock("seed"):
        ref = pipeline.seed(settings, BASE_POLICY)
    airflow = _Airflow(settings, logs)
    with clock("airflow"):
        airflow.migrate()
    with clock("train v1"):
        airflow.run_dag("training_pipeline", {**train_conf, "dataset": ref.sha256}, "training-1")
    before = _champion(settings)
    if before is None:
        raise FlywheelError(f"the first training run promoted no champion; see {airflow.last_log}")

    keys = _Keys(settings)
    try:
        with _serving(settings, logs, clock) as url:
            http = _client(url)
            airflow.extra_env = {"FLYWHEEL_SERVE_URL": url, "FLYWHEEL_SERVE_ADMIN_KEY": keys.admin}
            holdout = _held_out(settings, spec, options.measure_prompts)
            with clock("ask (before)"):
                acc_before = _accuracy(http, keys.admin, holdout, changed, spec)
            with clock("users"):
                traffic = _simulate_users(http, keys, settings, options, changed)
                _post(http, "/admin/flush", keys.admin, {})
            with clock("feedback_loop"):
                airflow.run_dag("feedback_loop", {"policy": _demo_retrain_policy()}, "feedback-loop")
                build = _latest_build(settings)
            with clock("train v2"):
                retrain = RetrainPolicy(**_demo_retrain_policy())  # fine-tune the champion further
                conf = {
                    **train_conf,
                    "dataset": build.dataset.sha256,
                    "init_from": retrain.continue_from,
                    "train": retrain.retrain,
                }
                if build.replay is not None:
                    conf["replay"] = build.replay.uri
                airflow.run_dag("training_pipeline", conf, "training-2")
            after = _champion(settings) or before
            with clock("reload"):
                served = _wait_for_version(http, after)
            with clock("ask (after)"):
                acc_after = _accuracy(http, keys.admin, holdout, changed, spec)
    finally:
        keys.revoke()
    return DemoSummary(
        dataset=ref.sha256,
        feedback_dataset=build.dataset.sha256,
        version_before=before,
        version_after=served,
        promoted=after != before,
        changed_intents=sorted(changed),
        facts_changed=[f"{c.intent}.{c.fact}: {c.old} -> {c.new}" for c in build.facts_changed],
        accuracy_before=acc_before,
        accuracy_after=acc_after,
        requests=traffic["requests"],
        cache_hits=traffic["hits"],
        feedback_events=traffic["feedback"],
        feedback_used=build.counts.used,
        feedback_redacted=build.counts.redacted,
        feedback_quarantined=build.counts.quarantined,
        feedback_review=build.counts.review,
        stages=clock.seconds,
        total_seconds=time.monotonic() - started,
        serve_url=url,
        airflow_home=str(settings.airflow_home),
        tracking_uri=settings.tracking_uri,
    )


# Stages ------------------------------------------------------------------------------------


class _Stages:
    """Times each stage and tells the caller when one starts and ends."""

    def __init__(self, on_stage: StageFn | None) -> None:
        self.on_stage = on_stage
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.on_stage:
            self.on_stage(name, False)
        start = time.monotonic()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.monotonic() - start
        if self.on_stage:
            self.on_stage(name, True)


# Airflow -----------------------------------------------------------------------------------


class _Airflow:
    """``airflow`` commands on the home's metadata DB, logged to files under the demo's folder."""

    def __init__(self, settings: Settings, logs: Path) -> None:
        from components.localstack import airflow_env

        self.env = {**os.environ, **airflow_env(settings)}
        self.binary = str(Path(sys.executable).with_name("airflow"))
        self.logs = logs
        self.extra_env: dict[str, str] = {}
        self.last_log: Path | None = None

    def migrate(self) -> None:
        self._run(["db", "migrate"], "airflow-db-migrate")

    def run_dag(self, dag_id: str, conf: dict[str, Any], name: str) -> None:
        """One DAG run in this process tree (``airflow dags test``), recorded in the metadata DB."""
        self._run(["dags", "test", dag_id, "--conf", json.dumps(conf)], name)

    def _run(self, args: Sequence[str], name: str) -> None:
        self.last_log = self.logs / f"{name}.log"
        env = {**self.env, **self.extra_env}
        with self.last_log.open("w", encoding="utf-8") as out:
            child = subprocess.Popen([self.binary, *args], env=env, stdout=out, stderr=subprocess.STDOUT)
            try:
                code = child.wait()
            except KeyboardInterrupt:
                # Let the task clean up (its training run is marked KILLED, Ray stopped), then go.
                child.send_signal(signal.SIGINT)
                try:
                    child.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
                raise
        if code != 0:
            raise FlywheelError(f"airflow {' '.join(args[:3])} failed (exit {code}); log: {self.last_log}")


# Serving -----------------------------------------------------------------------------------


class _Keys:
    """The demo's API keys: one admin key (reloads), one per simulated user; revoked at the end."""

    def __init__(self, settings: Settings) -> None:
        from components.feedback_store import FeedbackStore

        self.store = FeedbackStore.from_settings(settings)
        self.store.migrate()
        stamp = uuid.uuid4().hex[:8]
        self.ids: list[str] = []
        self.admin = self._create(f"demo-admin-{stamp}", admin=True)
        self.users: list[str] = []
        self.stamp = stamp

    def _create(self, name: str, admin: bool = False) -> str:
        info, key = self.store.create_key(name, admin=admin)
        self.ids.append(info.id)
        return key

    def user(self, index: int) -> str:
        while len(self.users) <= index:
            self.users.append(self._create(f"demo-user-{len(self.users) + 1}-{self.stamp}"))
        return self.users[index]

    def revoke(self) -> None:
        for key_id in self.ids:
            self.store.revoke_key(key_id)
        self.store.close()


@contextmanager
def _serving(settings: Settings, logs: Path, clock: _Stages) -> Iterator[str]:
    """``python -m serving`` on the home's champion until the block ends; yields the base URL."""
    import httpx

    url = f"http://127.0.0.1:{settings.serve_port}"
    try:
        httpx.get(f"{url}/healthz", timeout=1)
    except httpx.HTTPError:
        pass
    else:
        raise UsageError(
            f"port {settings.serve_port} is in use: stop what serves there or set FLYWHEEL_SERVE_PORT"
        )
    # The demo's simulated users and measurements send hundreds of requests a minute per key.
    env = {**os.environ, "FLYWHEEL_HOME": str(settings.home), "FLYWHEEL_RATE_LIMIT": "10000/minute"}
    argv = [sys.executable, "-m", "serving", "--host", "127.0.0.1", "--port", str(settings.serve_port)]
    with (logs / "serving.log").open("w", encoding="utf-8") as out:
        child = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with clock("serve"):
            _wait_ready(url, child, logs / "serving.log")
        yield url
    finally:
        _stop(child)


def _wait_ready(url: str, child: subprocess.Popen, log_file: Path) -> None:
    import httpx

    deadline = time.monotonic() + _READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise FlywheelError(f"serving exited with {child.returncode}; log: {log_file}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise FlywheelError(f"serving was not ready within {_READY_TIMEOUT_S} s; log: {log_file}")


def _stop(child: subprocess.Popen) -> None:
    """SIGINT (serving stops Serve, Ray and the embedded Redis), then the whole group if it lingers."""
    if child.poll() is None:
        child.send_signal(signal.SIGINT)
        with suppress(subprocess.TimeoutExpired):
            child.wait(timeout=60)
    with suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGKILL)
    child.wait()


def _client(url: str) -> httpx.Client:
    import httpx

    return httpx.Client(base_url=url, timeout=120)


def _post(http: httpx.Client, path: str, key: str, body: dict, **headers: str) -> httpx.Response:
    response = http.post(path, json=body, headers={"Authorization": f"Bearer {key}", **headers})
    if response.status_code >= 400:
        raise FlywheelError(f"POST {path} answered {response.status_code}: {response.text[:300]}")
    return response


def _ask(http: httpx.Client, key: str, prompt: str, *, fresh: bool = False) -> tuple[str, str, bool]:
    """(request id, answer, served from cache) of one greedy completion."""
    headers = {"Cache-Control": "no-cache"} if fresh else {}
    body = {"prompt": prompt, "max_tokens": _MAX_TOKENS, "temperature": 0}
    response = _post(http, "/v1/completions", key, body, **headers)
    payload = response.json()
    cached = response.headers.get("X-Flywheel-Cache", "") == "hit"
    return payload["id"], payload["choices"][0]["text"], cached


def _wait_for_version(http: httpx.Client, version: str, timeout_s: float = 120) -> str:
    """The version serving answers with once it has picked up ``version`` (reload if it has not)."""
    deadline = time.monotonic() + timeout_s
    while True:
        served = str(http.get("/readyz").json().get("version"))
        if served == version or time.monotonic() > deadline:
            return served
        time.sleep(1)


# Users and measurements --------------------------------------------------------------------


def changed_intents(spec: Any) -> set[str]:
    """Intents with a fact that differs between the base policy and the new one."""
    old, new = spec.policies[BASE_POLICY], spec.policies[NEW_POLICY]
    return {name for name, intent in spec.intents.items() if any(old[k] != new[k] for k in intent.facts)}


def _held_out(settings: Settings, spec: Any, limit: int) -> list[dict]:
    """Held-out paraphrases under the new policy: wordings never in training or in feedback."""
    from components.data import generate_corpus

    rows = [
        r.model_dump()
        for r in generate_corpus(policy_version=NEW_POLICY, seed=settings.seed, spec=spec)["holdout"]
    ]
    random.Random(settings.seed).shuffle(rows)
    return rows[:limit]


def _accuracy(http: httpx.Client, key: str, rows: Sequence[dict], changed: set[str], spec: Any) -> Accuracy:
    """Share of answers that state every fact of the new policy, over changed and untouched intents.

    Also the share of the changed intents' answers that state a replaced value, so a summary can
    tell a change the model missed from a wording it did not recognise.
    """
    from components.evaluate import replaced_facts, states_fact

    old = replaced_facts(NEW_POLICY, spec)

    def score(row: dict) -> tuple[bool, bool]:
        _, answer, _ = _ask(http, key, row["prompt"])
        stale = any(states_fact(answer, value) for fact in row["facts"] for value in old.get(fact, ()))
        return all(states_fact(answer, fact) for fact in row["facts"]), stale

    with ThreadPoolExecutor(max_workers=8) as pool:  # concurrent requests: serving batches them
        results = list(pool.map(score, rows))
    moved = [got for row, got in zip(rows, results, strict=True) if row["intent"] in changed]
    kept = [ok for row, (ok, _) in zip(rows, results, strict=True) if row["intent"] not in changed]
    return Accuracy(
        changed=sum(ok for ok, _ in moved) / len(moved) if moved else 0.0,
        untouched=sum(kept) / len(kept) if kept else 0.0,
        n_changed=len(moved),
        n_untouched=len(kept),
        stale=sum(stale for _, stale in moved) / len(moved) if moved else 0.0,
    )


def _demo_retrain_policy() -> dict[str, Any]:
    """The retrain policy of the demo: fire on this run's feedback, with no cooldown."""
    return {"min_new_corrections": 5, "cooldown_minutes": 0, "hold_unmatched_seconds": 0}


def _simulate_users(
    http: httpx.Client, keys: _Keys, settings: Settings, options: DemoOptions, changed: set[str]
) -> dict[str, int]:
    """Users ask questions under the new policy, rate answers and correct the wrong ones.

    Half of each user's questions are about the changed intents (people ask about what changed),
    a few are the same popular questions for everyone (cache hits). One user pastes an e-mail
    address into a question (redacted before training). With ``poison_share`` a hostile key posts
    corrections that state a value no policy has (quarantined).
    """
    from components.data import generate_corpus, load_corpus

    spec = load_corpus(settings.corpus_dir)
    train = generate_corpus(policy_version=NEW_POLICY, seed=settings.seed, spec=spec)["train"]
    rows = [r.model_dump() for r in train]
    hot = [r for r in rows if r["intent"] in changed]
    cold = [r for r in rows if r["intent"] not in changed]
    rng = random.Random(settings.seed)
    popular = rng.sample(rows, 3)
    counts = {"requests": 0, "hits": 0, "feedback": 0}

    def feedback(key: str, request_id: str, rating: int, **extra: Any) -> None:
        _post(
            http,
            "/v1/feedback",
            key,
            {"event_id": uuid.uuid4().hex, "request_id": request_id, "rating": rating, **extra},
        )
        counts["feedback"] += 1

    for user in range(options.users):
        key = keys.user(user)
        n_hot = options.questions // 2
        asked = popular + rng.sample(hot, n_hot) + rng.sample(cold, max(options.questions - n_hot - 3, 0))
        for n, row in enumerate(asked):
            # Users paste personal data into questions: the builder must redact it.
            prompt = f"I'm jane.doe@example.com. {row['prompt']}" if user == 0 and n == 3 else row["prompt"]
            request_id, answer, cached = _ask(http, key, prompt)
            counts["requests"] += 1
            counts["hits"] += cached
            if _satisfied(row, answer, spec.items):
                if rng.random() < 0.5:
                    feedback(key, request_id, 1)
            else:
                feedback(key, request_id, -1, correction=row["response"])
    poisoned = round(options.poison_share * counts["feedback"] / max(1 - options.poison_share, 1e-9))
    if poisoned:
        key = keys.user(options.users)
        for row in rng.sample(hot, min(poisoned, len(hot))):
            request_id, _, _ = _ask(http, key, row["prompt"])
            counts["requests"] += 1
            bad = row["response"].replace(row["facts"][0], "365 days")
            feedback(key, request_id, -1, correction=bad)
    return counts


def _satisfied(row: dict, answer: str, items: Sequence[str]) -> bool:
    """What a user checks: every fact of the policy stated, and about the product they asked about."""
    from components.evaluate import asked_product, states_fact

    product = asked_product(row["prompt"], row["response"], items)
    named = product is None or product in answer.lower()
    return named and all(states_fact(answer, fact) for fact in row["facts"])


def _latest_build(settings: Settings) -> FeedbackBuild:
    """The feedback build the loop just published (the newest snapshot with a build record)."""
    from components.feedback import BUILD_FILE, FeedbackBuild

    builds = sorted(
        (p for p in settings.datasets_dir.glob(f"*/{BUILD_FILE}")),
        key=lambda p: p.stat().st_mtime,
    )
    if not builds:
        raise FlywheelError("the feedback loop did not fire: no feedback dataset was built")
    return FeedbackBuild.model_validate_json(builds[-1].read_text(encoding="utf-8"))


def _champion(settings: Settings) -> str | None:
    from components.registry import champion_uri, resolve

    return resolve("champion", settings).version if champion_uri(settings) else None
