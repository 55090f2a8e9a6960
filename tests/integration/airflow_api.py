"""A small client of the Airflow 3 REST API (v2) of the local stack, for tests and benchmarks.

Only what they need: a JWT from the simple auth manager (the admin password ``airflow
standalone`` writes under its home), DAG parsing and unpausing, asset events, DAG runs, task
instances, XComs and task logs. Every wait is bounded and says what it waited for.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

# A run or task ends in one of these (Airflow's terminal states).
RUN_DONE = frozenset({"success", "failed"})
TASK_DONE = frozenset({"success", "failed", "skipped", "upstream_failed", "removed"})


class AirflowAPI:
    """The REST API of one local Airflow (``airflow standalone``) on loopback."""

    def __init__(self, url: str, airflow_home: Path, timeout_s: float = 30.0) -> None:
        """Bind to an Airflow.

        Args:
            url: base URL, e.g. ``http://127.0.0.1:8080``.
            airflow_home: its AIRFLOW_HOME, where the generated admin password lies.
            timeout_s: per-request timeout.
        """
        self.url = url.rstrip("/")
        self.airflow_home = airflow_home
        self._client = httpx.Client(base_url=self.url, timeout=timeout_s)

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self._client.close()

    # Auth ------------------------------------------------------------------------------------

    def login(self, username: str = "admin") -> None:
        """Get a JWT from ``POST /auth/token`` with the generated password and send it from now on.

        Args:
            username: the simple auth manager user (``standalone`` creates ``admin``).
        """
        passwords = json.loads(
            (self.airflow_home / "simple_auth_manager_passwords.json.generated").read_text()
        )
        response = self._client.post(
            "/auth/token", json={"username": username, "password": passwords[username]}
        )
        response.raise_for_status()
        self._client.headers["Authorization"] = f"Bearer {response.json()['access_token']}"

    # Requests --------------------------------------------------------------------------------

    def get(self, path: str, **params: Any) -> Any:
        """``GET /api/v2{path}`` → JSON (raises on an HTTP error)."""
        response = self._client.get(f"/api/v2{path}", params=params or None)
        response.raise_for_status()
        return response.json()

    def _send(self, method: str, path: str, body: dict[str, Any]) -> Any:
        response = self._client.request(method, f"/api/v2{path}", json=body)
        if response.is_error:
            raise httpx.HTTPStatusError(
                f"{method} {path}: {response.status_code} {response.text[:500]}",
                request=response.request,
                response=response,
            )
        return response.json()

    # DAGs, assets, runs ----------------------------------------------------------------------

    def wait_for_dags(self, dag_ids: list[str], timeout_s: float) -> dict[str, dict[str, Any]]:
        """Wait until the DAG processor has parsed and serialised every DAG named.

        Args:
            dag_ids: the DAGs to wait for.
            timeout_s: longest wait.

        Returns:
            dag_id → the DAG's record.

        Raises:
            AssertionError: an import error in the DAGs folder, or a DAG still missing at the deadline.
        """
        found: dict[str, dict[str, Any]] = {}

        def parsed() -> bool:
            errors = self.get("/importErrors")["import_errors"]
            assert not errors, f"DAG import errors: {errors}"
            for dag_id in dag_ids:
                if dag_id not in found:
                    response = self._client.get(f"/api/v2/dags/{dag_id}")
                    if response.status_code == 200:
                        found[dag_id] = response.json()
            return len(found) == len(dag_ids)

        wait_until(parsed, timeout_s, f"DAGs {dag_ids} parsed")
        return found

    def unpause(self, dag_id: str) -> None:
        """Unpause a DAG (new DAGs are created paused unless the config says otherwise)."""
        self._send("PATCH", f"/dags/{dag_id}", {"is_paused": False})

    def asset_id(self, uri: str) -> int:
        """The id of the asset with this URI (registered when a DAG that uses it was parsed)."""
        assets = [a for a in self.get("/assets", uri_pattern=uri)["assets"] if a["uri"] == uri]
        assert len(assets) == 1, f"asset {uri}: {assets}"
        return assets[0]["id"]

    def create_asset_event(self, asset_id: int, extra: dict[str, Any]) -> dict[str, Any]:
        """Record an asset event (as a producer task's outlet would), with ``extra``."""
        return self._send("POST", "/assets/events", {"asset_id": asset_id, "extra": extra})

    def trigger(self, dag_id: str, conf: dict[str, Any], run_id: str | None = None) -> dict[str, Any]:
        """Trigger a manual run with ``conf`` (the DAG's params); returns the new run's record."""
        body: dict[str, Any] = {"logical_date": None, "conf": conf}
        if run_id:
            body["dag_run_id"] = run_id
        return self._send("POST", f"/dags/{dag_id}/dagRuns", body)

    def runs(self, dag_id: str) -> list[dict[str, Any]]:
        """The DAG's runs, oldest first."""
        return self.get(f"/dags/{dag_id}/dagRuns", order_by="id", limit=100)["dag_runs"]

    def run(self, dag_id: str, run_id: str) -> dict[str, Any]:
        """One run's record (``state``, ``run_type``, ``start_date``, ``end_date``, …)."""
        return self.get(f"/dags/{dag_id}/dagRuns/{run_id}")

    def task_instances(self, dag_id: str, run_id: str) -> dict[str, dict[str, Any]]:
        """task_id → the task instance's record (``state``, ``start_date``, ``end_date``, ``try_number``)."""
        body = self.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances", limit=100)
        return {ti["task_id"]: ti for ti in body["task_instances"]}

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value") -> Any:
        """A task's XCom value, deserialised."""
        path = f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/{key}"
        return self.get(path, deserialize="true")["value"]

    def log(self, dag_id: str, run_id: str, task_id: str, try_number: int = 1) -> str:
        """The text of one try's task log (every event's message, one a line)."""
        path = f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{try_number}"
        body = self.get(path, full_content="true")
        content = body.get("content", body)
        if isinstance(content, str):
            return content
        return "\n".join(
            str(item.get("event", item)) if isinstance(item, dict) else str(item) for item in content
        )

    def wait_for_run(self, dag_id: str, run_id: str, timeout_s: float) -> dict[str, Any]:
        """Wait until a run ends (success or failed); returns its record."""
        record: dict[str, Any] = {}

        def done() -> bool:
            record.update(self.run(dag_id, run_id))
            return record["state"] in RUN_DONE

        try:
            wait_until(done, timeout_s, f"{dag_id} run {run_id} finished")
        except AssertionError as exc:
            states = {t: ti["state"] for t, ti in self.task_instances(dag_id, run_id).items()}
            raise AssertionError(f"{exc}; run state {record.get('state')}, tasks {states}") from None
        return record


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 1.0) -> None:
    """Poll ``condition`` until it holds; an AssertionError naming ``what`` after ``timeout_s``.

    Args:
        condition: returns True when done (its AssertionErrors pass through: they are verdicts).
        timeout_s: longest wait.
        what: said in the error.
        poll_s: seconds between polls.
    """
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while True:
        try:
            if condition():
                return
        except httpx.HTTPError as exc:  # the API server restarting or busy: try again
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what} ({last})")
        time.sleep(poll_s)
