"""A fake OpenAI-compatible server (chat completions, JSON and SSE) over real HTTP on 127.0.0.1.

    with FakeOpenAI() as fake:
        fake.script(rate_limited(retry_after="0.2"), ok("Hello"))
        provider = OpenAICompatProvider(base_url=fake.api_url, api_key="sk-test")

Endpoints: POST /v1/chat/completions (with "stream": true it answers SSE chunks ending
with a usage chunk when stream_options.include_usage is set, then `data: [DONE]`),
GET /v1/models. With nothing scripted it answers in the consensus reply format, or, when
the request carries `response_format` {"type": "json_schema"}, with a JSON object that
fits the schema. `reject_response_format()` makes it refuse such requests with the 400
OpenAI gives a model without Structured Outputs (`param: "response_format"`); `respond(fn)`
lets a test answer from the request body (`fn(body) -> Behaviour | None`).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tests.fakes.http_server import FakeVendor, RecordedRequest, Response, split_text, structured_default

DEFAULT_TEXT = "On balance the answer is clear.\n\nFINAL POSITION: Yes\nCONFIDENCE: 0.75"
DEFAULT_FIELDS: dict[str, Any] = {
    "answer": "On balance the answer is clear.",
    "position": "Yes",
    "confidence": 0.75,
}


@dataclass(frozen=True)
class Behaviour:
    """One scripted answer: text, an error, a content filter; optionally slow."""

    text: str | None = None
    status: int = 200
    error: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    finish_reason: str = "stop"
    prompt_tokens: int = 13
    completion_tokens: int = 9

    def response(self, body: dict[str, Any]) -> Response:
        """The HTTP response this behaviour gives to a chat-completions request body."""
        if self.error is not None:
            return Response(status=self.status, body=self.error, headers=self.headers, delay=self.delay)
        model = str(body.get("model", ""))
        text = self.text
        if text is None:
            response_format = body.get("response_format") or {}
            if response_format.get("type") == "json_schema":
                schema = (response_format.get("json_schema") or {}).get("schema")
                text = structured_default(schema, **DEFAULT_FIELDS)
            else:
                text = DEFAULT_TEXT
        usage = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }
        base = {"id": "chatcmpl-fake", "created": 1_700_000_000, "model": model}
        if not body.get("stream"):
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": self.finish_reason,
            }
            completion = {**base, "object": "chat.completion", "choices": [choice], "usage": usage}
            return Response(body=completion, delay=self.delay)
        chunk = {**base, "object": "chat.completion.chunk"}
        events: list[Any] = [
            {**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
        ]
        for piece in split_text(text, 3):
            events.append(
                {**chunk, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
            )
        events.append({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": self.finish_reason}]})
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append({**chunk, "choices": [], "usage": usage})
        events.append("[DONE]")
        return Response(events=events, delay=self.delay, event_delay=0.01)


def error_body(
    message: str, error_type: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """OpenAI's JSON error envelope."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


RESPONSE_FORMAT_UNSUPPORTED = (
    "Invalid parameter: 'response_format' of type 'json_schema' is not supported with this model. "
    "Learn more about supported models at the Structured Outputs guide: "
    "https://platform.openai.com/docs/guides/structured-outputs"
)


def response_format_unsupported(status: int = 400) -> Behaviour:
    """OpenAI's refusal of `response_format` json_schema for a model without Structured Outputs."""
    body = error_body(RESPONSE_FORMAT_UNSUPPORTED, "invalid_request_error", param="response_format")
    return Behaviour(status=status, error=body)


def ok(text: str | None = None, **fields: Any) -> Behaviour:
    """A normal answer (the consensus default text when None)."""
    return Behaviour(text=text, **fields)


def slow(delay: float, text: str | None = None) -> Behaviour:
    """An answer that starts only after `delay` seconds."""
    return Behaviour(text=text, delay=delay)


def rate_limited(retry_after: str | None = "1", *, insufficient_quota: bool = False) -> Behaviour:
    """A 429 with a Retry-After header (or OpenAI's insufficient_quota)."""
    headers = {"retry-after": retry_after} if retry_after is not None else {}
    code = "insufficient_quota" if insufficient_quota else "rate_limit_exceeded"
    return Behaviour(status=429, error=error_body("Rate limit reached", "requests", code), headers=headers)


def http_error(code: int, message: str = "") -> Behaviour:
    """An error answer with OpenAI's envelope (400, 401, 403, 404, 500, 503...)."""
    kinds = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error"}
    return Behaviour(
        status=code, error=error_body(message or f"fake {code}", kinds.get(code, "server_error"))
    )


def content_filter() -> Behaviour:
    """An empty answer stopped by the content filter."""
    return Behaviour(text="", finish_reason="content_filter")


class FakeOpenAI(FakeVendor):
    """The fake OpenAI-compatible server; see the module docstring."""

    def __init__(self) -> None:
        super().__init__()
        self._queue: deque[Behaviour] = deque()
        self._always: Behaviour | None = None
        self._script_lock = threading.Lock()
        self.models = ["llama3.2", "qwen2.5"]
        self._rejects_response_format: int | None = None
        self._responder: Callable[[dict[str, Any]], Behaviour | None] | None = None

    def reject_response_format(self, status: int = 400) -> None:
        """Refuse every request carrying `response_format` json_schema (400, or 422 as some servers do)."""
        with self._script_lock:
            self._rejects_response_format = status

    def respond(self, responder: Callable[[dict[str, Any]], Behaviour | None]) -> None:
        """Answer calls not otherwise scripted with responder(request body) (None: the default)."""
        with self._script_lock:
            self._responder = responder

    def __enter__(self) -> FakeOpenAI:
        self.start()
        return self

    @property
    def api_url(self) -> str:
        """The base URL an OpenAI client uses (ends with /v1)."""
        return f"{self.base_url}/v1"

    def script(self, *behaviours: Behaviour) -> None:
        """Answer the next calls with these behaviours, in order."""
        with self._script_lock:
            self._queue.extend(behaviours)

    def always(self, behaviour: Behaviour | None) -> None:
        """Answer every call not otherwise scripted with this (None: the default answer)."""
        with self._script_lock:
            self._always = behaviour

    def _next(self, body: dict[str, Any]) -> Behaviour:
        with self._script_lock:
            structured = (body.get("response_format") or {}).get("type") == "json_schema"
            if self._rejects_response_format and structured:
                return response_format_unsupported(self._rejects_response_format)
            if self._queue:
                return self._queue.popleft()
            responder, always = self._responder, self._always
        if always is not None:
            return always
        return (responder(body) if responder else None) or Behaviour()

    def handle(self, request: RecordedRequest) -> Response:
        """Route one request."""
        if request.method == "GET" and request.path == "/v1/models":
            data = [{"id": name, "object": "model", "created": 0, "owned_by": "fake"} for name in self.models]
            return Response(body={"object": "list", "data": data})
        if (
            request.method == "POST"
            and request.path == "/v1/chat/completions"
            and isinstance(request.body, dict)
        ):
            return self._next(request.body).response(request.body)
        return Response(status=404, body=error_body(f"no route {request.path}", "invalid_request_error"))
