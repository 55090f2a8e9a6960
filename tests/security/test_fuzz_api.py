"""Fuzzing the served API from its own OpenAPI schema with schemathesis (every operation).

``st run`` generates a few hundred requests from ``/openapi.json`` — schema examples, boundary
values (coverage phase) and random valid and invalid bodies (fuzzing phase) — against the real
Ray Serve app, with an admin API key so ``/admin/*`` is reached too. Its checks hold the API to
its schema: no 5xx, documented status codes and content types, response bodies that match their
schemas, invalid input rejected, undocumented methods answered 405, and (``ignored_auth``) every
operation that declares the bearer scheme refusing a request without or with a wrong key.
``positive_data_acceptance`` is left out on purpose: the server rejects schema-valid requests for
reasons a static schema cannot state (``max_tokens`` over this server's cap, a prompt over its
token limit), with 422 / 413, which is the contract.

Every exchange is recorded (HAR) and read back here: the figures count 5xx answers and 4xx answers
without the JSON error body ``{"error": {"message", "type", "code"}}`` (both must be 0).
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.conftest import require

pytestmark = [pytest.mark.security]

MAX_EXAMPLES = 25  # per operation and phase: ~350 requests over the 9 operations
MIN_REQUESTS = 300
RUN_TIMEOUT_S = 240
# Every check schemathesis has but positive_data_acceptance (see the module docstring).
EXCLUDED_CHECKS = "positive_data_acceptance"


def _st() -> Path:
    st = Path(sys.executable).parent / "st"
    require(st.exists(), "the schemathesis CLI (pip install -e '.[dev]')")
    return st


def _har_text(content: dict) -> str:
    text = content.get("text") or ""
    return base64.b64decode(text).decode("utf-8", "replace") if content.get("encoding") == "base64" else text


def _is_json_error(response: dict) -> bool:
    """Whether a HAR response carries the API's JSON error body."""
    try:
        body = json.loads(_har_text(response["content"]))
    except ValueError:
        return False
    error = body.get("error") if isinstance(body, dict) else None
    return (
        response["content"].get("mimeType", "").startswith("application/json")
        and isinstance(error, dict)
        and all(isinstance(error.get(k), str) and error[k] for k in ("message", "type", "code"))
    )


def test_schemathesis_finds_no_server_error_and_only_json_errors(secure_app, figures, tmp_path: Path) -> None:
    st = _st()
    schema = httpx.get(f"{secure_app.url}/openapi.json", timeout=30).json()
    operations = {(m.upper(), p) for p, ops in schema["paths"].items() for m in ops}
    # ignored_auth needs to know which operations take a key: all but health declare the bearer scheme.
    unsecured = {
        (m.upper(), p)
        for p, ops in schema["paths"].items()
        for m, op in ops.items()
        if {"HTTPBearer": []} not in op.get("security", [])
    }
    assert unsecured == {("GET", "/healthz"), ("GET", "/readyz")}, unsecured
    har = tmp_path / "fuzz.har.json"
    command = [
        str(st), "run", f"{secure_app.url}/openapi.json",
        "--header", f"Authorization: Bearer {secure_app.key(admin=True)}",
        "--checks", "all", "--exclude-checks", EXCLUDED_CHECKS,
        "--phases", "examples,coverage,fuzzing",
        "--max-examples", str(MAX_EXAMPLES), "--seed", "0", "--no-shrink",
        "--workers", "1", "--request-timeout", "30", "--generation-database", "none",
        "--report", "har", "--report-har-path", str(har), "--no-color",
    ]  # fmt: skip
    # Run in an empty folder: no schemathesis.toml or hypothesis database of anyone else's applies.
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    report = run.stdout[-6000:] + run.stderr[-2000:]
    found = re.search(r"(\d+) unique failures?", run.stdout)
    failures = 0 if run.returncode == 0 else int(found[1]) if found else 1
    assert har.exists(), report

    entries = json.loads(har.read_text())["log"]["entries"]
    statuses = Counter(e["response"]["status"] for e in entries)
    server_errors = [e for e in entries if e["response"]["status"] >= 500]
    bare_4xx = [
        e for e in entries if 400 <= e["response"]["status"] < 500 and not _is_json_error(e["response"])
    ]
    fuzzed = {
        (e["request"]["method"], "/" + e["request"]["url"].split("/", 3)[3].split("?")[0]) for e in entries
    }
    generated = sum(
        1 for e in entries if e["response"]["status"] == 200 and e["request"]["url"].endswith("completions")
    )
    missed_operations = operations - fuzzed

    figures.record(
        "fuzzed requests", len(entries), goal=f">= {MIN_REQUESTS}", ok=len(entries) >= MIN_REQUESTS
    )
    figures.record(
        "operations fuzzed",
        f"{len(operations - missed_operations)}/{len(operations)}",
        goal="all",
        ok=not missed_operations,
    )
    figures.record("answers from the model", generated, goal="> 0", ok=generated > 0)
    figures.record("5xx responses", len(server_errors), goal="0", ok=not server_errors)
    figures.record("4xx without a JSON error body", len(bare_4xx), goal="0", ok=not bare_4xx)
    figures.record("schemathesis check failures", failures, goal="0", ok=run.returncode == 0)

    def show(sample: list[dict]) -> list[tuple]:
        return [(e["request"]["method"], e["request"]["url"], e["response"]["status"]) for e in sample[:5]]

    assert not server_errors, show(server_errors)
    assert not bare_4xx, show(bare_4xx)
    assert not missed_operations, missed_operations
    assert len(entries) >= MIN_REQUESTS, (len(entries), statuses)
    assert generated > 0, statuses  # the fuzz reached the model, not only the validators
    assert run.returncode == 0, report
