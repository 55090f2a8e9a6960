"""Security and operations policy of the rendered chart: generated secrets, nothing but the
inference API exposed, NetworkPolicies, probes and resources everywhere, pinned images."""

from __future__ import annotations

import base64
import re
from typing import Any

import pytest

pytestmark = pytest.mark.helm

RAY_DASHBOARD_PORT = 8265
# Variables holding a credential (not a path to one, not a mode).
SECRET_ENV = re.compile(r"(PASSWORD|TOKEN|SECRET|_KEY|_AUTH)$")
URL_CREDENTIALS = re.compile(r"://(?P<user>[^:/@]*):(?P<password>[^@]+)@")
# Keys that name a user, not a credential.
NON_SECRET_KEYS = {"admin-username"}


def _containers(template: dict[str, Any], init: bool = False) -> list[dict[str, Any]]:
    spec = template["spec"]
    return list(spec.get("containers", [])) + (list(spec.get("initContainers", [])) if init else [])


def _labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


# --- secrets ----------------------------------------------------------------------------------


def test_generated_secrets_are_random_per_install(render) -> None:
    # Without a cluster `lookup` finds nothing, so every install generates afresh: a value that is
    # the same in two renders is a literal written in the chart or its values.
    first, second = render("--set", "fullnameOverride=a"), render("--set", "fullnameOverride=b")
    for secret in first.of_kind("Secret"):
        twin = second.one("Secret", secret["metadata"]["name"].removeprefix("a"))
        for key, value in secret.get("data", {}).items():
            if key in NON_SECRET_KEYS:
                continue
            assert value != twin["data"][key], f"{secret['metadata']['name']}/{key} is a literal"
            assert len(base64.b64decode(value)) >= 24, f"{secret['metadata']['name']}/{key} is short"
        assert "stringData" not in secret, "secrets are generated into data, never written as text"


def test_existing_secrets_replace_generated_ones(render) -> None:
    result = render(
        "--set", "ray.auth.existingSecret=my-ray", "--set", "redis.auth.existingSecret=my-redis",
        "--set", "postgresql.auth.existingSecret=my-pg", "--set", "mlflow.auth.existingSecret=my-mlflow",
        "--set", "airflow.existingSecret=my-airflow",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.of_kind("Secret") == []
    refs = {
        env["valueFrom"]["secretKeyRef"]["name"]
        for _, template in result.pod_templates()
        for container in _containers(template, init=True)
        for env in container.get("env", [])
        if "secretKeyRef" in env.get("valueFrom", {})
    }
    assert {"my-ray", "my-redis", "my-pg", "my-mlflow", "my-airflow"} <= refs
    service = result.one("RayService", "-serve")
    assert service["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "token", "secretName": "my-ray"}


def test_no_literal_credentials_in_env(rendered) -> None:
    for where, template in rendered.pod_templates():
        for container in _containers(template, init=True):
            for env in container.get("env", []):
                name, value = env["name"], env.get("value")
                if SECRET_ENV.search(name):
                    assert value is None, f"{where}/{container['name']}: {name} has a literal value"
                    assert "secretKeyRef" in env.get("valueFrom", {}), f"{where}: {name} not from a Secret"
                if value and (match := URL_CREDENTIALS.search(value)):
                    assert re.fullmatch(r"\$\([A-Z_]+\)", match["password"]), (
                        f"{where}: {name} embeds a password"
                    )


def test_ray_token_auth_is_on(rendered) -> None:
    for kind in ("RayService", "RayCluster"):
        for doc in rendered.of_kind(kind):
            spec = doc["spec"]["rayClusterConfig"] if kind == "RayService" else doc["spec"]
            assert spec["authOptions"]["mode"] == "token"
            assert spec["authOptions"]["secretName"]


def test_mlflow_runs_basic_auth_with_secret_admin(rendered) -> None:
    mlflow = rendered.one("Deployment", "-mlflow")
    container = mlflow["spec"]["template"]["spec"]["containers"][0]
    script = " ".join(container["command"] + container.get("args", []))
    assert "--app-name basic-auth" in script
    assert re.search(r"--workers \d+", script)
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"]["value"] == "false"
    for name in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert "secretKeyRef" in env[name]["valueFrom"]


def test_redis_is_a_bounded_lru_cache_with_a_password(rendered) -> None:
    redis = rendered.one("StatefulSet", "-redis")
    container = redis["spec"]["template"]["spec"]["containers"][0]
    script = " ".join(container["command"] + container["args"])
    assert '--requirepass "$REDIS_PASSWORD"' in script
    assert "--maxmemory 256mb" in script and "--maxmemory-policy allkeys-lru" in script


# --- exposure ---------------------------------------------------------------------------------


def test_ray_dashboard_never_leaves_the_cluster(rendered) -> None:
    for service in rendered.of_kind("Service"):
        if service["spec"].get("type", "ClusterIP") != "ClusterIP":
            ports = {p["port"] for p in service["spec"]["ports"]} | {
                p.get("targetPort") for p in service["spec"]["ports"]
            }
            assert RAY_DASHBOARD_PORT not in ports and "dashboard" not in ports, service["metadata"]["name"]
    for kind in ("RayService", "RayCluster"):
        for doc in rendered.of_kind(kind):
            spec = doc["spec"]["rayClusterConfig"] if kind == "RayService" else doc["spec"]
            head = spec["headGroupSpec"]
            assert head.get("serviceType", "ClusterIP") == "ClusterIP"
            assert not head.get("enableIngress", False)


def test_only_the_inference_api_has_an_ingress(rendered) -> None:
    for ingress in rendered.of_kind("Ingress"):
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                assert backend["name"] == "fw-flywheel-serve-serve-svc"
                assert backend["port"] == {"number": 8000}


def test_ingress_variant_routes_to_the_api(render, chart_dir) -> None:
    result = render("-f", str(chart_dir / "ci" / "ingress-values.yaml"))
    (ingress,) = result.of_kind("Ingress")
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["tls"][0]["secretName"] == "flywheel-api-tls"


# --- NetworkPolicies --------------------------------------------------------------------------


def _policies_selecting(rendered, labels: dict[str, str]) -> list[dict[str, Any]]:
    return [
        policy
        for policy in rendered.of_kind("NetworkPolicy")
        if _labels_match(policy["spec"]["podSelector"].get("matchLabels", {}), labels)
    ]


def _release_only(rule: dict[str, Any]) -> bool:
    peers = rule.get("from")
    return bool(peers) and all(
        set(peer) == {"podSelector"}
        and peer["podSelector"]["matchLabels"]
        == {"app.kubernetes.io/name": "flywheel", "app.kubernetes.io/instance": "fw"}
        for peer in peers
    )


def test_ray_heads_accept_only_release_pods_and_the_operator(rendered) -> None:
    heads = [(where, t) for where, t in rendered.pod_templates() if where.endswith("/head")]
    assert heads
    for where, template in heads:
        policies = _policies_selecting(rendered, template["metadata"]["labels"])
        assert policies, f"no NetworkPolicy selects {where}"
        for policy in policies:
            assert policy["spec"]["policyTypes"] == ["Ingress"]
            for rule in policy["spec"]["ingress"]:
                ports = {p["port"] for p in rule.get("ports", [])}
                if _release_only(rule):
                    continue
                # Anyone else reaches at most the dashboard for the operator and the API port.
                assert rule.get("from") or ports == {8000}, f"{where}: open rule {rule}"
                if RAY_DASHBOARD_PORT in ports:
                    (peer,) = rule["from"]
                    assert peer["podSelector"]["matchLabels"] == {
                        "app.kubernetes.io/name": "kuberay-operator"
                    }
                assert not ports & {6379, 10001}, f"{where}: GCS/client open beyond the release"


@pytest.mark.parametrize("component", ["redis", "postgresql", "mlflow"])
def test_stores_accept_only_release_pods(rendered, component: str) -> None:
    workloads = [
        d
        for d in rendered.docs
        if d["kind"] in {"Deployment", "StatefulSet"}
        and d["metadata"]["labels"]["app.kubernetes.io/component"] == component
    ]
    if component == "postgresql" and not workloads:
        return  # the external-PostgreSQL variant runs no database of its own
    (workload,) = workloads
    policies = _policies_selecting(rendered, workload["spec"]["template"]["metadata"]["labels"])
    assert policies, f"no NetworkPolicy for {component}"
    for policy in policies:
        assert all(_release_only(rule) for rule in policy["spec"]["ingress"]), policy["metadata"]["name"]


# --- workloads --------------------------------------------------------------------------------


def test_every_container_has_resources_and_probes(rendered) -> None:
    for where, template in rendered.pod_templates():
        for container in _containers(template):
            label = f"{where}/{container['name']}"
            resources = container.get("resources", {})
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(bound, {})), f"{label}: {bound}"
            assert container.get("livenessProbe"), f"{label}: no livenessProbe"
            assert container.get("readinessProbe"), f"{label}: no readinessProbe"
        # Kubernetes forbids probes on init containers; they still need resources.
        for container in template["spec"].get("initContainers", []):
            assert {"requests", "limits"} <= set(container.get("resources", {})), (
                f"{where}/{container['name']}"
            )


def test_images_are_pinned(rendered) -> None:
    for where, template in rendered.pod_templates():
        for container in _containers(template, init=True):
            image = container["image"]
            name, _, tag = image.rpartition(":")
            assert name and "/" not in tag, f"{where}: untagged image {image}"
            assert tag != "latest", f"{where}: {image}"
    default_tag = rendered.one("Deployment", "-mlflow")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert default_tag.endswith(":0.1.0")


def test_gpu_groups_use_the_gpu_image_and_request_gpus(render, chart_dir) -> None:
    result = render("-f", str(chart_dir / "ci" / "gpu-values.yaml"))
    gpu = [(w, t) for w, t in result.pod_templates() if w.endswith("/gpu")]
    assert len(gpu) == 2
    for where, template in gpu:
        container = template["spec"]["containers"][0]
        assert container["image"].endswith(":0.1.0-gpu"), where
        assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1, where
        assert template["spec"]["tolerations"], where


def test_serving_has_a_disruption_budget(rendered) -> None:
    (pdb,) = rendered.of_kind("PodDisruptionBudget")
    selector = pdb["spec"]["selector"]["matchLabels"]
    workers = [
        t for w, t in rendered.pod_templates() if w.startswith("RayService/") and not w.endswith("/head")
    ]
    assert workers
    for template in workers:
        assert _labels_match(
            {k: v for k, v in selector.items() if k != "ray.io/node-type"}, template["metadata"]["labels"]
        )
    assert selector["ray.io/node-type"] == "worker"


# --- wiring -----------------------------------------------------------------------------------

APP_ENV = {
    "FLYWHEEL_HOME",
    "FLYWHEEL_MLFLOW_TRACKING_URI",
    "FLYWHEEL_MLFLOW_ARTIFACT_URI",
    "FLYWHEEL_FEEDBACK_DB_URL",
    "FLYWHEEL_REDIS_URL",
    "FLYWHEEL_MODEL_NAME",
    "FLYWHEEL_SERVE_PORT",
}


def test_app_containers_get_flywheel_settings(rendered) -> None:
    for where, template in rendered.pod_templates():
        if not where.startswith(("RayService/", "RayCluster/", "Deployment/fw-flywheel-airflow")):
            continue
        container = template["spec"]["containers"][0]
        names = {env["name"] for env in container["env"]}
        assert names >= APP_ENV, f"{where}: missing {APP_ENV - names}"
        assert len(names) == len(container["env"]), f"{where}: duplicate env names"
        if where.startswith("Deployment/fw-flywheel-airflow"):
            env = {e["name"]: e for e in container["env"]}
            assert (
                env["FLYWHEEL_RAY_ADDRESS"]["value"] == "http://fw-flywheel-train-head-svc.flywheel.svc:8265"
            )
            assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "auth_token"
            assert env["AIRFLOW__CORE__DAGS_FOLDER"]["value"] == "/opt/flywheel/dags"


def test_airflow_components(rendered) -> None:
    airflow = {
        d["metadata"]["name"].removeprefix("fw-flywheel-airflow-")
        for d in rendered.of_kind("Deployment")
        if d["metadata"]["name"].startswith("fw-flywheel-airflow-")
    }
    assert airflow in (set(), {"api-server", "scheduler", "dag-processor", "triggerer"})
