"""Authentication and exposure: API keys on every route, no PII in logs or datasets, no pickles
from the registry, and a chart that keeps Ray's control plane and credentials inside the cluster.

- Every route of the app's route table (the FastAPI app the ingress builds, docs included) and of
  its served ``/openapi.json`` answers 401 without a key, with a wrong, malformed, revoked or
  hashed key, and 403 to a non-admin key on ``/admin/*``; only health, the schema and its docs
  (and Serve's own ``/-/routes`` and ``/-/healthz``) are public. tests/serving/test_api.py covers
  the single cases and the limits (429, 413, 422, 503); this sweeps them all.
- Keys are stored hashed: no plaintext key is in the store's files or in any log.
- PII (e-mail, phone, card, IBAN) sent in prompts and feedback never reaches a log line or a
  built dataset (splits, replay set, exports, review file). The prediction log is the
  access-controlled system of record and keeps text as received; the builder redacts it.
- The registry never runs a model's code: a version whose weights are a pickle, a pyfunc
  pickle, a pickle renamed ``.safetensors``, custom code in ``auto_map`` or a source outside the
  artifact store is refused by ``components.predict.load`` and by the served app's reload (the
  old version keeps serving); a payload that would touch a file proves nothing ran.
- The rendered Helm chart exposes no Ray dashboard / Jobs API (8265), client (10001) or GCS
  (6379) port beyond ClusterIP Services whose pods a NetworkPolicy closes to everyone but this
  release and the KubeRay operator, and holds no default password: every credential is generated
  per install or comes from an existing Secret.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import require

pytestmark = [pytest.mark.security]

# Public by design: health, the schema and its docs, and the Serve proxy's own health routes.
PUBLIC = {"/healthz", "/readyz", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
SERVE_PROXY_ROUTES = ("/-/routes", "/-/healthz")
# A valid body for each keyed POST route, so a 401 is never an artefact of a bad request.
BODIES: dict[str, dict[str, Any]] = {
    "/v1/completions": {"prompt": "Is shipping free?", "max_tokens": 1},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "Is shipping free?"}], "max_tokens": 1},
    "/v1/feedback": {"event_id": "auth-sweep-0001", "request_id": "cmpl-none", "rating": 1},
}


def _routes() -> set[tuple[str, str]]:
    """(method, path) of every route the ingress's FastAPI app has (HEAD aside)."""
    from serving.routes import build_fastapi

    class _NoIngress:  # routes close over the ingress lazily: building needs none
        pass

    app = build_fastapi(_NoIngress())  # type: ignore[arg-type]
    return {(m, r.path) for r in app.routes for m in (getattr(r, "methods", None) or ()) if m != "HEAD"}


def _call(app, method: str, path: str, authorization: str | None) -> httpx.Response:
    headers = {"Authorization": authorization} if authorization is not None else {}
    body = BODIES.get(path) if method == "POST" else None
    return httpx.request(method, f"{app.url}{path}", json=body, headers=headers, timeout=60)


def _error_code(response: httpx.Response) -> str | None:
    try:
        return response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


def test_every_route_needs_a_key_and_admin_routes_an_admin_key(secure_app, figures) -> None:
    from components.feedback_store import FeedbackStore, hash_key

    served = httpx.get(f"{secure_app.url}/openapi.json", timeout=30).json()["paths"]
    routes = _routes() | {(m.upper(), p) for p, ops in served.items() for m in ops}
    keyed = sorted(r for r in routes if r[1] not in PUBLIC)
    admin_routes = [r for r in keyed if r[1].startswith("/admin/")]
    assert len(keyed) >= 7 and len(admin_routes) == 3, keyed

    user_id, user = secure_app.key_with_id()
    admin = secure_app.key(admin=True)
    revoked_id, revoked = secure_app.key_with_id()
    store = FeedbackStore.from_settings(secure_app.settings)
    try:
        store.revoke_key(revoked_id)
    finally:
        store.close()
    refused = {
        "no key": (None, "missing_api_key"),
        "a wrong key": (f"Bearer fw_{uuid.uuid4().hex}{uuid.uuid4().hex}", "invalid_api_key"),
        "basic auth": ("Basic YWRtaW46YWRtaW4=", "missing_api_key"),
        "a bearer without a key": ("Bearer", "missing_api_key"),
        "the stored hash of a key": (f"Bearer {hash_key(user)}", "invalid_api_key"),
        "a revoked key": (f"Bearer {revoked}", "invalid_api_key"),
    }
    open_routes, open_admin, wrong = [], [], []
    for method, path in keyed:
        for what, (authorization, code) in refused.items():
            response = _call(secure_app, method, path, authorization)
            if response.status_code != 401:
                open_routes.append((method, path, what, response.status_code))
            elif _error_code(response) != code or response.headers.get("www-authenticate") != "Bearer":
                wrong.append((method, path, what, response.text[:120]))
        if path.startswith("/admin/"):
            as_user = _call(secure_app, method, path, f"Bearer {user}")
            if as_user.status_code != 403 or _error_code(as_user) != "admin_required":
                open_admin.append((method, path, as_user.status_code))
            as_admin = _call(secure_app, method, path, f"Bearer {admin}")
            assert as_admin.status_code == 200, (method, path, as_admin.text)  # the sweep hits real routes
        else:
            as_user = _call(secure_app, method, path, f"Bearer {user}")
            assert as_user.status_code not in (401, 403), (method, path, as_user.text)

    # A body over the server's limit is refused before it is read, on every route that takes one.
    oversize = b"{" + b" " * secure_app.settings.max_body_bytes + b"}"
    too_large = []
    for path in (p for m, p in keyed if m == "POST"):
        response = httpx.post(
            f"{secure_app.url}{path}",
            content=oversize,
            headers={"Authorization": f"Bearer {admin}", "Content-Type": "application/json"},
            timeout=60,
        )
        if (response.status_code, _error_code(response)) != (413, "request_too_large"):
            too_large.append((path, response.status_code))

    for path in sorted(PUBLIC) + list(SERVE_PROXY_ROUTES):
        assert httpx.get(f"{secure_app.url}{path}", timeout=30).status_code == 200, path
    # Serve's route listing names route prefixes and applications, nothing else.
    assert httpx.get(f"{secure_app.url}/-/routes", timeout=30).json() == {"/": "flywheel"}

    figures.record("keyed routes swept", len(keyed), goal="every non-public route", ok=True)
    figures.record("requests answered without a valid key", len(open_routes), goal="0", ok=not open_routes)
    figures.record("admin routes answering a non-admin key", len(open_admin), goal="0", ok=not open_admin)
    figures.record("POST routes reading an over-size body", len(too_large), goal="0", ok=not too_large)
    assert not open_routes, open_routes
    assert not open_admin, open_admin
    assert not too_large, too_large
    assert not wrong, wrong
    assert user_id != revoked_id


def test_a_revoked_key_is_refused_within_the_key_cache_time(secure_app, figures) -> None:
    from components.feedback_store import FeedbackStore
    from tests.security.conftest import KEY_CACHE_S

    key_id, key = secure_app.key_with_id()
    with secure_app.client(key) as http:
        assert http.get("/v1/models").status_code == 200  # verified once: the replica now trusts it
        store = FeedbackStore.from_settings(secure_app.settings)
        try:
            store.revoke_key(key_id)
        finally:
            store.close()
        revoked_at = time.monotonic()
        deadline = revoked_at + KEY_CACHE_S + 10
        while http.get("/v1/models").status_code != 401 and time.monotonic() < deadline:
            time.sleep(0.2)
        took = time.monotonic() - revoked_at
    limit = KEY_CACHE_S + 2.0  # the replica's trust in a verified key, plus a request on a busy machine
    figures.record("revoked key refused after", took, unit="s", goal=f"<= {limit:g}", ok=took <= limit)
    assert took <= limit


# PII -------------------------------------------------------------------------------------------

# Raw forms as a user types them, and the compact forms a leak could take.
PII = {
    "email": ("jane.doe@example.com",),
    "phone": ("+1 415 555 0100", "4155550100"),
    "card": ("4111 1111 1111 1111", "4111111111111111"),
    "iban": ("DE89 3704 0044 0532 0130 00", "DE89370400440532013000"),
}
RETURN_ANSWER = "You can return the jacket within 30 days of delivery for a full refund."


def _files_with(roots: list[Path], needles: list[str]) -> dict[str, list[str]]:
    """File → the needles found in it, over every file under ``roots``."""
    found: dict[str, list[str]] = {}
    for root in roots:
        for file in [root] if root.is_file() else root.rglob("*"):
            if not file.is_file():
                continue
            text = file.read_bytes().decode("utf-8", "replace")
            if hits := [n for n in needles if n in text]:
                found[str(file)] = hits
    return found


def test_pii_in_prompts_and_feedback_never_reaches_logs_or_datasets(
    secure_app, seed_ref, figures, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from components.feedback import RetrainPolicy, build
    from components.feedback_store import FeedbackStore

    email, phone, card, iban = (PII[k][0] for k in ("email", "phone", "card", "iban"))
    key_id, key = secure_app.key_with_id()
    with secure_app.client(key) as http:
        asked = [
            http.post(
                "/v1/completions",
                json={
                    "prompt": f"I'm {email}, card {card}. How long do I have to return the jacket?",
                    "max_tokens": 8,
                },
            ),
            http.post(
                "/v1/chat/completions",
                json={
                    "messages": [
                        {"role": "system", "content": f"Customer IBAN {iban}."},
                        {"role": "user", "content": f"Call me on {phone}: can I return the jacket?"},
                    ],
                    "max_tokens": 8,
                },
            ),
            # Rejected requests carry PII too: their errors must not log it either.
            http.post("/v1/completions", json={"prompt": f"{email} " + "refund " * 200, "max_tokens": 8}),
            http.post("/v1/completions", json={"prompt": f"{card} return?", "max_tokens": 10_000}),
        ]
        assert [r.status_code for r in asked] == [200, 200, 413, 422], [r.text for r in asked]
        first, second = (r.json()["id"] for r in asked[:2])
        events = [
            {"request_id": first, "rating": -1, "correction": f"{RETURN_ANSWER} Questions: {phone}.",
             "comment": f"write to {email}"},
            {"request_id": second, "rating": -1, "correction": f"{RETURN_ANSWER} Refund to {iban}.",
             "comment": f"my card is {card}"},
        ]  # fmt: skip
        for n, event in enumerate(events):
            response = http.post("/v1/feedback", json={"event_id": f"pii-{uuid.uuid4().hex}-{n}", **event})
            assert response.status_code == 200, response.text
    with secure_app.client(secure_app.key(admin=True)) as admin:
        assert admin.post("/admin/flush").status_code == 200  # the prediction log is written now

    store = FeedbackStore.from_settings(secure_app.settings)
    try:
        rows = [r for r in store.feedback_since(0, limit=100_000) if r.user_id == key_id]
    finally:
        store.close()
    assert len(rows) == 2 and all(r.prompt for r in rows), rows
    out = tmp_path / "build"
    with caplog.at_level("DEBUG"):
        result = build(
            rows,
            seed_ref,
            RetrainPolicy(),
            datasets_dir=out / "datasets",
            replay_dir=out / "replay",
            review_dir=out / "review",
        )
    # e-mail and card in the first prompt, the phone in the chat's, the phone and IBAN in corrections.
    redacted = result.counts.redacted
    needles = [form for forms in PII.values() for form in forms]
    built = _files_with([out], needles)
    logs = _files_with(secure_app.log_files(), needles)
    # The logs searched are the app's: they hold its access lines for these very requests.
    assert _files_with(secure_app.log_files(), ["/v1/feedback"]), secure_app.log_files()
    driver = [n for n in needles if n in caplog.text]
    figures.record("PII kinds sent", len(PII), goal="", ok=None)
    figures.record("PII matches redacted by the builder", redacted, goal=">= 5", ok=redacted >= 5)
    figures.record("dataset files holding raw PII", len(built), goal="0", ok=not built)
    figures.record(
        "log files holding raw PII", len(logs) + bool(driver), goal="0", ok=not logs and not driver
    )
    assert redacted >= 5, result.counts
    assert not built, built
    assert not logs, logs
    assert not driver, driver
    # The redacted rows did reach the data: redaction, not dropping, kept them out.
    text = "".join(p.read_text() for p in out.rglob("*.jsonl"))
    assert "[PHONE]" in text and "[IBAN]" in text and "[EMAIL]" in text, text[:2000]


def test_keys_are_stored_hashed_and_never_logged(secure_app, figures) -> None:
    keys = [secure_app.key(), secure_app.key(admin=True)]
    for key in keys:
        with secure_app.client(key) as http:
            assert http.get("/v1/models").status_code == 200
    home = Path(secure_app.overrides["home"])
    stores = sorted(home.glob("feedback.db*"))
    assert stores, list(home.iterdir())
    leaked = _files_with([*stores, *secure_app.log_files()], keys)
    figures.record("files holding a plaintext API key", len(leaked), goal="0", ok=not leaked)
    assert not leaked, leaked


# Models from the registry ----------------------------------------------------------------------


class _TouchOnLoad:
    """Unpickling this touches a file: the stand-in for any code an attacker would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def _hostile_models(champion: Path, root: Path, marker: Path) -> dict[str, Path]:
    """MLflow model folders that would run code if loaded carelessly, built from the champion's."""
    payload = pickle.dumps(_TouchOnLoad(marker))
    models: dict[str, Path] = {}

    pickled = models["pickle weights (pytorch_model.bin)"] = root / "pickle-weights"
    shutil.copytree(champion, pickled)
    (pickled / "model" / "model.safetensors").unlink()
    (pickled / "model" / "pytorch_model.bin").write_bytes(payload)

    disguised = models["a pickle named model.safetensors"] = root / "disguised"
    shutil.copytree(champion, disguised)
    (disguised / "model" / "model.safetensors").write_bytes(payload)

    pyfunc = models["a pyfunc model (cloudpickle)"] = root / "pyfunc"
    pyfunc.mkdir()
    (pyfunc / "python_model.pkl").write_bytes(payload)
    (pyfunc / "MLmodel").write_text(
        "flavors:\n  python_function:\n    loader_module: mlflow.pyfunc.model\n"
        "    python_model: python_model.pkl\n"
    )

    remote = models["custom code in auto_map"] = root / "remote-code"
    shutil.copytree(champion, remote)
    code = (
        f"from pathlib import Path\nPath({str(marker)!r}).touch()\n"
        "from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast\n"
        "class HostileConfig(GPT2Config): pass\nclass HostileModel(GPT2LMHeadModel): pass\n"
        "class HostileTokenizer(PreTrainedTokenizerFast): pass\n"
    )
    for folder, config, auto_map in (
        (remote / "model", "config.json", {"AutoConfig": "hostile.HostileConfig", "AutoModelForCausalLM": "hostile.HostileModel"}),
        (remote / "components" / "tokenizer", "tokenizer_config.json", {"AutoTokenizer": ["hostile.HostileTokenizer", "hostile.HostileTokenizer"]}),
    ):  # fmt: skip
        (folder / "hostile.py").write_text(code)
        data = json.loads((folder / config).read_text())
        data.pop("tokenizer_class", None)
        (folder / config).write_text(json.dumps(data | {"auto_map": auto_map}))
    return models


def test_the_registry_never_runs_a_models_code(secure_app, figures, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from components.predict import load
    from components.registry import artifact_location, resolve
    from components.uris import to_path
    from tests.security.conftest import MODEL_NAME

    settings = secure_app.settings
    marker = tmp_path / "code-ran"
    # The payload is live: unpickling it outside flywheel does run it.
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_TouchOnLoad(control)))
    assert control.exists()

    champion = to_path(artifact_location(resolve("champion", settings).model_uri, settings))
    models = _hostile_models(champion, tmp_path / "hostile", marker)
    client = MlflowClient(settings.tracking_uri, registry_uri=settings.tracking_uri)
    run = client.create_run(client.get_experiment_by_name(settings.experiment_name).experiment_id)
    versions: dict[str, str] = {}
    for what, folder in models.items():
        client.log_artifacts(run.info.run_id, str(folder), artifact_path=folder.name)
        source = f"{run.info.artifact_uri}/{folder.name}"
        versions[what] = str(client.create_model_version(MODEL_NAME, source, run_id=run.info.run_id).version)
    # A source outside the artifact store (MLflow's client accepts any path).
    outside = f"{run.info.artifact_uri}/../../../../../../../etc"
    versions["a source outside the artifact store"] = str(
        client.create_model_version(MODEL_NAME, outside, run_id=run.info.run_id).version
    )
    client.set_terminated(run.info.run_id)

    loaded = []
    for what, version in versions.items():
        try:
            load(version, settings)
        except Exception:  # refused: InvalidInput, NotFound, or the weights' parser (SafetensorError)
            pass
        else:
            loaded.append(what)
    assert not marker.exists(), "a model's code ran in this process"

    # The served app: the alias moves to each hostile version; the reload fails, the champion stays.
    served_after, admin = [], secure_app.key(admin=True)
    try:
        with secure_app.client(admin) as http:
            for what, version in versions.items():
                secure_app.set_champion(version)
                reload = http.post("/admin/reload")
                if reload.status_code == 200:
                    served_after.append(what)
                else:
                    assert (reload.status_code, _error_code(reload)) == (502, "reload_failed"), reload.text
                answer = http.post("/v1/completions", json={"prompt": "Is shipping free?", "max_tokens": 2})
                assert answer.headers["x-flywheel-model-version"] == secure_app.version, answer.text
    finally:
        secure_app.set_champion(secure_app.version)
        with secure_app.client(admin) as http:
            assert http.post("/admin/reload").status_code == 200
    code_ran = marker.exists()
    refused = len(versions) - len(loaded)
    figures.record(
        "hostile model versions refused by load", f"{refused}/{len(versions)}", goal="all", ok=not loaded
    )
    figures.record("hostile versions the app swapped in", len(served_after), goal="0", ok=not served_after)
    figures.record("model code executed", int(code_ran), goal="0", ok=not code_ran)
    assert not loaded, loaded
    assert not served_after, served_after
    assert not code_ran, "a model's code ran in the serving replica"


# The Helm chart ----------------------------------------------------------------------------------

RAY_CONTROL_PORTS = {8265: "dashboard / Jobs API", 10001: "Ray client", 6379: "GCS"}
_DEFAULT_PASSWORDS = {
    "admin",
    "password",
    "changeme",
    "secret",
    "postgres",
    "mlflow",
    "airflow",
    "redis",
    "ray",
}
_CREDENTIAL_KEY = re.compile(r"(password|passwd|token|secret|apikey|api_key|fernet)", re.IGNORECASE)


def _render(*args: str) -> list[dict[str, Any]]:
    import subprocess

    import yaml

    from tests.helm.conftest import CHART, NAMESPACE, RELEASE, find_helm

    helm = find_helm()
    require(helm is not None and helm.exists(), "helm (run infra/ci/install_helm.sh)")
    proc = subprocess.run(
        [str(helm), "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def _variants() -> list[str]:
    from tests.helm.conftest import CHART

    return ["default", *sorted(p.name for p in (CHART / "ci").glob("*.yaml"))]


def _ray_heads(docs: list[dict]) -> list[tuple[str, dict]]:
    heads = []
    for doc in docs:
        if doc["kind"] in ("RayCluster", "RayService"):
            spec = doc["spec"]["rayClusterConfig"] if doc["kind"] == "RayService" else doc["spec"]
            heads.append((f"{doc['kind']}/{doc['metadata']['name']}", spec))
    return heads


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_the_chart_exposes_no_ray_control_port(figures) -> None:
    from tests.helm.conftest import CHART

    exposed: list[str] = []
    renders = 0
    for variant in _variants():
        docs = _render() if variant == "default" else _render("-f", str(CHART / "ci" / variant))
        renders += 1
        release = {"app.kubernetes.io/name": "flywheel", "app.kubernetes.io/instance": "fw"}
        for doc in docs:
            if doc["kind"] == "Service":
                spec = doc["spec"]
                ports = {p["port"] for p in spec["ports"]} | {p.get("targetPort") for p in spec["ports"]}
                control = ports & set(RAY_CONTROL_PORTS)
                if control and (spec.get("type", "ClusterIP") != "ClusterIP" or spec.get("externalIPs")):
                    exposed.append(f"{variant}: Service {doc['metadata']['name']} {sorted(control)}")
            if doc["kind"] in ("Ingress", "HTTPRoute", "Route", "Gateway"):
                text = json.dumps(doc)
                if any(re.search(rf'"(?:number|port|targetPort)":\s*{p}\b', text) for p in RAY_CONTROL_PORTS):
                    exposed.append(f"{variant}: {doc['kind']} {doc['metadata']['name']} routes a Ray port")
        policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
        for where, spec in _ray_heads(docs):
            head = spec["headGroupSpec"]
            if head.get("serviceType", "ClusterIP") != "ClusterIP" or head.get("enableIngress"):
                exposed.append(f"{variant}: {where} head Service is {head.get('serviceType')}")
            if spec.get("authOptions", {}).get("mode") != "token":
                exposed.append(f"{variant}: {where} runs without Ray token auth")
            labels = head["template"]["metadata"]["labels"]
            guarding = [
                p for p in policies if _selects(p["spec"]["podSelector"].get("matchLabels", {}), labels)
            ]
            if not guarding:
                exposed.append(f"{variant}: no NetworkPolicy guards {where}")
            for policy in guarding:
                for rule in policy["spec"].get("ingress", []):
                    ports = {p["port"] for p in rule.get("ports", [])} or set(RAY_CONTROL_PORTS)
                    peers = rule.get("from") or [{}]
                    for peer in peers:
                        selector = peer.get("podSelector", {}).get("matchLabels")
                        release_only = selector == release and "namespaceSelector" not in peer
                        operator = selector == {"app.kubernetes.io/name": "kuberay-operator"}
                        if (
                            ports & set(RAY_CONTROL_PORTS)
                            and not release_only
                            and not (operator and ports <= {8265, 52365, 8000})
                        ):
                            exposed.append(
                                f"{variant}: {policy['metadata']['name']} opens {sorted(ports)} to {peer}"
                            )
    # With the NetworkPolicies turned off (a cluster whose CNI ignores them), token auth still guards Ray.
    for where, spec in _ray_heads(_render("--set", "networkPolicy.enabled=false")):
        if spec.get("authOptions", {}).get("mode") != "token":
            exposed.append(f"networkPolicy.enabled=false: {where} runs without Ray token auth")
    figures.record("chart variants rendered", renders, goal="", ok=None)
    figures.record(
        "Ray control ports reachable from outside the release", len(exposed), goal="0", ok=not exposed
    )
    assert not exposed, exposed


def _credentials(raw: bytes) -> list[str]:
    """The secret strings inside a Secret value: itself, a JSON object's values, a URL's password."""
    text = raw.decode("utf-8", "replace")
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        return [str(v) for v in data.values()]
    if match := re.search(r"://[^:/@]*:([^@]+)@", text):
        return [match[1]]
    return [text]


def test_the_chart_holds_no_default_password(figures) -> None:
    import base64

    import yaml

    from tests.helm.conftest import CHART

    # Values: every credential-named value is empty (generated) or a reference to a Secret.
    literal: list[str] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                where = f"{path}.{key}" if path else str(key)
                named = _CREDENTIAL_KEY.search(str(key)) and not re.search(
                    r"(existingSecret|secretName)$", str(key)
                )
                if isinstance(value, str) and value and named:
                    literal.append(f"{where}={value!r}")
                walk(value, where)
        elif isinstance(node, list):
            for i, item in enumerate(node):
                walk(item, f"{path}[{i}]")

    walk(yaml.safe_load((CHART / "values.yaml").read_text()), "")
    for variant in _variants()[1:]:
        walk(yaml.safe_load((CHART / "ci" / variant).read_text()), variant)

    # Rendered: no Secret value is a well-known default, none repeats across two installs.
    first, second = _render("--set", "fullnameOverride=a"), _render("--set", "fullnameOverride=b")
    twins = {d["metadata"]["name"].removeprefix("a"): d for d in second if d["kind"] == "Secret"}
    weak, repeated, secrets = [], [], 0
    for secret in (d for d in first if d["kind"] == "Secret"):
        name = secret["metadata"]["name"]
        twin = twins.get(name.removeprefix("b").removeprefix("a"), {})
        for key, value in secret.get("data", {}).items():
            if not _CREDENTIAL_KEY.search(key) and not key.endswith(("-url", ".json")):
                continue
            secrets += 1
            if any(
                c.lower() in _DEFAULT_PASSWORDS or len(c) < 16 for c in _credentials(base64.b64decode(value))
            ):
                weak.append(f"{name}/{key}")
            if twin.get("data", {}).get(key) == value:
                repeated.append(f"{name}/{key}")
    figures.record("credentials generated per install", secrets, goal="> 0", ok=secrets > 0)
    figures.record("default or repeated credentials", len(literal) + len(weak) + len(repeated), goal="0",
                   ok=not (literal or weak or repeated))  # fmt: skip
    assert secrets > 0
    assert not literal, literal
    assert not weak, weak
    assert not repeated, repeated
