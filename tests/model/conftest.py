"""Model-test fixtures: one local Ray session shared by every training test, shut down at the end."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray instance for the whole session (each ``train`` call reuses it, none starts its own)."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        yield ray
        return
    # Short temp dir under /tmp: Ray's Unix socket paths must stay under 107 bytes, and pytest's
    # temp folders are too deep for that.
    temp_dir = Path(tempfile.mkdtemp(prefix="fw-ray-", dir="/tmp"))
    ray.init(
        num_cpus=max(os.cpu_count() or 1, 2),
        include_dashboard=False,
        _temp_dir=str(temp_dir),
        log_to_driver=False,
    )
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
