"""One real Ray Serve app over HTTP for the security suite, started once per session.

The app serves a tiny model (two training steps: the suite tests the machinery, not answers)
from an MLflow registry under a temp home, keeps its feedback store in SQLite there, and uses the
machine's Redis (127.0.0.1:6379) under a key prefix of its own. Its rate limit is high, so that
fuzzing is not cut short by 429s (the limit itself is tested in tests/serving).
"""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port, redis_up, require

MODEL_NAME = "security-test"
MAX_TOKENS_CAP = 16
SERVE_MAX_PROMPT_TOKENS = 96
KEY_CACHE_S = 2.0  # how long a replica trusts a verified key: the revocation test waits this long


@dataclass
class SecureApp:
    """The running app: base URL, its settings, the served version and where Ray writes its logs."""

    url: str
    settings: object
    overrides: dict
    version: str
    ray_dir: Path

    def key(self, admin: bool = False) -> str:
        """A fresh API key (plaintext, shown once)."""
        return self.key_with_id(admin)[1]

    def key_with_id(self, admin: bool = False) -> tuple[str, str]:
        """A fresh API key: (key id, plaintext)."""
        from components.feedback_store import FeedbackStore

        store = FeedbackStore.from_settings(self.settings)
        try:
            info, plaintext = store.create_key(f"sec-{uuid.uuid4().hex[:8]}", admin=admin)
        finally:
            store.close()
        return info.id, plaintext

    def client(self, key: str | None, timeout: float = 60) -> httpx.Client:
        """An HTTP client on the app, with ``key`` as its bearer token (None: no Authorization)."""
        headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def set_champion(self, version: str) -> None:
        """Move the served alias (the app follows on ``POST /admin/reload``)."""
        from mlflow import MlflowClient

        uri = self.settings.tracking_uri
        MlflowClient(uri, registry_uri=uri).set_registered_model_alias(MODEL_NAME, "champion", version)

    def log_files(self) -> list[Path]:
        """Every log file Ray and Serve wrote for this app so far."""
        return sorted(p for p in (self.ray_dir / "session_latest" / "logs").rglob("*") if p.is_file())


def _train_champion(settings, seed_ref) -> str:
    from mlflow import MlflowClient

    from components.registry import register
    from components.schemas import TrainParams
    from components.train import train

    params = TrainParams(
        max_steps=2,
        batch_size=8,
        workers=1,
        warmup_steps=0,
        eval_every=0,
        eval_examples=8,
        checkpoint_every=2,
    )
    version = register(train(seed_ref, params, settings, use_ray=False), settings)
    client = MlflowClient(settings.tracking_uri, registry_uri=settings.tracking_uri)
    client.set_registered_model_alias(MODEL_NAME, "champion", version)
    return version


def _wait_ready(url: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    last: object = None
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
def secure_app(
    tmp_path_factory: pytest.TempPathFactory, base_model_dir: Path, seed_ref
) -> Iterator[SecureApp]:
    """The served app at ``/`` with the champion (version 1) loaded; stopped with its Ray at the end."""
    require(redis_up(6379), "Redis on 127.0.0.1:6379")
    from components.settings import Settings

    home = tmp_path_factory.mktemp("security") / "home"
    overrides = {
        "home": str(home),
        "base_model": str(base_model_dir),
        "model_name": MODEL_NAME,
        "redis_url": "redis://127.0.0.1:6379/0",
        "cache_prefix": f"flywheel-sec-{uuid.uuid4().hex[:10]}:",
        "rate_limit": "100000/minute",
        "prediction_flush_s": 0.3,
        "reload_poll_s": 3600,  # tests move the alias and call /admin/reload themselves
        "max_queue": 8,
        "key_cache_s": KEY_CACHE_S,
        "max_tokens_cap": MAX_TOKENS_CAP,
        "serve_max_prompt_tokens": SERVE_MAX_PROMPT_TOKENS,
        # Two busy cores can stall an event loop past the 50 ms default and open the breaker.
        "cache_connect_timeout_ms": 1000,
        "cache_socket_timeout_ms": 1000,
    }
    settings = Settings(**overrides, _env_file=None)
    settings.ensure_home()
    version = _train_champion(settings, seed_ref)

    import ray
    from ray import serve

    from serving.__main__ import ray_temp_dir
    from serving.app import ServeArgs, build_app

    ray_dir = ray_temp_dir(home)
    port = free_port()
    try:
        if ray.is_initialized():  # another suite's session-wide Ray: Serve gets its own
            ray.shutdown()
        ray.init(num_cpus=4, include_dashboard=False, _temp_dir=str(ray_dir))
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        args = ServeArgs(
            model_name=MODEL_NAME,
            max_batch_size=4,
            max_ongoing_requests=4,
            num_replicas=1,
            settings=overrides,
        )
        serve.run(build_app(args), name="flywheel", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url)
        yield SecureApp(url, settings, overrides, version, ray_dir)
    finally:
        try:
            if ray.is_initialized():
                serve.shutdown()
        finally:
            ray.shutdown()
            if ray_dir.parent == Path("/tmp"):  # a short stand-in folder of ours, outside pytest's tmp
                shutil.rmtree(ray_dir, ignore_errors=True)
