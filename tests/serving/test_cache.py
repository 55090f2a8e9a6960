"""The cache's own logic: key, determinism, circuit breaker, single-flight, fail-open on a dead Redis."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from components.schemas import GenerationParams
from serving.cache import CircuitBreaker, GuardedRedis, ResponseCache, cache_key, is_deterministic

pytestmark = pytest.mark.serving


def test_key_holds_version_params_and_normalised_prompt():
    greedy = GenerationParams(max_new_tokens=16)
    key = cache_key("m", "1", "Where is  my order?", greedy)
    assert key == cache_key("m", "1", " Where is my order? ", greedy)
    assert key != cache_key("m", "2", "Where is my order?", greedy)
    assert key != cache_key("m", "1", "Where is my order?", greedy.model_copy(update={"max_new_tokens": 8}))
    assert key != cache_key("m", "1", "Where is my order?", greedy, stop=["."])
    assert is_deterministic(greedy)
    assert not is_deterministic(GenerationParams(do_sample=True, temperature=0.7))
    assert is_deterministic(GenerationParams(do_sample=True, temperature=0.7, seed=3))


def test_breaker_opens_after_failures_and_probes_after_cooldown():
    now = [0.0]
    breaker = CircuitBreaker(failures=3, cooldown_s=5, clock=lambda: now[0])
    for _ in range(2):
        breaker.failure()
    assert breaker.state == "closed" and breaker.allow()
    breaker.failure()
    assert breaker.state == "open" and not breaker.allow()
    now[0] = 5.0
    assert breaker.allow()  # the one probe
    assert not breaker.allow()
    breaker.failure()  # failed probe: open again for a full cool-down
    assert breaker.state == "open"
    now[0] = 10.0
    assert breaker.allow()
    breaker.success()
    assert breaker.state == "closed" and breaker.allow()


def _settings():
    from components.settings import Settings

    return Settings(_env_file=None)


def test_single_flight_and_hits_on_real_redis():
    from tests.conftest import redis_up, require

    require(redis_up(6379), "Redis on 127.0.0.1:6379")
    calls = 0

    async def produce():
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.1)
        return {"text": "yes"}, True

    async def run():
        prefix = f"flywheel-test-{uuid.uuid4().hex[:8]}:"
        # Two caches on separate clients: two replicas sharing one Redis.
        a, b = (
            ResponseCache(GuardedRedis.from_settings(_settings(), "redis://127.0.0.1:6379/0"), prefix, 60, 5)
            for _ in range(2)
        )
        results = await asyncio.gather(*(c.get_or_fill("k", produce) for c in (a, b) for _ in range(5)))
        again = await b.get_or_fill("k", produce)
        await a.redis.close()
        await b.redis.close()
        return results, again

    results, again = asyncio.run(run())
    assert calls == 1
    assert sorted(o for _, o in results).count("miss") == 1
    assert again == ({"text": "yes"}, "hit")


def test_dead_redis_costs_milliseconds():
    from tests.conftest import free_port

    async def produce():
        return {"text": "yes"}, True

    async def run():
        cache = ResponseCache(
            GuardedRedis.from_settings(_settings(), f"redis://127.0.0.1:{free_port()}/0"), "x:", 60, 5
        )
        started = time.perf_counter()
        outcomes = [(await cache.get_or_fill("k", produce))[1] for _ in range(20)]
        return outcomes, time.perf_counter() - started, cache.redis.breaker.state

    outcomes, seconds, state = asyncio.run(run())
    assert outcomes == ["miss"] * 20
    assert state == "open"
    assert seconds < 1.0
