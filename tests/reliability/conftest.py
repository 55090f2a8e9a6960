"""Shared fixtures of the reliability suite: a tiny registered model, Serve apps over HTTP, throwaway services.

- ``tiny_model``: one model trained for a few steps and registered as champion in a session
  MLflow store (SQLite); any app, in this process or another, serves it through ``overrides``.
- ``serve_cluster``: one local Ray with Serve on a free loopback port for the whole session;
  each test deploys its own app on it (``with serve_cluster.app(...)``) under its own route
  prefix, deleted after the test. Another suite shutting Ray down does not break it: the next
  app starts a fresh Ray.
- ``ServingProcess``: ``python -m serving`` as a process tree of its own, to kill -9 and restart.
- ``RedisServer`` / ``redis_server``: a redis-server of the test's own, to stop, pause and kill.
- ``shared_redis_prefix``: a key prefix of the test's own on the machine's Redis, cleaned afterwards.
- ``pg_url`` (from tests/conftest.py): a fresh PostgreSQL database of the test's own, dropped afterwards.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_port, require

MODEL_NAME = "reliability"
READY_TIMEOUT_S = 180


def redis_answers(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a Redis answers PING on ``host:port``."""
    import redis

    try:
        return bool(redis.Redis(host=host, port=port, socket_connect_timeout=0.5, socket_timeout=0.5).ping())
    except redis.RedisError:
        return False


def wait_ready(url: str, timeout_s: float = READY_TIMEOUT_S, proc: subprocess.Popen | None = None) -> float:
    """Wait until ``{url}/readyz`` answers 200.

    Args:
        url: the app's base URL.
        timeout_s: longest wait.
        proc: the serving process, when it runs in one (its death ends the wait early).

    Returns:
        Seconds waited.
    """
    started = time.monotonic()
    last: object = None
    while time.monotonic() - started < timeout_s:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the serving process exited with {proc.returncode}")
        try:
            last = httpx.get(f"{url}/readyz", timeout=5)
            if last.status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.25)
    raise AssertionError(f"app at {url} not ready in {timeout_s} s: {last!r} {getattr(last, 'text', '')}")


def create_key(feedback_url: str, admin: bool = False) -> str:
    """A fresh API key in the store at ``feedback_url`` (migrated first); its plaintext."""
    from components.feedback_store import FeedbackStore

    store = FeedbackStore(feedback_url)
    try:
        store.migrate()
        _, plaintext = store.create_key(f"rel-{uuid.uuid4().hex[:10]}", admin=admin)
    finally:
        store.close()
    return plaintext


# The model ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TinyModel:
    """A registered champion and the settings an app needs to serve it."""

    version: str
    overrides: dict[str, Any] = field(repr=False)

    def env(self) -> dict[str, str]:
        """The same settings as ``FLYWHEEL_*`` variables (for a serving process)."""
        return {f"FLYWHEEL_{k.upper()}": str(v) for k, v in self.overrides.items()}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, base_model_dir: Path, seed_ref) -> TinyModel:
    """A model trained for two steps (in-process, no Ray), registered and made champion."""
    from mlflow import MlflowClient

    from components.registry import register
    from components.schemas import TrainParams
    from components.settings import Settings
    from components.train import train

    home = tmp_path_factory.mktemp("reliability-model") / "home"
    overrides = {
        "home": str(home),
        "base_model": str(base_model_dir),
        "model_name": MODEL_NAME,
        "mlflow_tracking_uri": f"sqlite:///{home / 'mlflow' / 'mlflow.db'}",
    }
    settings = Settings(**overrides, _env_file=None)
    settings.ensure_home()
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
    MlflowClient(settings.tracking_uri, registry_uri=settings.tracking_uri).set_registered_model_alias(
        MODEL_NAME, "champion", version
    )
    return TinyModel(version=version, overrides={k: v for k, v in overrides.items() if k != "home"})


# Ray Serve ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServedApp:
    """One deployed app: its name (= route prefix), base URL and settings."""

    name: str
    url: str
    overrides: dict[str, Any] = field(repr=False)

    def key(self, admin: bool = False) -> str:
        """A fresh API key of this app."""
        from components.settings import Settings

        return create_key(Settings(**self.overrides, _env_file=None).feedback_url, admin=admin)


class ServeCluster:
    """Local Ray + Serve HTTP on loopback, shared by the session; each test deploys its own app on it."""

    def __init__(self, root: Path, model: TinyModel) -> None:
        self._root = root
        self._model = model
        self._temp_dir: Path | None = None
        self._gcs: str | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _ensure(self) -> None:
        """Start Ray and Serve, unless ours are still up (another suite may have shut them down)."""
        import ray
        from ray import serve

        if ray.is_initialized() and ray.get_runtime_context().gcs_address == self._gcs:
            return
        if ray.is_initialized():  # another suite's Ray: Serve gets its own
            ray.shutdown()
        self._cleanup()
        # Unix socket paths under the temp dir must stay under 107 bytes.
        self._temp_dir = Path(tempfile.mkdtemp(prefix="fwrel-", dir="/tmp"))
        self.port = free_port()
        ray.init(num_cpus=4, include_dashboard=False, _temp_dir=str(self._temp_dir), log_to_driver=False)
        self._gcs = ray.get_runtime_context().gcs_address
        serve.start(http_options={"host": "127.0.0.1", "port": self.port})

    @contextlib.contextmanager
    def app(
        self,
        name: str,
        settings: dict[str, Any],
        *,
        num_replicas: int = 1,
        max_batch_size: int = 4,
        max_ongoing_requests: int = 8,
    ) -> Iterator[ServedApp]:
        """An app serving the tiny model with extra settings, ready; deleted afterwards.

        Args:
            name: app name and route prefix; its home is a folder of that name.
            settings: Settings overrides on top of the model's (Redis, limits, timeouts…).
            num_replicas: replicas of both deployments.
            max_batch_size: most requests per generate call.
            max_ongoing_requests: requests a model replica works on at once.

        Yields:
            The app at ``http://127.0.0.1:PORT/<name>``.
        """
        import ray
        from ray import serve

        from serving.app import ServeArgs, build_app

        self._ensure()
        overrides = {"home": str(self._root / name)} | self._model.overrides | settings
        args = ServeArgs(
            model_name=MODEL_NAME,
            max_batch_size=max_batch_size,
            max_ongoing_requests=max_ongoing_requests,
            num_replicas=num_replicas,
            settings=overrides,
        )
        try:
            serve.run(build_app(args), name=name, route_prefix=f"/{name}")
            app = ServedApp(name=name, url=f"{self.url}/{name}", overrides=overrides)
            wait_ready(app.url)
            yield app
        finally:
            if ray.is_initialized() and ray.get_runtime_context().gcs_address == self._gcs:
                serve.delete(name, _blocking=False)  # frees its replicas for the next test

    def replicas(self, app: str, deployment: str = "ModelServer") -> set[str]:
        """Actor names of an app's live replicas of one deployment (asks only the GCS: never blocks)."""
        import ray

        prefix = f"SERVE_REPLICA::{app}#{deployment}#"
        return {
            actor["name"]
            for actor in ray.util.list_named_actors(all_namespaces=True)
            if actor["namespace"] == "serve" and actor["name"].startswith(prefix)
        }

    def replica_pids(self, app: str, deployment: str = "ModelServer") -> dict[str, int]:
        """OS process ids of an app's replicas of one deployment, by replica actor name."""
        import ray

        pids = {}
        for name in self.replicas(app, deployment):
            try:
                handle = ray.get_actor(name, namespace="serve")
                pids[name] = ray.get(handle.__ray_call__.remote(lambda _self: os.getpid()), timeout=10)
            except Exception:  # a replica dying or not up yet is no live replica
                continue
        return pids

    def _cleanup(self) -> None:
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
        self._temp_dir = self._gcs = None

    def stop(self) -> None:
        """Shut Serve and Ray down, if they are still ours."""
        import ray
        from ray import serve

        try:
            if ray.is_initialized() and ray.get_runtime_context().gcs_address == self._gcs:
                try:
                    serve.shutdown()
                finally:
                    ray.shutdown()
        finally:
            self._cleanup()


@pytest.fixture(scope="session")
def serve_cluster(tmp_path_factory: pytest.TempPathFactory, tiny_model: TinyModel) -> Iterator[ServeCluster]:
    """Ray and Serve for the session's in-process apps (stopped at the end)."""
    cluster = ServeCluster(tmp_path_factory.mktemp("serve"), tiny_model)
    try:
        yield cluster
    finally:
        cluster.stop()


class ServingProcess:
    """``python -m serving`` as an OS process of its own (own process group): start, kill -9, stop."""

    def __init__(self, env: dict[str, str], port: int, log_path: Path, replicas: int = 1) -> None:
        """Describe the process.

        Args:
            env: ``FLYWHEEL_*`` settings (added to this process's environment).
            port: HTTP port of the Serve proxy.
            log_path: where its output goes (appended across restarts).
            replicas: model and ingress replicas.
        """
        self._env = {**os.environ, **env}
        self.port = port
        self._log_path = log_path
        self._replicas = replicas
        self.proc: subprocess.Popen | None = None
        self._seen: dict[int, Any] = {}  # psutil.Process of every run, by pid (tells a reused pid apart)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> float:
        """Start it and wait until it serves; seconds it took."""
        started = time.monotonic()
        argv = [
            sys.executable,
            "-m",
            "serving",
            "--port",
            str(self.port),
            "--replicas",
            str(self._replicas),
        ]
        with open(self._log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv, env=self._env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            wait_ready(self.url, proc=self.proc)
        except AssertionError as exc:
            tail = self._log_path.read_text(errors="replace")[-3000:]
            raise AssertionError(f"{exc}\n{tail}") from None
        return time.monotonic() - started

    def _remember_tree(self) -> list[Any]:
        """The process and its descendants now (remembered, so that no run is left behind)."""
        import psutil

        if self.proc is None:
            return []
        try:
            leader = psutil.Process(self.proc.pid)
            tree = [leader, *leader.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        for proc in tree:
            self._seen.setdefault(proc.pid, proc)
        return tree

    def _alive(self) -> list[Any]:
        import psutil

        alive = []
        for proc in self._seen.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
        return alive

    def kill(self) -> None:
        """SIGKILL the whole process tree at once (driver, Ray, proxy, replicas), as a node loss would."""
        import psutil

        assert self.proc is not None
        tree = self._remember_tree()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for proc in tree:  # anything that left the group
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        self.proc.wait()

    def stop(self, graceful: bool = True, timeout_s: float = 30) -> None:
        """Stop it: SIGTERM (Serve and Ray stop cleanly) or SIGKILL; then SIGKILL whatever is left of every run.

        Args:
            graceful: SIGTERM first and wait; False: SIGKILL at once.
            timeout_s: longest wait for a graceful stop.
        """
        import psutil

        if not graceful and self.proc is not None and self.proc.poll() is None:
            self.kill()
        if self.proc is not None and self.proc.poll() is None:
            self._remember_tree()
            # The leader only: it shuts Serve and Ray down itself (signalled too, they would die first).
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        for proc in self._alive():
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()

    def survivors(self, wait_s: float = 10) -> list[str]:
        """Processes of runs that were killed or stopped and are still alive (there must be none).

        A killed process with a large address space takes a moment to go: wait up to ``wait_s``.
        """
        current = {p.pid for p in self._remember_tree()} if self.proc and self.proc.poll() is None else set()
        deadline = time.monotonic() + wait_s
        while (alive := [p for p in self._alive() if p.pid not in current]) and time.monotonic() < deadline:
            time.sleep(0.1)
        named = []
        for proc in alive:
            with contextlib.suppress(Exception):  # gone meanwhile: not a survivor
                named.append(f"{proc.pid} {proc.name()}")
        return named


# Throwaway services ---------------------------------------------------------------------------


class RedisServer:
    """A redis-server of the test's own on a fixed loopback port: stop, start again, pause, resume."""

    def __init__(self, binary: str, port: int) -> None:
        self._binary = binary
        self.port = port
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10) -> None:
        """Start it (again) on its port and wait until it answers."""
        argv = [
            self._binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while not redis_answers(self.port):
            assert self.proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)

    def _signal(self, sig: int) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL: the port refuses connections at once."""
        if self.proc is not None and self.proc.poll() is None:
            self._signal(signal.SIGCONT)  # a paused server must not stay paused as a zombie group
            self._signal(signal.SIGKILL)
            self.proc.wait()

    def pause(self) -> None:
        """SIGSTOP: connections are accepted by the kernel, commands never answered."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT."""
        self._signal(signal.SIGCONT)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A running throwaway redis-server on a free port (killed afterwards, whatever happened)."""
    binary = shutil.which("redis-server") or str(Path(sys.executable).parent / "redis-server")
    require(Path(binary).exists(), "a redis-server binary")
    server = RedisServer(binary, free_port())
    try:
        server.start()
        yield server
    finally:
        server.kill()


@pytest.fixture
def shared_redis_prefix() -> Iterator[str]:
    """A key prefix of the test's own on the machine's Redis (127.0.0.1:6379); its keys deleted afterwards."""
    import redis

    require(redis_answers(6379), "Redis on 127.0.0.1:6379")
    prefix = f"fw-rel-{uuid.uuid4().hex[:10]}:"
    try:
        yield prefix
    finally:
        client = redis.Redis(port=6379)
        keys = list(client.scan_iter(f"{prefix}*", count=1000))
        for i in range(0, len(keys), 1000):
            client.delete(*keys[i : i + 1000])
        client.close()
