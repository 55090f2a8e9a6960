"""The chart lints, renders for every values variant, validates as Kubernetes 1.30 objects and
refuses bad values at render time with a helpful message."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.helm

KUBERNETES_VERSION = "1.30.0"
_CI_VALUES = Path(__file__).resolve().parents[2] / "helm" / "flywheel" / "ci"
VARIANTS = ["default", *sorted(p.name for p in _CI_VALUES.glob("*.yaml"))]


@pytest.mark.parametrize("variant", VARIANTS)
def test_lint_strict(helm_bin: Path, chart_dir: Path, variant: str) -> None:
    args = [] if variant == "default" else ["-f", str(chart_dir / "ci" / variant)]
    proc = subprocess.run(
        [str(helm_bin), "lint", "--strict", str(chart_dir), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_notes_print_port_forwards(helm_bin: Path, chart_dir: Path, tmp_path: Path) -> None:
    # `helm template` skips NOTES.txt: render a copy of it as an ordinary template instead.
    chart = tmp_path / "flywheel"
    shutil.copytree(chart_dir, chart)
    notes = (chart / "templates" / "NOTES.txt").read_text().splitlines()
    (chart / "templates" / "zz-notes.yaml").write_text(
        "notes: |\n" + "\n".join(f"  {line}" for line in notes)
    )
    proc = subprocess.run(
        [
            str(helm_bin),
            "template",
            "fw",
            str(chart),
            "-n",
            "flywheel",
            "--show-only",
            "templates/zz-notes.yaml",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    text = yaml.safe_load(proc.stdout)["notes"]
    for target in (
        "svc/fw-flywheel-serve-serve-svc 8000:8000",
        "svc/fw-flywheel-mlflow 5000:5000",
        "svc/fw-flywheel-airflow-api-server 8080:8080",
        "svc/fw-flywheel-train-head-svc 8265:8265",
    ):
        assert f"kubectl -n flywheel port-forward {target}" in text


def test_core_objects_validate_for_kubernetes_130(rendered, tmp_path: Path) -> None:
    # One kubernetes-validate run over the whole multi-document render: it is slow per object.
    manifest = tmp_path / "rendered.yaml"
    manifest.write_text(rendered.stdout)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kubernetes_validate",
            "--strict",
            "--quiet",
            "-k",
            KUBERNETES_VERSION,
            str(manifest),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "ERROR" not in output and "Couldn't parse" not in output, output
    # Only the KubeRay custom resources may lack a built-in schema (test_chart_crds covers them).
    for line in output.splitlines():
        if "Couldn't find schema" in line:
            assert "api version ray.io/v1" in line, line


def test_render_has_core_components(rendered) -> None:
    kinds = {(d["kind"], d["metadata"]["name"]) for d in rendered.docs}
    assert ("Deployment", "fw-flywheel-mlflow") in kinds
    assert ("StatefulSet", "fw-flywheel-redis") in kinds
    assert ("RayService", "fw-flywheel-serve") in kinds
    assert ("RayCluster", "fw-flywheel-train") in kinds


def test_airflow_toggle(render) -> None:
    on = render()
    off = render("--set", "airflow.enabled=false")
    assert off.returncode == 0, off.stderr
    components = {"api-server", "scheduler", "dag-processor", "triggerer"}
    assert {f"fw-flywheel-airflow-{c}" for c in components} <= {d["metadata"]["name"] for d in on.docs}
    assert not [d for d in off.docs if "airflow" in d["metadata"]["name"]]


def test_serving_and_training_can_be_switched_off(render) -> None:
    result = render("--set", "serve.enabled=false", "--set", "train.enabled=false")
    assert result.returncode == 0, result.stderr
    assert not result.of_kind("RayService") and not result.of_kind("RayCluster")
    assert not result.of_kind("PodDisruptionBudget")
    scheduler = result.one("Deployment", "-airflow-scheduler")
    names = {e["name"] for e in scheduler["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "FLYWHEEL_RAY_ADDRESS" not in names  # tasks then use a local Ray


def test_external_postgresql_replaces_statefulset(render) -> None:
    result = render("--set", "postgresql.enabled=false", "--set", "externalDatabase.existingSecret=db-urls")
    assert result.returncode == 0, result.stderr
    assert not [d for d in result.docs if "postgresql" in d["metadata"]["name"]]
    mlflow = result.one("Deployment", "-mlflow")
    env = {e["name"]: e for e in mlflow["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"] == {
        "name": "db-urls",
        "key": "mlflow-db-url",
    }


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--set", "serve.workers.replicas=-1"), "/serve/workers/replicas"),
        (("--set", "train.workers.maxReplicas=-3"), "/train/workers/maxReplicas"),
        (("--set", "serve.autoscalling.enabled=true"), "additional properties 'autoscalling' not allowed"),
        (("--set", "redis.maxmemoryPolicy=lru"), "/redis/maxmemoryPolicy"),
        (
            ("--set", "externalDatabase.existingSecret=db-urls"),
            "use the in-cluster PostgreSQL or an external one",
        ),
        (("--set", "postgresql.enabled=false"), "no database"),
        (("--set", "image.tag=latest"), "`latest` is not allowed"),
        (("--set", "serve.maxOngoingRequests=2"), "must be >= serve.maxBatchSize"),
        (("--set", "serve.workers.minReplicas=3"), "minReplicas <= replicas <= maxReplicas"),
        (("--set", "mlflow.artifacts.type=s3"), "mlflow.artifacts.s3.bucket is required"),
        (
            ("--set", "ingress.enabled=true", "--set", "serve.enabled=false"),
            "only routes to the inference API",
        ),
    ],
)
def test_bad_values_are_rejected(render, args: tuple[str, ...], message: str) -> None:
    result = render(*args)
    assert result.returncode != 0, f"helm accepted {args}"
    assert message in result.stderr, result.stderr


# --- values.yaml and values.schema.json conventions -------------------------------------------


# Maps whose entries are data, documented by their parent's comment.
_FREE_FORM_PARENTS = {"matchLabels"}


def test_every_value_is_documented(chart_dir: Path) -> None:
    lines = (chart_dir / "values.yaml").read_text().splitlines()
    undocumented = []
    for number, line in enumerate(lines):
        stripped = line.strip()
        if not re.match(r"^[A-Za-z0-9_.\-/]+:(\s|$)", stripped):
            continue
        indent = _indent(line)
        parent = next(
            (
                lines[i]
                for i in range(number - 1, -1, -1)
                if lines[i].strip() and _indent(lines[i]) < indent and not lines[i].strip().startswith("#")
            ),
            "",
        )
        if parent.strip().startswith("- ") or parent.strip().rstrip(":") in _FREE_FORM_PARENTS:
            continue  # an entry of a list item or of a free-form map
        block = number - 1
        while block >= 0 and lines[block].strip().startswith("#") and _indent(lines[block]) == indent:
            if lines[block].strip().startswith("# --"):
                break
            block -= 1
        if block < 0 or not lines[block].strip().startswith("# --") or _indent(lines[block]) != indent:
            undocumented.append(stripped)
    assert not undocumented, f"values without a `# --` comment: {undocumented}"


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _objects(node: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from _objects(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _objects(value, f"{path}/{i}")


def test_schema_closes_every_declared_object(chart_dir: Path) -> None:
    schema = json.loads((chart_dir / "values.schema.json").read_text())
    open_objects = [
        path
        for path, node in _objects(schema)
        if "properties" in node and node.get("additionalProperties") is not False
    ]
    # Serve deployment overrides are Ray's schema, validated by Serve itself.
    assert open_objects in ([], ["/properties/serve/properties/deployments/items"]), open_objects


def test_schema_covers_every_value(chart_dir: Path, render: Callable[..., Any]) -> None:
    # Every default is valid against the schema (helm validates on render) and nothing is left out.
    assert render().returncode == 0
    values = yaml.safe_load((chart_dir / "values.yaml").read_text())
    schema = json.loads((chart_dir / "values.schema.json").read_text())

    def walk(value: Any, node: dict[str, Any], path: str) -> None:
        if isinstance(value, dict) and "properties" in node:
            for key, child in value.items():
                assert key in node["properties"], f"{path}.{key} missing from values.schema.json"
                walk(child, node["properties"][key], f"{path}.{key}")

    walk(values, schema, "")
