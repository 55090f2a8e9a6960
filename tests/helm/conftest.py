"""Fixtures for the Helm chart tests: the helm binary, cached renders and the KubeRay CRDs.

Nothing here needs a cluster: the chart is rendered with `helm template` and checked offline.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import require

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART = REPO_ROOT / "helm" / "flywheel"
# CI lays shared/ beside the clone, so the CRDs resolve relative to the repository root.
CRD_DIR = REPO_ROOT.parent / "shared" / "k8s-crds" / "kuberay-v1.7.0"
RELEASE = "fw"
NAMESPACE = "flywheel"
VARIANTS = ["default", *sorted(p.name for p in (CHART / "ci").glob("*.yaml"))]


def find_helm() -> Path | None:
    """Locate helm: $FLYWHEEL_HELM, then <repo>/.tools/bin/helm, then PATH."""
    if env := os.environ.get("FLYWHEEL_HELM"):
        return Path(env)
    local = REPO_ROOT / ".tools" / "bin" / "helm"
    if local.is_file() and os.access(local, os.X_OK):
        return local
    found = shutil.which("helm")
    return Path(found) if found else None


@pytest.fixture(scope="session")
def helm_bin() -> Path:
    """The helm binary; skipped locally (failed in CI) when it is not installed."""
    helm = find_helm()
    require(
        helm is not None and helm.exists(),
        "helm not found: run infra/ci/install_helm.sh (or set FLYWHEEL_HELM)",
    )
    return helm


class Render:
    """One `helm template` run: exit code, output and the parsed documents."""

    def __init__(self, proc: subprocess.CompletedProcess[str]) -> None:
        self.returncode = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        self.docs: list[dict[str, Any]] = (
            [d for d in yaml.safe_load_all(proc.stdout) if d] if proc.returncode == 0 else []
        )

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        """Documents of one kind."""
        return [d for d in self.docs if d.get("kind") == kind]

    def one(self, kind: str, name_suffix: str) -> dict[str, Any]:
        """The single document of `kind` whose name ends with `name_suffix`."""
        found = [d for d in self.of_kind(kind) if d["metadata"]["name"].endswith(name_suffix)]
        assert len(found) == 1, f"expected one {kind} *{name_suffix}, found {len(found)}"
        return found[0]

    def pod_templates(self) -> list[tuple[str, dict[str, Any]]]:
        """(label, pod template) pairs of every workload and Ray custom resource."""
        out: list[tuple[str, dict[str, Any]]] = []
        for doc in self.docs:
            kind, name = doc["kind"], doc["metadata"]["name"]
            if kind in {"Deployment", "StatefulSet", "DaemonSet", "Job"}:
                out.append((f"{kind}/{name}", doc["spec"]["template"]))
            elif kind in {"RayCluster", "RayService"}:
                spec = doc["spec"]["rayClusterConfig"] if kind == "RayService" else doc["spec"]
                out.append((f"{kind}/{name}/head", spec["headGroupSpec"]["template"]))
                for group in spec.get("workerGroupSpecs", []):
                    out.append((f"{kind}/{name}/{group['groupName']}", group["template"]))
        return out


def _helm_template(helm: Path, args: tuple[str, ...]) -> Render:
    cmd = [str(helm), "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    return Render(proc)


@pytest.fixture(scope="session")
def render(helm_bin: Path) -> Callable[..., Render]:
    """Render the chart with extra helm args (`-f file`, `--set k=v`); results are cached."""
    return functools.lru_cache(maxsize=None)(lambda *args: _helm_template(helm_bin, args))


def _variant_args(variant: str) -> tuple[str, ...]:
    """Helm args of a named values variant (`default` or a file in helm/flywheel/ci/)."""
    return () if variant == "default" else ("-f", str(CHART / "ci" / variant))


@pytest.fixture(scope="session", params=VARIANTS)
def rendered(request: pytest.FixtureRequest, render: Callable[..., Render]) -> Render:
    """The chart rendered with each values variant; the render itself must succeed."""
    result = render(*_variant_args(request.param))
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="session")
def crd_dir() -> Path:
    """The KubeRay CRD folder; skipped locally (failed in CI) when it is absent."""
    require(CRD_DIR.is_dir(), f"KubeRay CRDs not found at {CRD_DIR}")
    return CRD_DIR


@pytest.fixture(scope="session")
def chart_dir() -> Path:
    """The chart folder."""
    return CHART
