"""The one place that turns ``file://`` URIs into paths and back (percent-encoding included)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse


def is_local(uri: str) -> bool:
    """Whether a URI (or a bare path) names a local file."""
    scheme = urlparse(uri).scheme
    return scheme in ("", "file") or (len(scheme) == 1 and uri[1:2] == ":")


def to_path(uri: str | Path) -> Path:
    """A local path from a ``file://`` URI (percent-decoded) or a bare path.

    Raises:
        ValueError: the URI names something that is not a local file (``s3://…``, ``models:/…``).
    """
    if isinstance(uri, Path):
        return uri
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"{uri} names a file on another host")
        return Path(unquote(parsed.path))
    if parsed.scheme and not (len(parsed.scheme) == 1 and uri[1:2] == ":"):
        raise ValueError(f"{uri} is not a local path")
    return Path(uri).expanduser()


def to_uri(path: str | Path) -> str:
    """A ``file://`` URI for a local path (absolute, percent-encoded)."""
    return Path(path).expanduser().resolve().as_uri()
