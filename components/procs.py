"""Who owns a long-running step: owner records, and killing what a dead command left running.

A command that starts processes (local Ray) writes an owner record (its PID, start time, host
and Ray session) next to its outputs. A watchdog process kills that Ray session within seconds
of the command's death (``kill -9`` included); a later command that finds the record of a dead
owner kills the leftovers again and cleans up after it (:func:`components.train.reap_stale`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Create times are floats from /proc; a reused PID differs by far more than this.
_START_TOLERANCE_S = 1.0


def current_owner() -> dict[str, Any]:
    """This process as an owner: ``pid``, ``started`` (its create time) and ``host``."""
    import psutil

    return {"pid": os.getpid(), "started": psutil.Process().create_time(), "host": socket.gethostname()}


def is_alive(owner: dict[str, Any]) -> bool:
    """Whether the owner process of a record still runs (same PID *and* start time; other hosts: assumed alive).

    Args:
        owner: a record with ``pid``, ``started`` and ``host`` (from :func:`current_owner`).

    Returns:
        False only when the process is known to be gone from this host.
    """
    import psutil

    if owner.get("host") != socket.gethostname():
        return True  # cannot tell from here
    try:
        proc = psutil.Process(int(owner["pid"]))
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return abs(proc.create_time() - float(owner.get("started", 0))) < _START_TOLERANCE_S
    except (psutil.NoSuchProcess, KeyError, ValueError):
        return False
    except psutil.AccessDenied:
        return True


def write_record(path: Path, record: dict[str, Any]) -> None:
    """Write a JSON record atomically (a reader never sees half of it).

    Args:
        path: the file to (over)write.
        record: JSON-serialisable values.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, sort_keys=True, indent=1))
    os.replace(tmp, path)


def read_record(path: Path) -> dict[str, Any] | None:
    """A JSON record written by :func:`write_record`, or None when missing or unreadable."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def session_processes(
    session_dir: str, pids: Iterable[tuple[int, float]] = (), exclude: Iterable[int] = ()
) -> list[Any]:
    """Live processes of one local Ray session, wherever they were reparented to.

    Ray renames its agents and workers (``ray::DashboardAgent``), so a command line does not
    always name the session; every Ray process keeps its log files under the session folder
    open, though. Matched: the session folder in the command line or among the open files, or a
    recorded ``(pid, create_time)``.

    Args:
        session_dir: the Ray session folder (``<temp_dir>/session_…``).
        pids: ``(pid, create_time)`` pairs recorded when the session started.
        exclude: PIDs never to match (the driver, which keeps its own Ray log open).

    Returns:
        ``psutil.Process`` objects, this process excluded.
    """
    import psutil

    recorded = {int(pid): float(started) for pid, started in pids}
    skip = {os.getpid(), *exclude}
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "create_time", "status"]):
        info = proc.info
        if info["pid"] in skip or info["status"] == psutil.STATUS_ZOMBIE:
            continue
        started = recorded.get(info["pid"])
        if started is not None and abs((info["create_time"] or 0) - started) < _START_TOLERANCE_S:
            found.append(proc)
            continue
        if session_dir and any(session_dir in arg for arg in info["cmdline"] or ()):
            found.append(proc)
            continue
        try:
            if session_dir and any(f.path.startswith(session_dir) for f in proc.open_files()):
                found.append(proc)
        except psutil.Error:  # gone, or another user's: not ours
            continue
    return found


def kill_session(
    session_dir: str, pids: Iterable[tuple[int, float]] = (), grace: float = 1.0, exclude: Iterable[int] = ()
) -> list[int]:
    """Terminate every live process of a local Ray session: SIGTERM, then SIGKILL after ``grace`` seconds.

    Ray's agents ignore SIGTERM once their raylet is gone, hence the short grace.

    Args:
        session_dir: the Ray session folder.
        pids: ``(pid, create_time)`` pairs recorded when it started.
        grace: seconds between SIGTERM and SIGKILL.
        exclude: PIDs to leave alone.

    Returns:
        PIDs that were signalled.
    """
    import psutil

    procs = session_processes(session_dir, pids, exclude)
    if not procs:
        return []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)
    log.info("killed %d process(es) of Ray session %s", len(procs), session_dir)
    return [p.pid for p in procs]


def descendants() -> list[tuple[int, float]]:
    """``(pid, create_time)`` of every process this one started, recursively."""
    import psutil

    out = []
    for child in psutil.Process().children(recursive=True):
        try:
            out.append((child.pid, child.create_time()))
        except psutil.Error:
            continue
    return out


def start_watchdog(session_dir: str) -> subprocess.Popen:
    """Start a process that kills the Ray session when this process ends, however it ends.

    It runs in its own session (a terminal's Ctrl-C does not reach it) and watches a pipe from
    this process: end of file (this process exited or was killed) or the word ``done``
    (:func:`stop_watchdog`) makes it kill the session's processes and exit.

    Args:
        session_dir: the Ray session folder this process started.

    Returns:
        The watchdog process; give it to :func:`stop_watchdog` after shutting Ray down.
    """
    code = "import sys; from components.procs import _watchdog_main; _watchdog_main(sys.argv[1:])"
    return subprocess.Popen(
        [sys.executable, "-c", code, str(os.getpid()), session_dir],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )


def stop_watchdog(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """Tell the watchdog this process is done (it kills what is left of the session) and wait for it."""
    try:
        if proc.stdin is not None:
            proc.stdin.write(b"done\n")
            proc.stdin.close()
        proc.wait(timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        log.warning("Ray watchdog %d did not finish in %.0f s", proc.pid, timeout)


def _watchdog_main(argv: list[str]) -> None:
    """The watchdog process: wait for the driver to finish or die, then kill its Ray session."""
    import select

    driver_pid, session_dir = int(argv[0]), argv[1]
    stdin = sys.stdin.fileno()
    while True:
        ready, _, _ = select.select([stdin], [], [], 1.0)
        # "done", end of file (the driver exited or was killed), or we were reparented.
        if ready or os.getppid() != driver_pid:
            break
    time.sleep(0.2)
    # The driver, when alive (it said "done"), still has its Ray log files open: not a leftover.
    kill_session(session_dir, grace=1.0, exclude=[driver_pid])
