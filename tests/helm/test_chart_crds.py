"""RayService and RayCluster validate against the KubeRay v1.7.0 CRD schemas, and the embedded
Serve config validates with Ray Serve's own schema."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

pytestmark = pytest.mark.helm

_KUBERNETES_EXTENSIONS = "x-kubernetes-"


def openapi_to_jsonschema(node: Any) -> Any:
    """Turn a CRD's structural `openAPIV3Schema` into a strict JSON Schema.

    Handles `nullable`, `x-kubernetes-int-or-string` and `x-kubernetes-preserve-unknown-fields`;
    an object that declares `properties` and does not preserve unknown fields gets
    `additionalProperties: false`, as the API server prunes (and `kubectl --validate=strict`
    rejects) unknown fields there.
    """
    if isinstance(node, list):
        return [openapi_to_jsonschema(item) for item in node]
    if not isinstance(node, dict):
        return node
    if node.get("x-kubernetes-int-or-string"):
        string = {"type": "string", **({"pattern": node["pattern"]} if "pattern" in node else {})}
        return {"anyOf": [{"type": "integer"}, string]}
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith(_KUBERNETES_EXTENSIONS) or key in {"nullable", "description", "format"}:
            continue
        if key == "properties":
            out[key] = {name: openapi_to_jsonschema(child) for name, child in value.items()}
        elif key in {"items", "additionalProperties", "not", "allOf", "anyOf", "oneOf"}:
            # Sub-schemas (a boolean additionalProperties passes through unchanged).
            out[key] = openapi_to_jsonschema(value)
        else:
            out[key] = value
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if "properties" in out and not node.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("additionalProperties", False)
    return out


@functools.cache
def _crd_validator(crd_file: Path) -> jsonschema.Draft7Validator:
    crd = yaml.safe_load(crd_file.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = openapi_to_jsonschema(version["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


_CRD_FILES = {"RayService": "ray.io_rayservices.yaml", "RayCluster": "ray.io_rayclusters.yaml"}


def test_ray_resources_match_kuberay_crds(rendered, crd_dir: Path) -> None:
    ray_docs = [d for d in rendered.docs if d["kind"] in _CRD_FILES]
    assert ray_docs, "no RayService or RayCluster rendered"
    for doc in ray_docs:
        assert doc["apiVersion"] == "ray.io/v1"
        validator = _crd_validator(crd_dir / _CRD_FILES[doc["kind"]])
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
        assert not errors, f"{doc['kind']}/{doc['metadata']['name']}: {errors[:10]}"


def test_converter_is_strict(crd_dir: Path) -> None:
    # The converted schema must reject what the API server would: a typo'd field, a wrong type.
    validator = _crd_validator(crd_dir / _CRD_FILES["RayCluster"])
    good = {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": "x"},
        "spec": {
            "headGroupSpec": {
                "rayStartParams": {},
                "template": {"spec": {"containers": [{"name": "ray-head", "image": "i:1"}]}},
            }
        },
    }
    assert not list(validator.iter_errors(good))
    typo = yaml.safe_load(yaml.safe_dump(good))
    typo["spec"]["headGroupSpec"]["serviceTyp"] = "ClusterIP"
    assert list(validator.iter_errors(typo))
    wrong = yaml.safe_load(yaml.safe_dump(good))
    wrong["spec"]["enableInTreeAutoscaling"] = "yes"
    assert list(validator.iter_errors(wrong))


def test_serve_config_validates_with_ray_serve(rendered) -> None:
    from ray.serve.schema import ServeDeploySchema

    for service in rendered.of_kind("RayService"):
        config = yaml.safe_load(service["spec"]["serveConfigV2"])
        schema = ServeDeploySchema.model_validate(config)
        (app,) = schema.applications
        assert app.import_path == "serving.app:build_app"
        assert app.route_prefix == "/"
        assert {"model_name", "model_alias", "max_batch_size"} <= set(app.args)
        assert app.args["model_name"] == "flywheel-support"
        assert app.args["model_alias"] == "champion"
        assert app.args["max_batch_size"] == 8
        assert app.args["max_ongoing_requests"] >= app.args["max_batch_size"]
        # Exactly one way of sizing the replicas.
        assert ("num_replicas" in app.args) != ("autoscaling_config" in app.args)
        assert schema.http_options.port == 8000


def test_serve_args_follow_values(render) -> None:
    result = render(
        "--set", "model.name=acme-support", "--set", "model.alias=challenger", "--set", "serve.maxBatchSize=4",
        "--set", "serve.autoscaling.enabled=true", "--set", "serve.extraArgs.max_new_tokens_cap=256",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.one("RayService", "-serve")["spec"]["serveConfigV2"])
    args = config["applications"][0]["args"]
    assert args["model_name"] == "acme-support"
    assert args["model_alias"] == "challenger"
    assert args["max_batch_size"] == 4
    assert args["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 4}
    assert "num_replicas" not in args
    assert args["max_new_tokens_cap"] == 256
    cluster = result.one("RayService", "-serve")["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
