"""The FastAPI app of the ingress: routes, auth dependencies, JSON errors, metrics middleware.

Built inside each ingress replica (``Ingress.__serve_build_asgi_app__``), so nothing is created
at import time and the routes close over the replica's state.
"""

import json
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from components.feedback_store import ApiKeyInfo
from serving.api import (
    ApiError,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    Delta,
    ErrorResponse,
    FeedbackRequest,
    Health,
    ModelCard,
    ModelList,
    ServedInfo,
    Usage,
    error_body,
)

if TYPE_CHECKING:
    from serving.app import Ingress, _Served

log = logging.getLogger(__name__)

_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
}

# What each error status means, for the schema: every error has the same JSON body.
_ERROR_MEANINGS = {
    400: "The body could not be read (not UTF-8 text).",
    401: "No API key, or an unknown or revoked one.",
    403: "The endpoint needs an admin API key.",
    404: "The model named is not served here, or the request id was never issued.",
    409: "The event id was already used for different feedback.",
    413: "The request body or the prompt is too large.",
    422: "The request is malformed or asks beyond the server's caps.",
    429: "The API key is over its rate limit (see Retry-After).",
    502: "The model version the alias names could not be loaded; the old one keeps serving.",
    503: "The server is at capacity or has no model loaded yet (see Retry-After).",
}
_KEYED = (401, 413, 429)  # any route behind an API key: no key, body over the limit, over the rate


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for these error statuses (all with :class:`ErrorResponse`)."""
    return {
        s: {"model": ErrorResponse, "description": _ERROR_MEANINGS[s]} for s in sorted({*_KEYED, *statuses})
    }


# Completions answer JSON, or server-sent events with ``stream: true``.
_STREAMED: dict[int | str, dict[str, Any]] = {200: {"content": {"text/event-stream": {}}}}


def build_fastapi(ingress: "Ingress") -> FastAPI:
    """The HTTP API over one ingress replica.

    Args:
        ingress: the replica (its cache, store, limiter, model handle).

    Returns:
        The FastAPI app (OpenAPI schema at ``/openapi.json``).
    """
    app = FastAPI(
        title="flywheel",
        version="1",
        description="OpenAI-compatible completions of the served flywheel model, and feedback on its answers.",
    )
    _install_errors(app)
    _install_middleware(app, ingress)
    # Declares the bearer scheme in the schema; the key itself is checked by ingress.keys.
    bearer = HTTPBearer(auto_error=False, description="An API key: `flywheel keys create`.")

    async def api_key(
        request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]
    ) -> ApiKeyInfo:
        key = await ingress.keys.verify(request.headers.get("authorization"))
        await ingress.limiter.check(key.id)
        request.state.key = key
        return key

    Key = Annotated[ApiKeyInfo, Depends(api_key)]

    async def admin_key(key: Key) -> ApiKeyInfo:
        if not key.admin:
            raise ApiError(403, "this endpoint needs an admin API key", "admin_required", "permission_error")
        return key

    Admin = Annotated[ApiKeyInfo, Depends(admin_key)]

    @app.get("/healthz", response_model=Health, tags=["health"])
    async def healthz() -> Health:
        """The process is alive."""
        return Health(status="ok")

    @app.get("/readyz", response_model=Health, tags=["health"], responses={503: {"model": Health}})
    async def readyz() -> Any:
        """A model is loaded and routed to: which one."""
        target = ingress.served
        info = await ingress.model_info()
        if target is None or info is None or not info.get("loaded"):
            detail = (
                "no model version resolved yet" if target is None else "no model replica has a model loaded"
            )
            return JSONResponse(Health(status="not_ready", detail=detail).model_dump(), status_code=503)
        return Health(status="ready", model=f"{target.name}:{target.version}", version=target.version)

    @app.get("/v1/models", response_model=ModelList, tags=["openai"], responses=_errors(503))
    async def models(_: Key) -> ModelList:
        """The served model, by name and by name:version."""
        target = ingress.target("")
        return ModelList(data=[ModelCard(id=target.name), ModelCard(id=f"{target.name}:{target.version}")])

    @app.post(
        "/v1/completions",
        response_model=CompletionResponse,
        tags=["openai"],
        responses={**_STREAMED, **_errors(400, 404, 422, 503)},
    )
    async def completions(body: CompletionRequest, request: Request, key: Key) -> Any:
        """Complete a prompt (OpenAI shape; ``stream: true`` for server-sent events)."""
        served = await ingress.complete(body.prompt, body, key.id, _no_cache(request))
        model = ingress.served_name(served)
        if body.stream:
            return _stream(_completion_events(served, model, body.include_usage), served)
        response = CompletionResponse(
            id=served.request_id,
            model=model,
            choices=[
                CompletionChoice(text=served.completion.text, finish_reason=served.completion.finish_reason)
            ],
            usage=Usage.of(served.completion),
            flywheel=_info(served),
        )
        return _json(response.model_dump(), served)

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletionResponse,
        tags=["openai"],
        responses={**_STREAMED, **_errors(400, 404, 422, 503)},
    )
    async def chat(body: ChatCompletionRequest, request: Request, key: Key) -> Any:
        """Answer the last user message of a conversation (OpenAI shape; ``stream: true`` for SSE)."""
        try:
            prompt = body.prompt()
        except ValueError as exc:
            raise ApiError(422, str(exc), "invalid_request") from exc
        served = await ingress.complete(prompt, body, key.id, _no_cache(request))
        model = ingress.served_name(served)
        if body.stream:
            return _stream(_chat_events(served, model, body.include_usage), served)
        response = ChatCompletionResponse(
            id=served.request_id,
            model=model,
            choices=[
                ChatChoice(
                    message=AssistantMessage(content=served.completion.text),
                    finish_reason=served.completion.finish_reason,
                )
            ],
            usage=Usage.of(served.completion),
            flywheel=_info(served),
        )
        return _json(response.model_dump(), served)

    @app.post("/v1/feedback", tags=["feedback"], responses=_errors(400, 404, 409, 422))
    async def feedback(body: FeedbackRequest, key: Key) -> Any:
        """Rate one answer (+1/-1), optionally with a correction; answered once durably stored.

        The same ``event_id`` again gets the same answer (``X-Flywheel-Duplicate: true``) and
        stores nothing new.
        """
        receipt, duplicate = await ingress.feedback(body, key.id)
        return JSONResponse(receipt, headers={"X-Flywheel-Duplicate": str(duplicate).lower()})

    @app.post("/admin/reload", tags=["admin"], responses=_errors(403, 502))
    async def reload(_: Admin) -> Any:
        """Check the served alias now and swap to the version it names (loaded fully first)."""
        outcome = await ingress.refresh()
        if outcome.get("error"):
            raise ApiError(502, f"reload failed: {outcome['error']}", "reload_failed", "server_error")
        return outcome

    @app.get("/admin/stats", tags=["admin"], responses=_errors(403))
    async def stats(_: Admin) -> Any:
        """Counters of this ingress replica and one model replica."""
        return await ingress.stats()

    @app.post("/admin/flush", tags=["admin"], responses=_errors(403))
    async def flush(_: Admin) -> Any:
        """Write this replica's buffered prediction log now."""
        import asyncio

        return {"written": await asyncio.to_thread(ingress.flush_predictions)}

    return app


def _no_cache(request: Request) -> bool:
    directives = request.headers.get("cache-control", "").lower()
    return "no-cache" in directives or "no-store" in directives


def _info(served: "_Served") -> ServedInfo:
    return ServedInfo(
        request_id=served.request_id,
        model_version=served.version,
        cache=served.outcome,  # type: ignore[arg-type]
        cached=served.outcome in ("hit", "coalesced"),
        latency_ms=round(served.latency_ms, 3),
    )


def _headers(served: "_Served") -> dict[str, str]:
    from serving.app import CACHE_HEADER, MODEL_HEADER

    return {MODEL_HEADER: served.version, CACHE_HEADER: served.outcome, "X-Request-Id": served.request_id}


def _json(body: dict[str, Any], served: "_Served") -> JSONResponse:
    return JSONResponse(body, headers=_headers(served))


def _stream(events: Iterator[str], served: "_Served") -> StreamingResponse:
    return StreamingResponse(
        events, media_type="text/event-stream", headers={**_headers(served), "Cache-Control": "no-cache"}
    )


def _sse(payload: Any) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _completion_events(served: "_Served", model: str, include_usage: bool) -> Iterator[str]:
    from serving.app import pieces

    def chunk(text: str, finish: str | None) -> dict[str, Any]:
        choice = CompletionChoice(text=text, finish_reason=finish)  # type: ignore[arg-type]
        return CompletionResponse(id=served.request_id, model=model, choices=[choice]).model_dump(
            exclude={"usage", "flywheel"}
        )

    for piece in pieces(served.completion.text):
        yield _sse(chunk(piece, None))
    yield _sse(chunk("", served.completion.finish_reason))
    if include_usage:
        usage = CompletionResponse(
            id=served.request_id, model=model, choices=[], usage=Usage.of(served.completion)
        )
        yield _sse(usage.model_dump(exclude={"flywheel"}))
    yield "data: [DONE]\n\n"


def _chat_events(served: "_Served", model: str, include_usage: bool) -> Iterator[str]:
    from serving.app import pieces

    def chunk(delta: Delta, finish: str | None = None) -> dict[str, Any]:
        choice = ChatChunkChoice(delta=delta, finish_reason=finish)  # type: ignore[arg-type]
        return ChatCompletionChunk(id=served.request_id, model=model, choices=[choice]).model_dump(
            exclude={"usage"}, exclude_none=False
        )

    yield _sse(chunk(Delta(role="assistant", content="")))
    for piece in pieces(served.completion.text):
        yield _sse(chunk(Delta(content=piece)))
    yield _sse(chunk(Delta(), served.completion.finish_reason))
    if include_usage:
        usage = ChatCompletionChunk(
            id=served.request_id, model=model, choices=[], usage=Usage.of(served.completion)
        )
        yield _sse(usage.model_dump())
    yield "data: [DONE]\n\n"


def _install_errors(app: FastAPI) -> None:
    """Every error is a JSON body; bad input is a 4xx, never a 500."""
    from serving.app import _validation_message

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> Response:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> Response:
        message = _validation_message(exc)  # type: ignore[arg-type]
        return JSONResponse(error_body(message, "invalid_request_error", "invalid_request"), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> Response:
        code = _STATUS_CODES.get(exc.status_code, "http_error")
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(
            error_body(str(exc.detail), kind, code), status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> Response:
        log.error("unhandled error", exc_info=exc)
        return JSONResponse(
            error_body("internal server error", "server_error", "internal_error"), status_code=500
        )


def _install_middleware(app: FastAPI, ingress: "Ingress") -> None:
    """Body-size limit (413) and request metrics by route template and status."""

    @app.middleware("http")
    async def limits_and_metrics(request: Request, call_next: Any) -> Response:
        started = time.perf_counter()
        length = request.headers.get("content-length")
        limit = ingress.settings.max_body_bytes
        if length is not None and length.isdigit() and int(length) > limit:
            response: Response = JSONResponse(
                error_body(f"request body over {limit} bytes", "invalid_request_error", "request_too_large"),
                status_code=413,
            )
        else:
            response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", None) or "unmatched"
        ingress.metrics.request(path, response.status_code, (time.perf_counter() - started) * 1000)
        return response
