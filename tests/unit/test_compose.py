"""The Docker deliverables stay consistent with the chart: pinned images, loopback-only ports, no
literal passwords, a valid Serve config, and an image that pins torch and runs as non-root."""

from __future__ import annotations

import re

import pytest
import yaml

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.unit

COMPOSE = REPO_ROOT / "infra" / "docker-compose.yaml"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_images_are_pinned(compose: dict) -> None:
    for name, service in compose["services"].items():
        image = service["image"]
        repository, _, tag = image.rpartition(":")
        assert repository and tag and tag != "latest", f"{name}: {image}"


def test_compose_ports_bind_loopback_only(compose: dict) -> None:
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name}: {port}"


def test_compose_has_no_literal_passwords() -> None:
    text = COMPOSE.read_text()
    key = r"^\s*[A-Z_]*(?:PASSWORD[A-Z_]*|REDISCLI_AUTH):\s*(?P<env>\S+)"
    url = r"://[^:@/\s]+:(?P<url>[^@\s]+)@"
    matches = list(re.finditer(f"{key}|{url}", text, re.MULTILINE))
    assert matches
    for match in matches:
        value = match["env"] or match["url"]
        assert value.startswith("${"), f"literal credential: {match.group(0)}"


def test_compose_serve_config_is_valid() -> None:
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((REPO_ROOT / "infra" / "compose" / "serve-config.yaml").read_text())
    (app,) = ServeDeploySchema.model_validate(config).applications
    assert app.import_path == "serving.app:build_app"


def test_dockerfile_pins_torch_and_drops_root() -> None:
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    assert "FROM ${PYTHON_IMAGE}" in dockerfile and "python:3.11-slim" in dockerfile
    install_torch = dockerfile.index("torch==2.13.0")
    assert install_torch < dockerfile.index('pip install ".[k8s]"'), (
        "torch must be installed before the project"
    )
    assert re.search(r"^USER 1000", dockerfile, re.MULTILINE)
