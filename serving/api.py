"""The HTTP API's request and response bodies (OpenAI-compatible) and its JSON errors."""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator

from components.schemas import Completion, GenerationParams

FEEDBACK_TEXT_MAX = 4000


class ApiError(Exception):
    """An HTTP error with an OpenAI-style JSON body: ``{"error": {"message", "type", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str,
        type_: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        """Describe the error.

        Args:
            status: HTTP status.
            message: what went wrong and what to do, for a person.
            code: stable machine-readable code.
            type_: OpenAI error type.
            headers: extra response headers (``Retry-After``…).
        """
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.type = type_
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON body."""
        return error_body(self.message, self.type, self.code)


def error_body(message: str, type_: str, code: str) -> dict[str, Any]:
    """An OpenAI-style error body."""
    return {"error": {"message": message, "type": type_, "code": code, "param": None}}


class ErrorInfo(BaseModel):
    """What went wrong: the fields of an OpenAI error."""

    message: str = Field(description="What went wrong and what to do, for a person.")
    type: str = Field(description="OpenAI error type (invalid_request_error, authentication_error, …).")
    code: str = Field(description="Stable machine-readable code (missing_api_key, max_tokens_too_large, …).")
    param: str | None = None


class ErrorResponse(BaseModel):
    """The body of every error response (4xx and 5xx)."""

    error: ErrorInfo


class _Request(BaseModel):
    # Unknown OpenAI fields (logprobs, user, …) are accepted and ignored, as OpenAI-compatible servers do;
    # known ones must have their schema's type ("stream": 0 or "max_tokens": "5" is a 422, not a guess).
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str = Field("", max_length=256, description="Served model name, optionally with ':VERSION'.")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate (server cap applies).")
    max_completion_tokens: int | None = Field(None, ge=1, description="Alias of max_tokens (chat).")
    temperature: float | None = Field(None, ge=0, le=5, description="0 or unset: greedy decoding.")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=10_000, description="Extension: top-k filtering (0: off).")
    seed: int | None = Field(None, ge=0, description="Fixed seed: sampled answers become repeatable.")
    stop: str | list[str] | None = Field(None, description="Up to 4 strings that end the answer.")
    n: int = Field(1, ge=1, le=1, description="Only one choice per request is supported.")
    stream: bool = False
    stream_options: dict[str, Any] | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if len(stops) > 4 or any(len(s) > 64 for s in stops):
            raise ValueError("stop takes at most 4 strings of at most 64 characters")
        return [s for s in stops if s]

    def generation(self, default_max_tokens: int) -> GenerationParams:
        """The generation parameters this request asks for (greedy unless temperature > 0).

        Args:
            default_max_tokens: max_new_tokens when the request sets none.

        Returns:
            Uncapped parameters; the server checks them against its caps.
        """
        temperature = self.temperature or 0.0
        return GenerationParams(
            max_new_tokens=self.max_tokens or self.max_completion_tokens or default_max_tokens,
            temperature=temperature if temperature > 0 else 1.0,
            top_k=self.top_k or 0,
            top_p=self.top_p or 1.0,
            do_sample=temperature > 0,
            seed=self.seed,
        )

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


_NOT_BLANK = {"type": "string", "pattern": r"\S"}
_ONE_PROMPT = {"anyOf": [_NOT_BLANK, {"type": "array", "items": _NOT_BLANK, "minItems": 1, "maxItems": 1}]}


class CompletionRequest(_Request):
    """``POST /v1/completions``."""

    # The schema states what the validator below accepts: one non-blank prompt, alone or in a list.
    prompt: Annotated[str | list[str], WithJsonSchema(_ONE_PROMPT)] = Field(
        description="The question (one prompt per request)."
    )

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str:
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError("exactly one prompt per request is supported")
            value = value[0]
        if not value.strip():
            raise ValueError("prompt must not be blank")
        return value


class ChatMessage(BaseModel):
    """One message of a conversation."""

    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message's text (text parts of a multi-part content joined)."""
        if isinstance(self.content, list):
            return " ".join(
                p["text"] for p in self.content if p.get("type") == "text" and isinstance(p.get("text"), str)
            )
        return self.content or ""


# What prompt() needs, as a schema: some user message with text (a string, or a text part).
_USER_MESSAGE_WITH_TEXT = {
    "type": "object",
    "required": ["role", "content"],
    "properties": {
        "role": {"const": "user"},
        "content": {
            "anyOf": [
                _NOT_BLANK,
                {
                    "type": "array",
                    "contains": {
                        "type": "object",
                        "required": ["type", "text"],
                        "properties": {"type": {"const": "text"}, "text": _NOT_BLANK},
                    },
                },
            ]
        },
    },
}


class ChatCompletionRequest(_Request):
    """``POST /v1/chat/completions``: the last user message is the prompt (the model is single-turn)."""

    messages: list[ChatMessage] = Field(
        min_length=1, max_length=256, json_schema_extra={"contains": _USER_MESSAGE_WITH_TEXT}
    )

    def prompt(self) -> str:
        """The last user message."""
        for message in reversed(self.messages):
            if message.role == "user" and message.text().strip():
                return message.text()
        raise ValueError("messages hold no user message with text")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, completion: Completion) -> Usage:
        return cls(
            prompt_tokens=completion.prompt_tokens,
            completion_tokens=completion.completion_tokens,
            total_tokens=completion.prompt_tokens + completion.completion_tokens,
        )


class ServedInfo(BaseModel):
    """flywheel's extension of a response: how it was served."""

    request_id: str
    model_version: str
    cache: Literal["hit", "miss", "coalesced", "bypass"]
    cached: bool
    latency_ms: float


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    flywheel: ServedInfo | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    flywheel: ServedInfo | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "flywheel"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class FeedbackRequest(BaseModel):
    """``POST /v1/feedback``: what a user says about one answer (the user is the API key)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    event_id: str = Field(min_length=8, max_length=128, description="Client idempotency key (e.g. a UUID).")
    request_id: str = Field(min_length=1, max_length=128, description="The id of the answer's response.")
    rating: Literal[-1, 1]
    correction: str | None = Field(
        None, max_length=FEEDBACK_TEXT_MAX, description="The answer it should have been."
    )
    comment: str | None = Field(None, max_length=FEEDBACK_TEXT_MAX)


class Health(BaseModel):
    status: Literal["ok", "ready", "not_ready"]
    model: str | None = None
    version: str | None = None
    detail: str | None = None
