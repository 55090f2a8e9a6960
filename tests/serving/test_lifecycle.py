"""Model lifecycle and Redis failure over real HTTP: promotion, hot reload, a broken version, a dying Redis."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid

import httpx
import pytest

pytestmark = pytest.mark.serving


@pytest.fixture
def champion_restored(served, admin):
    """Whatever a test does to the alias, the first version is champion (and served) afterwards."""
    yield
    served.set_champion(served.versions[0])
    assert admin.post("/admin/reload").json()["version"] == served.versions[0]


def _ask(client: httpx.Client, prompt: str, **headers: str) -> httpx.Response:
    response = client.post(
        "/v1/completions", json={"model": "serve-test", "prompt": prompt, "max_tokens": 16}, headers=headers
    )
    assert response.status_code == 200, response.text
    return response


def test_promotion_is_never_answered_from_the_old_versions_cache(served, client, admin, champion_restored):
    old, new = served.versions
    prompt = f"What is the warranty on item {uuid.uuid4().hex[:6]}?"
    assert _ask(client, prompt).headers["x-flywheel-cache"] == "miss"
    assert _ask(client, prompt).headers["x-flywheel-cache"] == "hit"

    served.set_champion(new)
    reload = admin.post("/admin/reload")
    assert reload.status_code == 200, reload.text
    assert reload.json() | {"error": None} == reload.json() and reload.json()["changed"] is True
    assert reload.json()["version"] == new and reload.json()["previous"] == old

    after = _ask(client, prompt)
    assert after.headers["x-flywheel-cache"] == "miss"  # the old version's entry is not this key
    assert after.headers["x-flywheel-model-version"] == new
    assert after.json()["model"] == f"serve-test:{new}"
    assert httpx.get(f"{served.url}/readyz").json()["version"] == new


def test_hot_reload_while_requests_flow_fails_no_request(served, admin, champion_restored):
    old, new = served.versions
    keys = [served.key() for _ in range(3)]
    results: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def flow() -> None:
        with httpx.Client(base_url=served.url, timeout=60) as http:
            i = 0
            while not stop.is_set():
                key = keys[(i // 80) % len(keys)]  # under each key's rate limit
                response = http.post(
                    "/v1/completions",
                    json={"prompt": f"Track order {i % 7}", "max_tokens": 8},
                    headers={"Authorization": f"Bearer {key}", "Cache-Control": "no-cache" if i % 2 else ""},
                )
                results.append((response.status_code, response.headers.get("x-flywheel-model-version")))
                i += 1

    thread = threading.Thread(target=flow)
    thread.start()
    try:
        time.sleep(0.5)
        served.set_champion(new)
        assert admin.post("/admin/reload").json()["version"] == new
        time.sleep(0.5)
        served.set_champion(old)
        assert admin.post("/admin/reload").json()["version"] == old
        time.sleep(0.5)
    finally:
        stop.set()
        thread.join()
    assert results and all(status == 200 for status, _ in results), results
    seen = [version for _, version in results]
    assert new in seen and seen[-1] == old


def test_a_version_that_fails_to_load_is_not_swapped_in(served, client, admin, tmp_path, champion_restored):
    from mlflow import MlflowClient

    empty = tmp_path / "not-a-model"
    empty.mkdir()
    registry = MlflowClient(served.settings.tracking_uri, registry_uri=served.settings.tracking_uri)
    broken = registry.create_model_version("serve-test", source=str(empty)).version
    served.set_champion(str(broken))

    reload = admin.post("/admin/reload")
    assert reload.status_code == 502 and reload.json()["error"]["code"] == "reload_failed"
    response = _ask(client, "Can I change my address?")
    assert response.headers["x-flywheel-model-version"] == served.versions[0]
    assert admin.get("/admin/stats").json()["model"]["load_failures"] >= 1


def test_a_paused_then_killed_redis_costs_milliseconds_not_errors(served):
    key = served.key()
    prompt = f"How do I reset my password {uuid.uuid4().hex[:6]}?"
    with httpx.Client(
        base_url=served.flaky_url, headers={"Authorization": f"Bearer {key}"}, timeout=60
    ) as http:
        assert _ask(http, prompt).headers["x-flywheel-cache"] == "miss"
        assert _ask(http, prompt).headers["x-flywheel-cache"] == "hit"
        baseline = min(_timed(lambda: _ask(http, prompt, **{"Cache-Control": "no-cache"})) for _ in range(3))

        os.killpg(served.flaky_redis.pid, signal.SIGSTOP)  # paused: connects, then never answers
        try:
            paused = [_timed(lambda: _ask(http, prompt)) for _ in range(6)]
        finally:
            os.killpg(served.flaky_redis.pid, signal.SIGCONT)
        os.killpg(served.flaky_redis.pid, signal.SIGKILL)  # dead: the port refuses connections
        served.flaky_redis.wait()
        dead = [_timed(lambda: _ask(http, prompt)) for _ in range(6)]
        stats = http.get("/admin/stats")  # non-admin: 403, still a JSON answer with Redis gone
        assert stats.status_code == 403
    # Each Redis call is capped at ~0.1 s and the breaker skips Redis after a few failures.
    assert max(paused) < baseline + 1.0, (baseline, paused)
    assert max(dead) < baseline + 1.0, (baseline, dead)


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started
