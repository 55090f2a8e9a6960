"""A model replica is SIGKILLed while requests flow: clients that retry once see no failure, and Serve heals.

Two model replicas serve a paced load of more than 20 requests per second that bypasses the
cache (every request is a generation on a model replica). The test finds one replica's OS
process through its Serve actor and kills it with SIGKILL from outside, as the kernel's OOM
killer or a crashing node would; the requests it held fail over to the other replica on one
client retry, and Serve starts a replacement that loads the model again.
"""

from __future__ import annotations

import os
import signal
import time
import uuid

import httpx
import pytest

from tests.reliability.loadgen import Load

pytestmark = [pytest.mark.reliability]

APP = "replica-death"
REPLICAS = 2
RATE = 25.0  # requests per second
BEFORE_KILL_S = 3.0
AFTER_RECOVERY_S = 3.0
RECOVERY_TIMEOUT_S = 90.0


def _running(app: str, deployment: str = "ModelServer") -> int:
    from ray import serve

    status = serve.status().applications[app].deployments[deployment]
    return status.replica_states.get("RUNNING", 0)


@pytest.fixture
def app(serve_cluster, shared_redis_prefix):
    """An app with two replicas of each deployment, on the machine's Redis."""
    settings = {
        "redis_url": "redis://127.0.0.1:6379/0",
        "cache_prefix": shared_redis_prefix,
        "rate_limit": "100000/minute",
        "max_queue": 64,
        "reload_poll_s": 3600,
    }
    with serve_cluster.app(APP, settings, num_replicas=REPLICAS) as served:
        yield served


def test_a_killed_model_replica_costs_no_request(serve_cluster, app, figures):
    key = app.key()
    run = uuid.uuid4().hex[:6]
    replicas = serve_cluster.replica_pids(APP)
    assert len(replicas) == REPLICAS, replicas

    def ask(client: httpx.Client, i: int) -> httpx.Response:
        return client.post(
            "/v1/completions",
            json={"prompt": f"Track order {run}-{i}", "max_tokens": 4},
            headers={"Cache-Control": "no-cache"},  # every request reaches a model replica
        )

    load = Load(
        app.url,
        ask,
        total=int(RATE * (BEFORE_KILL_S + RECOVERY_TIMEOUT_S + AFTER_RECOVERY_S)),
        workers=6,
        rate=RATE,
        retries=1,
        headers={"Authorization": f"Bearer {key}"},
    )
    victim, pid = sorted(replicas.items())[0]
    recovered_s = None
    load.start()
    try:
        time.sleep(BEFORE_KILL_S)
        killed_at = load.now()  # from outside the replica, as the OOM killer or a node crash would
        os.kill(pid, signal.SIGKILL)
        while load.now() - killed_at < RECOVERY_TIMEOUT_S:
            # Recovered: the dead replica is gone and a new one runs in its place.
            alive = serve_cluster.replicas(APP)
            if len(alive) == REPLICAS and victim not in alive and _running(APP) == REPLICAS:
                recovered_s = load.now() - killed_at
                break
            time.sleep(0.25)
        time.sleep(AFTER_RECOVERY_S)
    finally:
        load.stop()
    results = load.join(timeout_s=60)

    sent = len(results)
    ok = sum(r.ok for r in results)
    first_failed = sum(not (200 <= r.first_status < 300) for r in results)
    success = ok / sent
    recovery = recovered_s if recovered_s is not None else RECOVERY_TIMEOUT_S
    during = [r for r in results if killed_at <= r.started < killed_at + recovery]
    rate = len(during) / recovery  # while one replica was down
    figures.record("requests sent", sent)
    figures.record("request rate while a replica is down", rate, unit="req/s", goal=">= 20", ok=rate >= 20)
    figures.record("failed on the first try", first_failed)
    figures.record(
        "success rate with one retry", success * 100, unit="%", goal=">= 99.9", ok=success >= 0.999
    )
    figures.record(
        "time to recover", recovery, unit="s", goal="<= 30", ok=recovered_s is not None and recovery <= 30
    )

    assert rate >= 20, rate
    assert success >= 0.999, [(r.index, r.status, r.error) for r in results if not r.ok][:10]
    assert recovered_s is not None and recovered_s <= 30, recovered_s
    # Back to full strength: every request after the recovery succeeds at the first try.
    after = [r for r in results if r.started > killed_at + recovered_s]
    assert after and all(200 <= r.first_status < 300 for r in after)
