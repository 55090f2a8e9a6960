"""Named inter-process locks under the flywheel home (``<home>/locks/<name>.lock``).

Steps that must not run twice at once for the same thing (training one params hash, moving an
alias) take one of these. The OS releases the lock when its holder dies, ``kill -9`` included,
so a crashed command never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from pathlib import Path

from components.errors import Conflict

log = logging.getLogger(__name__)

_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")


def lock_path(home: Path, name: str) -> Path:
    """The lock file of ``name`` under ``home`` (characters other than ``[A-Za-z0-9._-]`` become ``_``).

    Args:
        home: the flywheel home.
        name: what is locked, e.g. ``train-<params hash>``.

    Returns:
        ``<home>/locks/<name>.lock``.
    """
    return Path(home) / "locks" / f"{_SAFE_NAME.sub('_', name)}.lock"


@contextlib.contextmanager
def hold(home: Path, name: str, *, timeout: float | None = None, what: str | None = None) -> Iterator[Path]:
    """Hold the named lock for the ``with`` block, waiting for another holder to let go.

    Args:
        home: the flywheel home.
        name: what is locked (one file per name).
        timeout: seconds to wait at most; None waits as long as the holder holds it.
        what: words for the log line shown while waiting (default: the name).

    Returns:
        A context manager yielding the lock file's path.

    Raises:
        Conflict: the lock was still held after ``timeout`` seconds.
    """
    from filelock import FileLock, Timeout

    path = lock_path(home, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.warning("waiting for another process that holds %s (%s)", what or name, path)
        try:
            lock.acquire(timeout=-1 if timeout is None else timeout)
        except Timeout:
            raise Conflict(
                f"{what or name} is held by another process (lock {path}); try again later"
            ) from None
    try:
        yield path
    finally:
        lock.release()
