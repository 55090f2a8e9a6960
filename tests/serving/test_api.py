"""The serving API over real HTTP: OpenAI client, cache, auth and limits, feedback, prediction log."""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx
import pytest

pytestmark = pytest.mark.serving

PROMPT = "How long do I have to return an item?"


def _completion(client: httpx.Client, prompt: str = PROMPT, **body) -> httpx.Response:
    return client.post(
        "/v1/completions", json={"model": "serve-test", "prompt": prompt, "max_tokens": 16, **body}
    )


def _stats(admin: httpx.Client) -> dict:
    response = admin.get("/admin/stats")
    assert response.status_code == 200, response.text
    return response.json()


def test_openai_client_completion_chat_and_streaming(served, client):
    import openai

    api = openai.OpenAI(base_url=f"{served.url}/v1", api_key=client.headers["Authorization"].split()[1])
    version = served.versions[0]

    completion = api.completions.create(model="serve-test", prompt=PROMPT, max_tokens=16, temperature=0)
    assert completion.model == f"serve-test:{version}"
    assert completion.id.startswith("cmpl-")
    assert completion.usage.prompt_tokens > 0
    assert (
        completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    )
    assert completion.choices[0].finish_reason in ("stop", "length")

    chat = api.chat.completions.create(
        model="serve-test",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}],
        max_tokens=16,
    )
    assert chat.choices[0].message.role == "assistant"
    # The last user message is the prompt: the chat answer is the completion answer.
    assert chat.choices[0].message.content == completion.choices[0].text

    raw = api.completions.with_raw_response.create(model="serve-test", prompt=PROMPT, max_tokens=16)
    assert raw.headers["x-flywheel-model-version"] == version

    stream = api.chat.completions.create(
        model="serve-test",
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == completion.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert (
        chunks[-1].usage is not None
        and chunks[-1].usage.completion_tokens == completion.usage.completion_tokens
    )

    streamed = api.completions.create(model="serve-test", prompt=PROMPT, max_tokens=16, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == completion.choices[0].text

    models = api.models.list()
    assert {m.id for m in models.data} == {"serve-test", f"serve-test:{version}"}


def test_second_identical_greedy_request_is_cached(client):
    prompt = f"Where is my order {uuid.uuid4().hex[:6]}?"
    first = _completion(client, prompt)
    second = _completion(client, prompt)
    assert first.status_code == second.status_code == 200, first.text
    assert first.headers["x-flywheel-cache"] == "miss"
    assert second.headers["x-flywheel-cache"] == "hit"
    assert second.json()["flywheel"]["cached"] is True
    assert second.json()["choices"] == first.json()["choices"]
    assert second.json()["id"] != first.json()["id"]
    bypass = client.post(
        "/v1/completions",
        json={"model": "serve-test", "prompt": prompt, "max_tokens": 16},
        headers={"Cache-Control": "no-cache"},
    )
    assert bypass.headers["x-flywheel-cache"] == "bypass"
    sampled = _completion(client, prompt, temperature=0.8)
    assert sampled.headers["x-flywheel-cache"] == "bypass"  # not deterministic: never cached
    seeded = [_completion(client, prompt, temperature=0.8, seed=7) for _ in range(2)]
    assert [r.headers["x-flywheel-cache"] for r in seeded] == ["miss", "hit"]


def test_concurrent_identical_misses_generate_once(served, admin):
    key = served.key()
    prompt = f"Can I cancel order {uuid.uuid4().hex[:6]}?"
    before = _stats(admin)["model"]["generated"]

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(
            base_url=served.url, headers={"Authorization": f"Bearer {key}"}, timeout=60
        ) as c:
            body = {"model": "serve-test", "prompt": prompt, "max_tokens": 32}
            return await asyncio.gather(*(c.post("/v1/completions", json=body) for _ in range(20)))

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 20
    assert len({r.json()["choices"][0]["text"] for r in responses}) == 1
    outcomes = [r.headers["x-flywheel-cache"] for r in responses]
    assert outcomes.count("miss") == 1, outcomes
    assert _stats(admin)["model"]["generated"] - before == 1


def test_auth_and_errors_are_json(served, client):
    anonymous = httpx.post(f"{served.url}/v1/completions", json={"prompt": PROMPT})
    assert anonymous.status_code == 401
    assert anonymous.json()["error"]["code"] == "missing_api_key"
    bad = httpx.get(f"{served.url}/v1/models", headers={"Authorization": "Bearer fw-nope"})
    assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{served.url}/healthz").status_code == 200
    ready = httpx.get(f"{served.url}/readyz").json()
    assert ready["status"] == "ready"
    assert httpx.get(f"{served.url}/openapi.json").json()["paths"]["/v1/completions"]

    assert client.post("/admin/reload").status_code == 403
    assert client.get("/nowhere").json()["error"]["code"] == "not_found"

    cases = {
        "max_tokens over the cap": (_completion(client, max_tokens=10_000), 422, "max_tokens_too_large"),
        "not JSON": (
            client.post("/v1/completions", content=b"{", headers={"Content-Type": "application/json"}),
            422,
            "invalid_request",
        ),
        "no prompt": (client.post("/v1/completions", json={"model": "serve-test"}), 422, "invalid_request"),
        "temperature out of range": (_completion(client, temperature=-1), 422, "invalid_request"),
        "n > 1": (_completion(client, n=2), 422, "invalid_request"),
        "another model": (_completion(client, model="gpt-4"), 404, "model_not_found"),
        "prompt over the token limit": (_completion(client, "refund " * 200), 413, "prompt_too_long"),
        "body over the size limit": (_completion(client, "x" * 70_000), 413, "request_too_large"),
        "chat without a user message": (
            client.post("/v1/chat/completions", json={"messages": [{"role": "system", "content": "hi"}]}),
            422,
            "invalid_request",
        ),
    }
    for name, (response, status, code) in cases.items():
        assert response.status_code == status, (name, response.text)
        assert response.json()["error"]["code"] == code, (name, response.text)


def test_rate_limit_answers_429_with_retry_after(served):
    from tests.serving.conftest import RATE_LIMIT

    key = served.key()

    async def flood() -> list[httpx.Response]:
        async with httpx.AsyncClient(
            base_url=served.url, headers={"Authorization": f"Bearer {key}"}, timeout=60
        ) as c:
            sem = asyncio.Semaphore(8)

            async def one() -> httpx.Response:
                async with sem:
                    return await c.get("/v1/models")

            return await asyncio.gather(*(one() for _ in range(RATE_LIMIT + 5)))

    statuses = [r.status_code for r in asyncio.run(flood())]
    assert statuses.count(200) == RATE_LIMIT, statuses
    limited = [r for r in asyncio.run(flood()) if r.status_code == 429]
    assert limited and int(limited[0].headers["Retry-After"]) >= 1
    assert limited[0].json()["error"]["code"] == "rate_limit_exceeded"


def test_full_queue_answers_503(served):
    key = served.key()

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(
            base_url=served.url, headers={"Authorization": f"Bearer {key}"}, timeout=60
        ) as c:
            return await asyncio.gather(
                *(
                    c.post(
                        "/v1/completions",
                        json={"prompt": f"{PROMPT} {i}", "max_tokens": 64},
                        headers={"Cache-Control": "no-cache"},
                    )
                    for i in range(40)
                )
            )

    responses = asyncio.run(burst())
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(503) > 0 and statuses.count(200) >= 4, statuses
    overloaded = next(r for r in responses if r.status_code == 503)
    assert overloaded.json()["error"]["code"] == "server_overloaded"


def test_feedback_is_idempotent_and_needs_an_issued_request(served, client, admin):
    from components.feedback_store import FeedbackStore

    request_id = _completion(client, f"Is shipping free {uuid.uuid4().hex[:6]}?").json()["id"]
    event = {
        "event_id": uuid.uuid4().hex,
        "request_id": request_id,
        "rating": -1,
        "correction": "Yes, over $50.",
    }
    first = client.post("/v1/feedback", json=event)  # before the prediction log is flushed
    assert first.status_code == 200, first.text
    again = client.post("/v1/feedback", json=event)
    assert again.status_code == 200 and again.json() == first.json()
    assert (first.headers["x-flywheel-duplicate"], again.headers["x-flywheel-duplicate"]) == ("false", "true")
    changed = client.post("/v1/feedback", json=event | {"rating": 1})
    assert changed.status_code == 409

    unknown = client.post(
        "/v1/feedback", json=event | {"event_id": uuid.uuid4().hex, "request_id": "cmpl-never"}
    )
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_request"
    too_long = client.post("/v1/feedback", json=event | {"event_id": uuid.uuid4().hex, "comment": "x" * 5000})
    assert too_long.status_code == 422
    bad_rating = client.post("/v1/feedback", json=event | {"event_id": uuid.uuid4().hex, "rating": 0})
    assert bad_rating.status_code == 422

    store = FeedbackStore.from_settings(served.settings)
    try:
        rows = [r for r in store.feedback_since(0, limit=10_000) if r.event_id == event["event_id"]]
        assert len(rows) == 1 and rows[0].rating == -1
    finally:
        store.close()


def test_every_response_gets_a_prediction_row(served, client):
    from components.feedback_store import FeedbackStore

    ids = []
    for i in range(3):
        response = _completion(client, f"Do you ship abroad {i}?")
        ids.append(response.json()["id"])
        ids.append(_completion(client, f"Do you ship abroad {i}?").json()["id"])  # a cache hit is logged too
    store = FeedbackStore.from_settings(served.settings)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not all(store.has_prediction(i) for i in ids):
            time.sleep(0.2)
        rows = [store.get_prediction(i) for i in ids]
    finally:
        store.close()
    assert [r.cached for r in rows] == [False, True] * 3
    assert all(
        r.model_name == "serve-test" and r.response and r.prompt.startswith("Do you ship") for r in rows
    )
