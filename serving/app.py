"""The flywheel Ray Serve application: an OpenAI-compatible API in front of a batching model deployment.

``build_app(args: ServeArgs)`` is the typed builder the Helm chart's RayService and
``infra/compose/serve-config.yaml`` import (``serving.app:build_app``). Two deployments:

- ``Ingress`` (FastAPI): API keys, rate limits, the version-aware cache with single-flight
  fills, the prediction log, feedback, readiness, and the watch on the served alias;
- ``ModelServer`` (``serving.model``): batched generation through ``components.predict``.

Settings come from the environment (``FLYWHEEL_*``) in each replica; ``ServeArgs.settings``
overrides them for local runs and tests.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from components.schemas import Completion, FeedbackEvent, GenerationParams, Prediction
from serving.api import ApiError
from serving.model import (
    HEALTH_CHECK_PERIOD_S,
    GenerateRequest,
    GenerateResult,
    ModelServer,
    Target,
    make_settings,
    resolve_target,
)

log = logging.getLogger(__name__)

INGRESS_MAX_ONGOING = 256  # the ingress only awaits I/O: many requests per replica
INFO_TIMEOUT_S = 5.0
GENERATE_ATTEMPTS = 2  # a request whose model replica died is sent once more (to another replica)
REQUEST_ID_TTL_S = 7 * 24 * 3600
DEFAULT_MAX_TOKENS = 64
MODEL_HEADER = "X-Flywheel-Model-Version"
CACHE_HEADER = "X-Flywheel-Cache"


class ServeArgs(BaseModel):
    """The builder's arguments: exactly what the chart and ``serve-config.yaml`` pass, plus local overrides."""

    model_config = ConfigDict(extra="forbid")

    model_name: str = Field("flywheel-support", min_length=1, description="Registered model to serve.")
    model_alias: str = Field("champion", min_length=1, description="Registry alias served (and watched).")
    max_batch_size: int = Field(8, ge=1, le=256, description="Most requests per generate call.")
    max_ongoing_requests: int = Field(
        16, ge=1, description="Requests a model replica works on at once (at least max_batch_size)."
    )
    num_replicas: int | None = Field(None, ge=1, description="Fixed replica count (or autoscaling_config).")
    autoscaling_config: dict[str, Any] | None = Field(
        None, description="Ray Serve autoscaling (min_replicas, max_replicas, target_ongoing_requests)."
    )
    settings: dict[str, Any] = Field(
        default_factory=dict, description="Settings overrides for every replica (local runs and tests)."
    )

    @model_validator(mode="after")
    def _consistent(self) -> ServeArgs:
        if self.num_replicas is not None and self.autoscaling_config is not None:
            raise ValueError("give num_replicas or autoscaling_config, not both")
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(
                f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size "
                f"({self.max_batch_size}): a replica never sees a fuller batch than it has requests"
            )
        return self


def build_app(args: ServeArgs) -> Application:
    """The Serve application: the ingress bound to the model deployment.

    Args:
        args: model, alias, batching and scaling (see :class:`ServeArgs`).

    Returns:
        The application for ``serve.run`` / a Serve config's ``import_path``.
    """
    settings = make_settings(args.settings)
    scaling: dict[str, Any] = (
        {"autoscaling_config": args.autoscaling_config}
        if args.autoscaling_config is not None
        else {"num_replicas": args.num_replicas or 1}
    )
    model = ModelServer.options(
        max_ongoing_requests=args.max_ongoing_requests,
        # Beyond this many waiting requests the handle raises BackPressureError: the API answers 503.
        max_queued_requests=settings.max_queue,
        **scaling,
    ).bind(args.model_name, args.model_alias, args.max_batch_size, args.settings)
    return Ingress.options(**scaling).bind(model, args.model_dump())


@dataclass(frozen=True)
class _Served:
    request_id: str
    completion: Completion
    version: str
    outcome: str
    latency_ms: float


@serve.deployment(
    ray_actor_options={"num_cpus": 0.25},
    max_ongoing_requests=INGRESS_MAX_ONGOING,
    health_check_period_s=HEALTH_CHECK_PERIOD_S,
)
@serve.ingress()
class Ingress:
    """HTTP API: auth, limits, cache, prediction log, feedback, and the served-alias watch."""

    async def __init__(self, model: DeploymentHandle, args: dict[str, Any]) -> None:
        """Connect to the store and Redis and start watching the alias.

        Args:
            model: handle of the model deployment.
            args: the builder's :class:`ServeArgs` (as a dict).
        """
        from components.feedback_store import FeedbackStore
        from serving.auth import KeyVerifier, RateLimiter
        from serving.cache import GuardedRedis, RecentRequests, ResponseCache, embedded_redis
        from serving.metrics import IngressMetrics
        from serving.predictions import PredictionLog

        self._args = ServeArgs.model_validate(args)
        settings = self._settings = make_settings(self._args.settings)
        self._model = model
        self._store = FeedbackStore.from_settings(settings)
        self._store.migrate()
        self._embedded = None
        redis_url = settings.redis_url
        if redis_url is None:  # local run without a Redis: the embedded one under the home
            self._embedded, redis_url = embedded_redis(settings.home)
        self._redis = GuardedRedis.from_settings(settings, redis_url)
        prefix = settings.cache_prefix
        self._cache = ResponseCache(self._redis, prefix, settings.cache_ttl_s, settings.single_flight_wait_s)
        self._recent = RecentRequests(self._redis, prefix, REQUEST_ID_TTL_S)
        self._keys = KeyVerifier(self._store, settings.key_cache_s)
        self._limiter = RateLimiter(settings.rate_limit, self._redis, prefix)
        self._log = PredictionLog(self._store, settings.prediction_flush_s, settings.prediction_flush_rows)
        self._metrics = IngressMetrics()
        self._target: Target | None = None
        self._refresh_lock = asyncio.Lock()
        self._closed = False
        self._watch = asyncio.get_running_loop().create_task(self._watch_alias())

    def __serve_build_asgi_app__(self) -> Any:
        from serving.routes import build_fastapi

        return build_fastapi(self)

    # Model lifecycle -----------------------------------------------------------------------

    async def _watch_alias(self) -> None:
        """Resolve the alias now and every ``reload_poll_s``; move the served version when it moves."""
        while True:
            try:
                await self.refresh()
            except Exception:  # keep watching: the registry may be briefly unreachable
                log.exception("checking the served alias failed")
            await asyncio.sleep(self._settings.reload_poll_s)

    async def refresh(self) -> dict[str, Any]:
        """Serve the version the alias names now, once a model replica has it loaded.

        Returns:
            ``{"model", "version", "previous", "changed", "error"}``.
        """
        async with self._refresh_lock:
            name, alias = self._args.model_name, self._args.model_alias
            previous = self._target.version if self._target else None
            try:
                target = await asyncio.to_thread(resolve_target, name, alias, self._settings)
            except Exception as exc:
                self._metrics.reload("failed")
                log.warning("cannot resolve models:/%s@%s: %s", name, alias, exc)
                return {
                    "model": name,
                    "version": previous,
                    "previous": previous,
                    "changed": False,
                    "error": str(exc),
                }
            # The model deployment loads it fully first; a failed load keeps the old version served.
            outcome = await self._model.load.remote(target)
            if outcome["error"] is not None:
                self._metrics.reload("failed")
                log.error("version %s of %s failed to load: still serving %s", target.version, name, previous)
                return {"model": name, "version": previous, "previous": previous, "changed": False, **outcome}
            changed = self._target != target
            self._target = target
            self._metrics.version(name, target.version)
            self._metrics.reload("changed" if changed else "unchanged")
            if changed:
                log.info("serving %s v%s (was %s)", name, target.version, previous)
            return {
                "model": name,
                "version": target.version,
                "previous": previous,
                "changed": changed,
                "error": None,
            }

    # Completions ---------------------------------------------------------------------------

    def params(self, request: Any) -> GenerationParams:
        """The request's generation parameters, checked against the server's caps (422 beyond them)."""
        cap = self._settings.max_tokens_cap
        asked = request.max_tokens or request.max_completion_tokens
        if asked is not None and asked > cap:
            raise ApiError(
                422, f"max_tokens {asked} is over this server's cap of {cap}", "max_tokens_too_large"
            )
        try:
            return request.generation(min(DEFAULT_MAX_TOKENS, cap))
        except ValidationError as exc:
            raise ApiError(422, _validation_message(exc), "invalid_request") from exc

    def target(self, model: str) -> Target:
        """The version served now, checking the model the request names (404 for another one)."""
        target = self._target
        if target is None:
            raise ApiError(
                503, "no model is being served yet: try again shortly", "model_not_ready", "server_error"
            )
        if model and model not in (target.name, f"{target.name}:{target.version}", "default"):
            raise ApiError(
                404,
                f"model {model!r} is not served here; this server serves {target.name}:{target.version}",
                "model_not_found",
            )
        return target

    async def complete(
        self, prompt: str, request: Any, key_id: str, no_cache: bool, record_prompt: str | None = None
    ) -> _Served:
        """Answer one prompt: from the cache, a fill already in flight, or the model.

        Args:
            prompt: the user prompt.
            request: the parsed completion or chat request.
            key_id: the caller's API key id.
            no_cache: the client sent ``Cache-Control: no-cache``.
            record_prompt: what the prediction log keeps as the prompt (default ``prompt``).

        Returns:
            The answer and how it was served.
        """
        from serving.cache import cache_key, is_deterministic

        started = time.perf_counter()
        params = self.params(request)
        target = self.target(request.model)
        stop = tuple(request.stop or ())
        generate = GenerateRequest(prompt=prompt, params=params, stop=stop, target=target)
        if no_cache or not is_deterministic(params):
            value, _ = await self._generate(generate)
            outcome = "bypass"
        else:
            key = cache_key(target.name, target.version, prompt, params, stop)
            value, outcome = await self._cache.get_or_fill(key, lambda: self._generate(generate))
        self._metrics.cache_outcome(outcome)
        completion = Completion.model_validate(value["completion"])
        served = _Served(
            request_id=f"cmpl-{uuid.uuid4().hex}",
            completion=completion,
            version=str(value["version"]),
            outcome=outcome,
            latency_ms=(time.perf_counter() - started) * 1000,
        )
        await self._recent.add(served.request_id)
        self._log.add(
            Prediction(
                request_id=served.request_id,
                model_name=target.name,
                model_version=served.version,
                prompt=record_prompt if record_prompt is not None else prompt,
                response=completion.text,
                params=params,
                prompt_tokens=completion.prompt_tokens,
                completion_tokens=completion.completion_tokens,
                finish_reason=completion.finish_reason,
                latency_ms=served.latency_ms,
                cached=outcome != "miss" and outcome != "bypass",
                api_key_id=key_id,
                created_at=datetime.now(UTC),
            )
        )
        return served

    async def _generate(self, request: GenerateRequest) -> tuple[dict[str, Any], bool]:
        """One generation on the model deployment; errors become API errors."""
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import BackPressureError

        for attempt in range(1, GENERATE_ATTEMPTS + 1):
            try:
                result: GenerateResult = await self._model.generate.remote(request)
                break
            except BackPressureError as exc:
                raise ApiError(
                    503,
                    "the server is at capacity: retry shortly",
                    "server_overloaded",
                    "server_error",
                    {"Retry-After": "1"},
                ) from exc
            except RayActorError as exc:
                # The replica died (or became unreachable) with the request: generation has no
                # side effects, so another replica may answer it; the router has dropped the dead one.
                log.warning("model replica lost a request (attempt %d): %s", attempt, type(exc).__name__)
                if attempt == GENERATE_ATTEMPTS:
                    raise ApiError(
                        503,
                        "no model replica could answer: retry shortly",
                        "replica_unavailable",
                        "server_error",
                        {"Retry-After": "1"},
                    ) from exc
        if result.error is not None or result.completion is None:
            status, code = _GENERATE_ERRORS.get(result.error or "failed", (500, "generation_failed"))
            kind = "invalid_request_error" if status < 500 else "server_error"
            raise ApiError(status, result.message or "generation failed", code, kind)
        value = {"completion": result.completion.model_dump(mode="json"), "version": result.version}
        # A replica still on an older version answered: correct for this request, but not cached
        # under the new version's key.
        cacheable = request.target is None or result.version == request.target.version
        return value, cacheable

    # Feedback, readiness, stats ------------------------------------------------------------

    async def feedback(self, body: Any, key_id: str) -> tuple[dict[str, Any], bool]:
        """Store a feedback event durably (idempotent by event_id); 404 for an id never issued.

        Returns:
            (receipt as JSON without the duplicate flag, duplicate).
        """
        from components.errors import Conflict

        issued = await self._recent.issued(body.request_id) or await asyncio.to_thread(
            self._store.has_prediction, body.request_id
        )
        if not issued:
            raise ApiError(
                404, f"no response with request id {body.request_id!r} was served here", "unknown_request"
            )
        try:
            event = FeedbackEvent(
                event_id=body.event_id,
                request_id=body.request_id,
                rating=body.rating,
                correction=body.correction,
                comment=body.comment,
                user_id=key_id,
                created_at=datetime.now(UTC),
            )
        except ValidationError as exc:
            raise ApiError(422, _validation_message(exc), "invalid_feedback") from exc
        try:
            receipt = await asyncio.to_thread(self._store.add_feedback, event)
        except Conflict as exc:
            raise ApiError(409, str(exc), "event_id_conflict") from exc
        return receipt.model_dump(mode="json", exclude={"duplicate"}), receipt.duplicate

    async def model_info(self) -> dict[str, Any] | None:
        """A model replica's state, or None when none answers in time."""
        try:
            return await asyncio.wait_for(self._model.info.remote(), INFO_TIMEOUT_S)
        except Exception:  # readiness must answer, not fail
            log.warning("the model deployment did not answer an info call", exc_info=True)
            return None

    async def stats(self) -> dict[str, Any]:
        """Counters of this ingress replica and of one model replica."""
        return {
            "target": self._target.model_dump() if self._target else None,
            "ingress": self._metrics.snapshot(),
            "model": await self.model_info(),
            "redis": {
                "breaker": self._redis.breaker.state,
                "failures": self._redis.failures,
                "trips": self._redis.breaker.trips,
                "opened_after": self._redis.breaker.opened_after,
            },
            "predictions": {"buffered": self._log.buffered, "written": self._log.written},
        }

    @property
    def metrics(self) -> Any:
        return self._metrics

    @property
    def keys(self) -> Any:
        return self._keys

    @property
    def limiter(self) -> Any:
        return self._limiter

    @property
    def settings(self) -> Any:
        return self._settings

    @property
    def served(self) -> Target | None:
        return self._target

    def served_name(self, served: _Served) -> str:
        """The ``model`` field of a response: name and the version that answered."""
        return f"{self._args.model_name}:{served.version}"

    def flush_predictions(self) -> int:
        """Write the buffered prediction log now."""
        return self._log.flush()

    def __del__(self) -> None:
        # Serve calls this on a graceful replica shutdown: the buffered prediction log is written.
        if getattr(self, "_closed", True):
            return
        self._closed = True
        self._watch.cancel()
        self._log.close()
        self._store.close()


_GENERATE_ERRORS: dict[str, tuple[int, str]] = {
    "not_ready": (503, "model_not_ready"),
    "prompt_too_long": (413, "prompt_too_long"),
    "invalid": (422, "invalid_request"),
    "failed": (500, "generation_failed"),
}


def _validation_message(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc'] if p != 'body') or 'body'}: {err['msg']}"
        for err in exc.errors()
    )


def pieces(text: str) -> list[str]:
    """An answer split into word-sized pieces for streaming (it is generated whole first)."""
    out, start = [], 0
    for i, ch in enumerate(text):
        if ch == " " and i > start:
            out.append(text[start:i])
            start = i
    if start < len(text):
        out.append(text[start:])
    return out
