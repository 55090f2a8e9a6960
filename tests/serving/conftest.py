"""A real Ray Serve app over HTTP on a free port, started once per session, on two tiny trained models.

The app uses the machine's Redis (127.0.0.1:6379) under a key prefix of its own; a second app
(``/flaky``) talks to a throwaway redis-server the tests pause and kill.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port, redis_up, require

MODEL_NAME = "serve-test"
RATE_LIMIT = 100  # per minute per key; every test makes its own keys


@dataclass
class Served:
    """The running app: base URL, settings overrides, and the registry state behind it."""

    url: str
    flaky_url: str
    settings: object
    overrides: dict
    versions: list[str]
    flaky_redis: subprocess.Popen
    flaky_port: int

    def key(self, admin: bool = False) -> str:
        """A fresh API key (its own rate-limit budget)."""
        from components.feedback_store import FeedbackStore

        store = FeedbackStore.from_settings(self.settings)
        try:
            _, plaintext = store.create_key(f"test-{uuid.uuid4().hex[:8]}", admin=admin)
        finally:
            store.close()
        return plaintext

    def set_champion(self, version: str) -> None:
        """Move the served alias (the app notices on /admin/reload)."""
        _set_champion(self.settings, version)


def _set_champion(settings, version: str) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(settings.tracking_uri, registry_uri=settings.tracking_uri)
    client.set_registered_model_alias(MODEL_NAME, "champion", version)


def _train_and_register(settings, seed_ref, steps: int) -> str:
    from components.registry import register
    from components.schemas import TrainParams
    from components.train import train

    params = TrainParams(
        max_steps=steps,
        batch_size=8,
        workers=1,
        warmup_steps=0,
        eval_every=0,
        eval_examples=8,
        checkpoint_every=steps,
    )
    return register(train(seed_ref, params, settings, use_ray=False), settings)


def _wait_ready(url: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            last = httpx.get(f"{url}/readyz", timeout=5)
            if last.status_code == 200:
                return
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.5)
    raise AssertionError(f"app at {url} not ready: {last!r} {getattr(last, 'text', '')}")


@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory, base_model_dir: Path, seed_ref) -> Iterator[Served]:
    """Two versions registered (champion = the first), the app at ``/`` and the flaky-Redis app at ``/flaky``."""
    require(redis_up(6379), "Redis on 127.0.0.1:6379")
    redis_server = shutil.which("redis-server") or str(Path(os.sys.executable).parent / "redis-server")
    require(Path(redis_server).exists(), "a redis-server binary")

    from components.settings import Settings

    home = tmp_path_factory.mktemp("serve") / "home"
    overrides = {
        "home": str(home),
        "base_model": str(base_model_dir),
        "model_name": MODEL_NAME,
        "redis_url": "redis://127.0.0.1:6379/0",
        "cache_prefix": f"flywheel-test-{uuid.uuid4().hex[:10]}:",
        "rate_limit": f"{RATE_LIMIT}/minute",
        "prediction_flush_s": 0.3,
        "reload_poll_s": 3600,  # tests move the alias and call /admin/reload themselves
        "max_queue": 4,
        "max_tokens_cap": 64,
        "serve_max_prompt_tokens": 96,
        "single_flight_wait_s": 10,
        # Six test runs share two cores here: an event loop can stall past the 50 ms default,
        # which would open the breaker (fail-open, by design) and void the cache and rate-limit
        # assertions. The /flaky app keeps the short defaults it tests.
        "cache_connect_timeout_ms": 1000,
        "cache_socket_timeout_ms": 1000,
    }
    settings = Settings(**overrides, _env_file=None)
    settings.ensure_home()
    versions = [_train_and_register(settings, seed_ref, 2), _train_and_register(settings, seed_ref, 3)]
    _set_champion(settings, versions[0])

    flaky_port = free_port()
    flaky = subprocess.Popen(
        [redis_server, "--port", str(flaky_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    import ray
    from ray import serve

    from serving.__main__ import ray_temp_dir
    from serving.app import ServeArgs, build_app

    port = free_port()
    try:  # from here on the throwaway redis-server is ours to stop, whatever fails
        if ray.is_initialized():  # the model tests' session-wide Ray is still up: Serve gets its own
            ray.shutdown()
        ray.init(num_cpus=4, include_dashboard=False, _temp_dir=str(ray_temp_dir(home)))
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        common = dict(model_name=MODEL_NAME, max_batch_size=4, max_ongoing_requests=4, num_replicas=1)
        serve.run(build_app(ServeArgs(**common, settings=overrides)), name="flywheel", route_prefix="/")
        flaky_overrides = overrides | {
            "redis_url": f"redis://127.0.0.1:{flaky_port}/0",
            "cache_breaker_cooldown_s": 1.0,
            "cache_connect_timeout_ms": 50,
            "cache_socket_timeout_ms": 50,
            "max_queue": 64,
        }
        serve.run(
            build_app(ServeArgs(**common, settings=flaky_overrides)), name="flaky", route_prefix="/flaky"
        )
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url)
        _wait_ready(f"{url}/flaky")
        yield Served(url, f"{url}/flaky", settings, overrides, versions, flaky, flaky_port)
    finally:
        try:
            if ray.is_initialized():
                serve.shutdown()
        finally:
            ray.shutdown()
            if flaky.poll() is None:
                os.killpg(flaky.pid, signal.SIGKILL)
                flaky.wait()


@pytest.fixture
def client(served: Served) -> Iterator[httpx.Client]:
    """An HTTP client with a fresh (non-admin) key."""
    with httpx.Client(
        base_url=served.url, headers={"Authorization": f"Bearer {served.key()}"}, timeout=60
    ) as http:
        yield http


@pytest.fixture
def admin(served: Served) -> Iterator[httpx.Client]:
    """An HTTP client with a fresh admin key."""
    with httpx.Client(
        base_url=served.url, headers={"Authorization": f"Bearer {served.key(admin=True)}"}, timeout=120
    ) as http:
        yield http
