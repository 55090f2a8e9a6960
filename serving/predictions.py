"""The prediction log writer: buffers served predictions and writes them off the request path."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from components.feedback_store import FeedbackStore
    from components.schemas import Prediction

log = logging.getLogger(__name__)

MAX_BUFFERED = 100_000  # rows kept while the store is down; beyond this the oldest are dropped (logged)


class PredictionLog:
    """A background thread that writes buffered predictions every few seconds or N rows, and on close."""

    def __init__(self, store: FeedbackStore, flush_s: float, flush_rows: int) -> None:
        """Start the writer thread.

        Args:
            store: where predictions are recorded.
            flush_s: longest a row waits in the buffer.
            flush_rows: rows that trigger a write before the interval ends.
        """
        self._store = store
        self._flush_s = flush_s
        self._flush_rows = flush_rows
        self._rows: list[Prediction] = []
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.written = 0
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
        self._thread.start()

    def add(self, prediction: Prediction) -> None:
        """Buffer one prediction (never blocks on the store)."""
        with self._lock:
            self._rows.append(prediction)
            if len(self._rows) > MAX_BUFFERED:
                dropped = self._rows.pop(0)
                log.error("prediction log buffer full: dropped %s", dropped.request_id)
            full = len(self._rows) >= self._flush_rows
        if full:
            self._wake.set()

    def pending(self, request_id: str) -> bool:
        """Whether a prediction is buffered and not written yet."""
        with self._lock:
            return any(p.request_id == request_id for p in self._rows)

    @property
    def buffered(self) -> int:
        """Rows waiting to be written."""
        with self._lock:
            return len(self._rows)

    def flush(self) -> int:
        """Write every buffered row now (rows stay buffered if the store fails).

        Returns:
            Rows written.
        """
        with self._flush_lock:
            with self._lock:
                rows, self._rows = self._rows, []
            if not rows:
                return 0
            try:
                self._store.record_predictions(rows)
            except Exception:  # the store may be restarting: keep the rows for the next round
                log.exception("writing %d predictions failed: kept for the next flush", len(rows))
                with self._lock:
                    self._rows[:0] = rows
                return 0
            self.written += len(rows)
            return len(rows)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._flush_s)
            self._wake.clear()
            self.flush()

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the thread and write what is left."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout_s)
        left = self.flush()
        log.info("prediction log closed (%d rows written at close, %d left)", left, self.buffered)
