"""API-key authentication and per-key rate limits for the HTTP ingress."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from typing import TYPE_CHECKING

from serving.api import ApiError

if TYPE_CHECKING:
    from components.feedback_store import ApiKeyInfo, FeedbackStore
    from serving.cache import GuardedRedis

log = logging.getLogger(__name__)

NEGATIVE_CACHE_S = 2.0  # a rejected key is re-checked this soon (it may have just been created)


class KeyVerifier:
    """Checks ``Authorization: Bearer <key>`` against the store's hashed keys, caching verdicts briefly."""

    def __init__(self, store: FeedbackStore, ttl_s: float) -> None:
        """Verify keys with ``store``.

        Args:
            store: the feedback store that holds the hashed keys.
            ttl_s: how long a verified key is trusted without asking the store (revocation delay).
        """
        self._store = store
        self._ttl_s = ttl_s
        self._cache: dict[str, tuple[ApiKeyInfo | None, float]] = {}

    async def verify(self, authorization: str | None) -> ApiKeyInfo:
        """The key's record.

        Args:
            authorization: the ``Authorization`` header.

        Returns:
            The active key.

        Raises:
            ApiError: 401 without a bearer key or with an unknown or revoked one.
        """
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise ApiError(
                401,
                "missing API key: send 'Authorization: Bearer <key>' (create one with `flywheel keys create`)",
                "missing_api_key",
                "authentication_error",
                {"WWW-Authenticate": "Bearer"},
            )
        digest = hashlib.sha256(token.encode()).hexdigest()
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and cached[1] > now:
            info = cached[0]
        else:
            info = await asyncio.to_thread(self._store.verify_key, token)
            ttl = self._ttl_s if info is not None else min(self._ttl_s, NEGATIVE_CACHE_S)
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[digest] = (info, now + ttl)
        if info is None:
            raise ApiError(
                401,
                "invalid or revoked API key",
                "invalid_api_key",
                "authentication_error",
                {"WWW-Authenticate": "Bearer"},
            )
        return info


class RateLimiter:
    """A moving-window limit per API key, kept in Redis with ``limits``; fails open without Redis."""

    def __init__(self, spec: str, redis: GuardedRedis, prefix: str) -> None:
        """Limit to ``spec`` per key.

        Args:
            spec: ``limits`` notation, e.g. ``60/minute`` or ``10/second;500/hour``.
            redis: the replica's guarded Redis (its connection pool, timeouts and breaker).
            prefix: key prefix of this deployment.
        """
        from limits import parse_many

        self._items = parse_many(spec)
        self._redis = redis
        self._limiter = None
        if redis.client is not None:
            from limits.aio.storage import RedisStorage
            from limits.aio.strategies import MovingWindowRateLimiter

            storage = RedisStorage(
                "async+redis://127.0.0.1:6379",  # unused: the connection pool below is what connects
                implementation="redispy",
                key_prefix=f"{prefix}ratelimit",
                connection_pool=redis.client.connection_pool,
            )
            self._limiter = MovingWindowRateLimiter(storage)

    async def check(self, key_id: str) -> None:
        """Count one request of a key.

        Args:
            key_id: the API key's id.

        Raises:
            ApiError: 429 with ``Retry-After`` when the key is over its limit.
        """
        limiter = self._limiter
        if limiter is None:
            return
        for item in self._items:
            allowed = await self._redis.call(lambda _r, item=item: limiter.hit(item, key_id), True)
            if allowed is False:
                stats = await self._redis.call(
                    lambda _r, item=item: limiter.get_window_stats(item, key_id), None
                )
                retry = max(1, math.ceil(stats.reset_time - time.time())) if stats is not None else 1
                raise ApiError(
                    429,
                    f"rate limit of {item} per API key exceeded; retry in {retry} s",
                    "rate_limit_exceeded",
                    "rate_limit_error",
                    {"Retry-After": str(retry)},
                )
