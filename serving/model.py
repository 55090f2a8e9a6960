"""The model deployment: batched generation through ``components.predict`` and atomic model swaps.

The ingress decides which registry version is served (it watches the alias) and names it in
every request; a replica on another version keeps answering with the model it has while it
loads the named one in the background, then swaps the reference in one assignment. A batch
holds the model it started with, so requests in flight finish on the old model; a model that
fails to load is never swapped in.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict
from ray import serve

from components.errors import InvalidInput
from components.schemas import Completion, GenerationParams
from components.settings import Settings

log = logging.getLogger(__name__)

LOAD_RETRY_S = 30.0  # a version that failed to load is not tried again by requests for this long
BATCH_WAIT_S = 0.01


class Target(BaseModel):
    """A pinned model: what the ingress wants served."""

    model_config = ConfigDict(frozen=True)

    name: str
    version: str
    uri: str


class GenerateRequest(BaseModel):
    """One prompt for the model deployment."""

    model_config = ConfigDict(frozen=True)

    prompt: str
    params: GenerationParams
    stop: tuple[str, ...] = ()
    target: Target | None = None


class GenerateResult(BaseModel):
    """A completion and the version that produced it, or why there is none."""

    completion: Completion | None = None
    version: str | None = None
    error: Literal["not_ready", "prompt_too_long", "invalid", "failed"] | None = None
    message: str | None = None


def make_settings(overrides: dict[str, Any] | None = None) -> Settings:
    """Settings of a replica: the environment (``FLYWHEEL_*``), then the app's overrides."""
    return Settings(**(overrides or {}))


def resolve_target(name: str, alias: str, settings: Settings) -> Target:
    """The version an alias names now, pinned.

    Args:
        name: registered model name.
        alias: registry alias (``champion``).
        settings: tracking URI.

    Returns:
        The target (``models:/NAME/VERSION``).
    """
    from components.predict import resolve_model

    uri, version = resolve_model(f"models:/{name}@{alias}", settings)
    return Target(name=name, version=str(version), uri=uri)


class _Loaded:
    """A loaded predictor and what it is (replaced whole on a swap, never mutated)."""

    def __init__(self, predictor: Any, target: Target) -> None:
        self.predictor = predictor
        self.target = target


HEALTH_CHECK_PERIOD_S = 2.0  # a crashed replica is replaced this soon (Serve's default: 10 s)


@serve.deployment(
    ray_actor_options={"num_cpus": 1},
    max_ongoing_requests=16,
    graceful_shutdown_timeout_s=30,
    health_check_period_s=HEALTH_CHECK_PERIOD_S,
)
class ModelServer:
    """Loads the served version and answers prompts in batches of compatible requests."""

    def __init__(
        self, model_name: str, model_alias: str, max_batch_size: int, settings: dict[str, Any] | None = None
    ) -> None:
        """Load the model the alias names now (a failure leaves the replica up, not ready).

        Args:
            model_name: registered model name.
            model_alias: alias to serve at start.
            max_batch_size: most requests per generate call.
            settings: Settings overrides (local runs and tests).
        """
        from serving.metrics import ModelMetrics

        self._settings = make_settings(settings)
        self._name = model_name
        self._loaded: _Loaded | None = None
        self._loading: dict[str, asyncio.Task[_Loaded | None]] = {}
        self._failed_at: dict[str, float] = {}
        self._metrics = ModelMetrics()
        self._counts = {"generated": 0, "batches": 0, "load_failures": 0}
        self._batched.set_max_batch_size(max_batch_size)
        try:
            target = resolve_target(model_name, model_alias, self._settings)
            self._install(self._load_blocking(target))
        except Exception:  # no champion yet, or a broken model: /readyz says so, the ingress retries
            log.exception("no model loaded at start (models:/%s@%s)", model_name, model_alias)
            self._counts["load_failures"] += 1
            self._metrics.load_failures.inc()

    def _load_blocking(self, target: Target) -> _Loaded:
        from components.predict import load

        started = time.perf_counter()
        predictor = load(target.uri, self._settings)
        log.info("loaded %s v%s in %.1f s", target.name, target.version, time.perf_counter() - started)
        return _Loaded(predictor, target)

    def _install(self, loaded: _Loaded) -> None:
        # One reference assignment: a batch already running keeps the model it took.
        self._loaded = loaded
        self._failed_at.pop(loaded.target.version, None)
        if loaded.target.version.isdigit():
            self._metrics.loaded_version.set(int(loaded.target.version), tags={"model": self._name})

    async def load(self, target: Target) -> dict[str, Any]:
        """Load ``target`` fully, then swap it in; the old model serves meanwhile and on failure.

        Args:
            target: the pinned version to serve.

        Returns:
            ``{"version": served version, "changed": bool, "error": message or None}``.
        """
        current = self._loaded
        if current is not None and current.target == target:
            return {"version": target.version, "changed": False, "error": None}
        task = self._loading.get(target.version)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._load_task(target))
            self._loading[target.version] = task
        loaded = await asyncio.shield(task)
        served = self._loaded.target.version if self._loaded else None
        if loaded is None:
            return {"version": served, "changed": False, "error": f"loading version {target.version} failed"}
        return {"version": served, "changed": True, "error": None}

    async def _load_task(self, target: Target) -> _Loaded | None:
        try:
            loaded = await asyncio.to_thread(self._load_blocking, target)
        except Exception:
            log.exception("loading %s v%s failed: the old model keeps serving", target.name, target.version)
            self._failed_at[target.version] = time.monotonic()
            self._counts["load_failures"] += 1
            self._metrics.load_failures.inc()
            return None
        else:
            self._install(loaded)
            return loaded
        finally:
            self._loading.pop(target.version, None)

    def _follow(self, target: Target) -> None:
        """Start loading the version the ingress names, unless it is loading or failed recently."""
        if target.version in self._loading:
            return
        failed = self._failed_at.get(target.version)
        if failed is not None and time.monotonic() - failed < LOAD_RETRY_S:
            return
        self._loading[target.version] = asyncio.get_running_loop().create_task(self._load_task(target))

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        """Answer one prompt (batched with compatible requests in flight).

        Args:
            request: prompt, parameters, stop strings and the version the ingress wants.

        Returns:
            The completion and the version that produced it, or an error code.
        """
        loaded = self._loaded
        if request.target is not None and (loaded is None or loaded.target != request.target):
            self._follow(request.target)
        if loaded is None:
            return GenerateResult(error="not_ready", message="no model is loaded yet")
        tokens = loaded.predictor.count_tokens(request.prompt)
        limit = self._settings.serve_max_prompt_tokens
        if tokens > limit:
            return GenerateResult(
                error="prompt_too_long",
                message=f"the prompt is {tokens} tokens; this server accepts at most {limit}",
            )
        return await self._batched(request)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=BATCH_WAIT_S)
    async def _batched(self, requests: list[GenerateRequest]) -> list[GenerateResult]:
        loaded = self._loaded  # the whole batch runs on this model, whatever a swap does meanwhile
        if loaded is None:  # unreachable: generate() checked; kept so a batch never raises
            return [GenerateResult(error="not_ready", message="no model is loaded") for _ in requests]
        self._metrics.batch_size.observe(len(requests))
        self._counts["batches"] += 1
        # Only compatible requests share a generate call: same parameters and stop strings.
        groups: dict[tuple[str, tuple[str, ...]], list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault((request.params.model_dump_json(), request.stop), []).append(i)
        results: list[GenerateResult] = [GenerateResult(error="failed") for _ in requests]
        version = loaded.target.version
        for indexes in groups.values():
            first = requests[indexes[0]]
            prompts = [requests[i].prompt for i in indexes]
            try:
                completions = await asyncio.to_thread(
                    loaded.predictor.generate, prompts, first.params, list(first.stop)
                )
            except (InvalidInput, ValueError) as exc:
                for i in indexes:
                    results[i] = GenerateResult(error="invalid", message=str(exc), version=version)
                continue
            except Exception:  # one group's failure must not fail the others
                log.exception("generation failed for a group of %d prompts", len(indexes))
                for i in indexes:
                    results[i] = GenerateResult(error="failed", message="generation failed", version=version)
                continue
            self._counts["generated"] += len(prompts)
            self._metrics.generations.inc(len(prompts))
            for i, completion in zip(indexes, completions, strict=True):
                results[i] = GenerateResult(completion=completion, version=version)
        return results

    def info(self) -> dict[str, Any]:
        """What this replica serves and has done (for /readyz and /admin/stats)."""
        loaded = self._loaded
        return {
            "loaded": loaded is not None,
            "name": self._name,
            "version": loaded.target.version if loaded else None,
            "uri": loaded.target.uri if loaded else None,
            "loading": sorted(self._loading),
            **self._counts,
        }
