"""A small bounded load generator: N requests over a few threads, paced or as fast as they go.

Each worker thread keeps one ``httpx.Client`` (keep-alive, like a real client) and takes the
next request index from a shared counter; with a ``rate`` the i-th request is not sent before
``start + i / rate``. Every request is recorded: when it started, how long it took, the status
of its first and last attempt (0: no HTTP answer at all — refused, reset or timed out) and the
response headers the caller asks to keep. A ``retries`` budget resends what ``retry_if`` rejects
(by default: no answer, or a 5xx), with a pause that may double up to a cap, as polite clients
back off from a server that is down; ``stop()`` ends the load early, never beyond ``total``.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import httpx

Send = Callable[[httpx.Client, int], httpx.Response]


@dataclass
class Result:
    """One request as the client saw it (times in seconds since the load started)."""

    index: int
    started: float
    latency_s: float = 0.0
    status: int = 0
    first_status: int = 0
    attempts: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: dict | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Answered 2xx (after retries)."""
        return 200 <= self.status < 300


def default_retry_if(status: int) -> bool:
    """Retry what got no answer or a server error."""
    return status == 0 or status >= 500


class Load:
    """A bounded load against one base URL (start/stop in the background, or ``run`` in the foreground)."""

    def __init__(
        self,
        base_url: str,
        send: Send,
        *,
        total: int,
        workers: int = 4,
        rate: float | None = None,
        retries: int = 0,
        retry_delay_s: float = 0.05,
        retry_max_delay_s: float | None = None,
        retry_if: Callable[[int], bool] = default_retry_if,
        keep_headers: Sequence[str] = (),
        keep_body: bool = False,
        timeout_s: float = 30.0,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Describe the load.

        Args:
            base_url: every worker's client base URL.
            send: sends request ``i`` with the given client and returns the response.
            total: most requests sent (the bound).
            workers: threads (at most this many requests in flight).
            rate: requests per second to pace at; None: as fast as the workers go.
            retries: resends per request of what ``retry_if`` rejects.
            retry_delay_s: pause before the first resend.
            retry_max_delay_s: the pause doubles with each resend up to this (default: no doubling).
            retry_if: whether a status (0: no answer) is resent.
            keep_headers: response headers to record (lower case).
            keep_body: record the JSON body of the last answer.
            timeout_s: per-attempt HTTP timeout.
            headers: headers of every request (e.g. Authorization).
        """
        self._base_url = base_url
        self._send = send
        self.total = total
        self._workers = workers
        self._rate = rate
        self._retries = retries
        self._retry_delay_s = retry_delay_s
        self._retry_max_delay_s = retry_max_delay_s or retry_delay_s
        self._retry_if = retry_if
        self._keep_headers = tuple(h.lower() for h in keep_headers)
        self._keep_body = keep_body
        self._timeout_s = timeout_s
        self._headers = headers or {}
        self._next = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.results: list[Result] = []
        self.t0 = 0.0

    def now(self) -> float:
        """Seconds since the load started (the clock of ``Result.started``)."""
        return time.monotonic() - self.t0

    def _take(self) -> int | None:
        with self._lock:
            if self._stop.is_set() or self._next >= self.total:
                return None
            index, self._next = self._next, self._next + 1
            return index

    def _attempt(self, client: httpx.Client, index: int, result: Result) -> None:
        result.attempts += 1
        try:
            response = self._send(client, index)
        except httpx.HTTPError as exc:
            result.status, result.error = 0, f"{type(exc).__name__}: {exc}"
            return
        result.status, result.error = response.status_code, None
        result.headers = {h: response.headers[h] for h in self._keep_headers if h in response.headers}
        if self._keep_body:
            try:
                result.body = response.json()
            except ValueError:
                result.body = None

    def _work(self) -> None:
        with httpx.Client(base_url=self._base_url, headers=self._headers, timeout=self._timeout_s) as client:
            while (index := self._take()) is not None:
                if self._rate:
                    delay = index / self._rate - self.now()
                    if delay > 0 and self._stop.wait(delay):
                        return
                result = Result(index=index, started=self.now())
                started = time.perf_counter()
                self._attempt(client, index, result)
                result.first_status = result.status
                delay = self._retry_delay_s
                while result.attempts <= self._retries and self._retry_if(result.status):
                    time.sleep(delay)
                    delay = min(2 * delay, self._retry_max_delay_s)
                    self._attempt(client, index, result)
                result.latency_s = time.perf_counter() - started
                with self._lock:
                    self.results.append(result)

    def start(self) -> Load:
        """Start the workers in the background."""
        self.t0 = time.monotonic()
        self._threads = [
            threading.Thread(target=self._work, name=f"load-{i}", daemon=True) for i in range(self._workers)
        ]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        """Send nothing new (requests in flight finish)."""
        self._stop.set()

    def join(self, timeout_s: float | None = None) -> list[Result]:
        """Wait for the workers; the results ordered by index."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in self._threads):
            raise TimeoutError(f"load not finished in {timeout_s} s ({len(self.results)}/{self.total} done)")
        return sorted(self.results, key=lambda r: r.index)

    def run(self, timeout_s: float | None = None) -> list[Result]:
        """Send the whole load and wait for it."""
        return self.start().join(timeout_s)

    @property
    def done(self) -> bool:
        """Every worker has finished."""
        return bool(self._threads) and not any(t.is_alive() for t in self._threads)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by the nearest-rank method; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]
