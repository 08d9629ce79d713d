"""A fake Gemini API speaking the real REST wire format over real HTTP on 127.0.0.1.

    with FakeGemini() as fake:
        fake.script(rate_limited("0.2s"), ok("Hello"))     # next calls, any model
        fake.script(server_error(503), model="gemini-a")   # next calls of one model
        fake.always(server_error(503), model="gemini-a")   # every call of one model
        provider = GeminiProvider(api_key="k", base_url=fake.base_url)

Endpoints: POST /v1beta/models/{model}:generateContent,
POST /v1beta/models/{model}:streamGenerateContent?alt=sse, GET /v1beta/models.
With nothing scripted it answers in the consensus reply format, or, when the request
asks for JSON (`generationConfig.responseMimeType` with `responseSchema`), with a JSON
object that fits the schema. `reject_schema()` makes it refuse such requests with the
400 INVALID_ARGUMENT Gemini gives a model without JSON mode; `respond(fn)` lets a test
answer from the request body (`fn(model, body) -> Behaviour | None`).
"""

from __future__ import annotations

import re
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tests.fakes.http_server import FakeVendor, RecordedRequest, Response, split_text, structured_default

DEFAULT_TEXT = "The evidence points one way.\n\nFINAL POSITION: Yes\nCONFIDENCE: 0.8"
DEFAULT_FIELDS: dict[str, Any] = {
    "answer": "The evidence points one way.",
    "position": "Yes",
    "confidence": 0.8,
}
MODELS = ("gemini-2.5-flash", "gemini-2.5-pro", "gemini-2.0-flash")
ROUTE = re.compile(r"^/v1beta/models/(?P<model>[^/:]+):(?P<method>generateContent|streamGenerateContent)$")


@dataclass(frozen=True)
class Behaviour:
    """One scripted answer: text, an error body, a safety block; optionally slow."""

    text: str | None = None
    status: int = 200
    error: dict[str, Any] | None = None
    delay: float = 0.0
    finish_reason: str = "STOP"
    block_reason: str | None = None
    prompt_tokens: int = 11
    output_tokens: int = 7
    thought_tokens: int = 0

    def response(self, *, stream: bool, schema: Any = None) -> Response:
        """The HTTP response this behaviour gives (a JSON object fitting `schema` by default)."""
        if self.error is not None:
            return Response(status=self.status, body=self.error, delay=self.delay)
        usage = {
            "promptTokenCount": self.prompt_tokens,
            "candidatesTokenCount": self.output_tokens,
            "totalTokenCount": self.prompt_tokens + self.output_tokens + self.thought_tokens,
        }
        if self.thought_tokens:
            usage["thoughtsTokenCount"] = self.thought_tokens
        if self.block_reason:
            feedback = {"blockReason": self.block_reason}
            body: dict[str, Any] = {"promptFeedback": feedback, "usageMetadata": usage}
            return Response(body=body, events=[body] if stream else None, delay=self.delay)
        text = self.text
        if text is None:
            text = DEFAULT_TEXT if schema is None else structured_default(schema, **DEFAULT_FIELDS)
        if not stream:
            return Response(body=_chunk(text, self.finish_reason, usage), delay=self.delay)
        pieces = list(split_text(text, 3)) or [""]
        events = [_chunk(piece, None, None) for piece in pieces[:-1]]
        events.append(_chunk(pieces[-1], self.finish_reason, usage))
        return Response(events=events, delay=self.delay, event_delay=0.01)


def _chunk(text: str, finish_reason: str | None, usage: dict[str, int] | None) -> dict[str, Any]:
    candidate: dict[str, Any] = {"index": 0}
    if text:
        candidate["content"] = {"role": "model", "parts": [{"text": text}]}
    if finish_reason:
        candidate["finishReason"] = finish_reason
    chunk: dict[str, Any] = {"candidates": [candidate], "modelVersion": "fake"}
    if usage:
        chunk["usageMetadata"] = usage
    return chunk


def error_body(
    code: int, status: str, message: str, details: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Google's JSON error envelope."""
    error: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details is not None:
        error["details"] = details
    return {"error": error}


def ok(text: str | None = None, **fields: Any) -> Behaviour:
    """A normal answer (the consensus default text when None)."""
    return Behaviour(text=text, **fields)


def slow(delay: float, text: str | None = None) -> Behaviour:
    """An answer that starts only after `delay` seconds."""
    return Behaviour(text=text, delay=delay)


PER_MINUTE = "GenerateRequestsPerMinutePerProjectPerModel"


def rate_limited(retry_delay: str | None = "1s", *, quota_id: str = PER_MINUTE) -> Behaviour:
    """A 429 RESOURCE_EXHAUSTED with RetryInfo and QuotaFailure details, as Gemini sends it."""
    details: list[dict[str, Any]] = [
        {
            "@type": "type.googleapis.com/google.rpc.QuotaFailure",
            "violations": [
                {"quotaMetric": "generativelanguage.googleapis.com/generate_requests", "quotaId": quota_id}
            ],
        }
    ]
    if retry_delay is not None:
        details.append({"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": retry_delay})
    message = "You exceeded your current quota, please check your plan and billing details."
    return Behaviour(status=429, error=error_body(429, "RESOURCE_EXHAUSTED", message, details))


def per_day_quota() -> Behaviour:
    """A 429 whose QuotaFailure names a per-day quota (not worth waiting for)."""
    return rate_limited("40s", quota_id="GenerateRequestsPerDayPerProjectPerModel-FreeTier")


STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}


def http_error(code: int, message: str = "") -> Behaviour:
    """An error answer with Google's envelope (500, 503, 400, 401, 403, 404...)."""
    status = STATUS_NAMES.get(code, "UNKNOWN")
    return Behaviour(status=code, error=error_body(code, status, message or f"fake {status}"))


def json_mode_unsupported(model: str) -> Behaviour:
    """The 400 a Gemini model without JSON mode gives to responseMimeType application/json."""
    return http_error(400, f"Json mode is not enabled for models/{model}")


def safety_block(*, where: str = "prompt") -> Behaviour:
    """A safety block: on the prompt (promptFeedback) or on the candidate (finishReason SAFETY)."""
    if where == "prompt":
        return Behaviour(block_reason="SAFETY")
    return Behaviour(text="", finish_reason="SAFETY")


class FakeGemini(FakeVendor):
    """The fake Gemini server; see the module docstring."""

    def __init__(self) -> None:
        super().__init__()
        self._queues: dict[str | None, deque[Behaviour]] = {}
        self._always: dict[str | None, Behaviour] = {}
        self._script_lock = threading.Lock()
        self.models = list(MODELS)
        self._rejects_schema: set[str | None] = set()
        self._responder: Callable[[str, dict[str, Any]], Behaviour | None] | None = None

    def reject_schema(self, *, model: str | None = None) -> None:
        """Refuse JSON mode (of `model`, or of every model) with Gemini's 400 INVALID_ARGUMENT."""
        with self._script_lock:
            self._rejects_schema.add(model)

    def respond(self, responder: Callable[[str, dict[str, Any]], Behaviour | None]) -> None:
        """Answer calls not otherwise scripted with responder(model, request body) (None: the default)."""
        with self._script_lock:
            self._responder = responder

    def __enter__(self) -> FakeGemini:
        self.start()
        return self

    def script(self, *behaviours: Behaviour, model: str | None = None) -> None:
        """Answer the next calls (of `model`, or of any model) with these behaviours, in order."""
        with self._script_lock:
            self._queues.setdefault(model, deque()).extend(behaviours)

    def always(self, behaviour: Behaviour, *, model: str | None = None) -> None:
        """Answer every call (of `model`, or of any model) not otherwise scripted with this."""
        with self._script_lock:
            self._always[model] = behaviour

    @property
    def generate_calls(self) -> list[tuple[str, RecordedRequest]]:
        """(model, request) of every generateContent / streamGenerateContent call received."""
        calls = []
        for request in list(self.requests):
            match = ROUTE.match(request.path)
            if match:
                calls.append((match["model"], request))
        return calls

    def _next(self, model: str, body: dict[str, Any]) -> Behaviour:
        with self._script_lock:
            config = body.get("generationConfig") or {}
            if config.get("responseMimeType") == "application/json" and (
                model in self._rejects_schema or None in self._rejects_schema
            ):
                return json_mode_unsupported(model)
            for key in (model, None):
                queue = self._queues.get(key)
                if queue:
                    return queue.popleft()
            responder = self._responder
            always = self._always.get(model) or self._always.get(None)
        if always is not None:
            return always
        return (responder(model, body) if responder else None) or Behaviour()

    def handle(self, request: RecordedRequest) -> Response:
        """Route one request."""
        if request.method == "GET" and request.path == "/v1beta/models":
            models = [
                {"name": f"models/{name}", "supportedGenerationMethods": ["generateContent"]}
                for name in self.models
            ]
            return Response(body={"models": models})
        match = ROUTE.match(request.path)
        if request.method != "POST" or not match:
            return Response(status=404, body=error_body(404, "NOT_FOUND", f"no route {request.path}"))
        body = request.body if isinstance(request.body, dict) else {}
        config = body.get("generationConfig") or {}
        schema = config.get("responseSchema") or config.get("responseJsonSchema")
        behaviour = self._next(match["model"], body)
        return behaviour.response(stream=match["method"] == "streamGenerateContent", schema=schema)
