"""Gemini through the google-genai SDK (async client), with errors classified.

The SDK's own retries stay off: in google-genai 1.52 `HttpOptions.retry_options=None`
means `stop_after_attempt(1)` (see `_api_client.retry_args`), so `agents.resilience`
is the one retry layer.

The SDK's async calls go through an httpx client whose transport is aiohttp's connector
(httpx-aiohttp): the SDK keeps its httpx code path (timeouts, errors as httpx exceptions),
while the connection pool is aiohttp's, which costs far less CPU than httpcore's under
hundreds of concurrent calls (docs/scaling.md). The SDK's own aiohttp path is not used: in
google-genai 1.52 it bounds only connecting and sleeps 1-10 s before retrying a failed
connection itself.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping
from typing import Any

import httpx
from google import genai
from google.genai import errors, types

from agents.providers.base import (
    DeltaCallback,
    ErrorKind,
    Generation,
    GenerationRequest,
    Piece,
    Provider,
    ProviderError,
    ResponseSchema,
    Usage,
    status_kind,
)
from agents.providers.loops import aiohttp_transport, refused, tls_context
from loopstate import PerLoop

# No tools are sent: a call with a config skips the SDK's automatic function calling loop.
NO_AFC = types.AutomaticFunctionCallingConfig(disable=True)
# What GeminiProvider.warm_up sends and is answered, in memory.
WARM_UP_SCHEMA = ResponseSchema(
    "warm_up",
    {
        "type": "object",
        "properties": {"answer": {"type": "string"}, "confidence": {"type": "number"}},
        "required": ["answer", "confidence"],
    },
)
WARM_UP_REPLY = {
    "candidates": [
        {
            "content": {"role": "model", "parts": [{"text": '{"answer": "", "confidence": 0}'}]},
            "finishReason": "STOP",
        }
    ],
    "usageMetadata": {"promptTokenCount": 1, "candidatesTokenCount": 1, "totalTokenCount": 2},
}
RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"
QUOTA_FAILURE = "type.googleapis.com/google.rpc.QuotaFailure"
DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)s\s*$")
MAX_LISTED_MODELS = 500


def parse_duration(value: object) -> float | None:
    """Seconds of a google.protobuf.Duration in JSON form ("37s", "0.2s"), else None."""
    match = DURATION.match(value) if isinstance(value, str) else None
    return float(match.group(1)) if match else None


def _error_details(exc: errors.APIError) -> list[dict[str, Any]]:
    body = exc.details
    if isinstance(body, dict):
        error = body.get("error", body)
        details = error.get("details") if isinstance(error, dict) else None
        if isinstance(details, list):
            return [d for d in details if isinstance(d, dict)]
    return []


def classify_api_error(exc: errors.APIError, *, model: str) -> ProviderError:
    """Turn an SDK APIError into a ProviderError of the right kind."""
    code = exc.code or 0
    message = f"gemini {code} {exc.status or ''}: {exc.message or ''}".strip()
    kind = status_kind(code)
    retry_after = None
    if code == 429 or exc.status == "RESOURCE_EXHAUSTED":
        kind, retry_after = _exhausted(_error_details(exc))
    return ProviderError(
        message, kind=kind, status=code, retry_after=retry_after, provider="gemini", model=model
    )


def _exhausted(details: list[dict[str, Any]]) -> tuple[ErrorKind, float | None]:
    """A 429's kind (per-day quota or per-minute rate) and the delay its RetryInfo asks for."""
    retry_after = None
    for detail in details:
        if detail.get("@type") == RETRY_INFO:
            retry_after = parse_duration(detail.get("retryDelay"))
    quota_ids = [
        str(violation.get("quotaId", ""))
        for detail in details
        if detail.get("@type") == QUOTA_FAILURE
        for violation in detail.get("violations") or []
        if isinstance(violation, dict)
    ]
    return (
        "quota_exhausted" if any("PerDay" in quota for quota in quota_ids) else "rate_limited"
    ), retry_after


def classify(exc: Exception, *, model: str) -> ProviderError:
    """Classify any exception raised while talking to Gemini."""
    if isinstance(exc, ProviderError):
        return exc
    if isinstance(exc, errors.APIError):
        return classify_api_error(exc, model=model)
    if refused(exc):
        return ProviderError(
            f"gemini connection failed: {exc!r}", kind="connection", provider="gemini", model=model
        )
    if isinstance(exc, httpx.TimeoutException | TimeoutError):
        return ProviderError(f"gemini timed out: {exc!r}", kind="timeout", provider="gemini", model=model)
    if isinstance(exc, httpx.TransportError | ConnectionError):
        return ProviderError(
            f"gemini connection failed: {exc!r}", kind="connection", provider="gemini", model=model
        )
    return ProviderError(f"gemini failed: {exc!r}", kind="unknown", provider="gemini", model=model)


CONFIG_SHAPES = 256  # request bodies and configs kept per provider (a panel uses a handful)


def gemini_schema(schema: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON schema in Gemini's Schema dialect: no additionalProperties, an explicit property order.

    Gemini writes properties in alphabetical order unless `propertyOrdering` says
    otherwise; the answer must come first so that a streamed reply shows prose early.
    """
    converted: dict[str, Any] = {k: v for k, v in schema.items() if k != "additionalProperties"}
    properties = converted.get("properties")
    if isinstance(properties, Mapping):
        converted["properties"] = {
            name: gemini_schema(value) if isinstance(value, Mapping) else value
            for name, value in properties.items()
        }
        converted["propertyOrdering"] = list(properties)
    return converted


def _enum_name(value: object) -> str | None:
    if value is None:
        return None
    return str(getattr(value, "value", value))


def _text_of(response: types.GenerateContentResponse) -> str:
    """The answer text of the first candidate, thoughts left out."""
    if not response.candidates:
        return ""
    content = response.candidates[0].content
    if content is None or not content.parts:
        return ""
    return "".join(part.text for part in content.parts if part.text and not part.thought)


def _usage(metadata: types.GenerateContentResponseUsageMetadata | None) -> Usage | None:
    if metadata is None:
        return None
    # Thinking tokens are billed as output, so they count as completion tokens.
    output = (metadata.candidates_token_count or 0) + (metadata.thoughts_token_count or 0)
    return Usage(prompt_tokens=metadata.prompt_token_count or 0, completion_tokens=output)


def _piece(response: types.GenerateContentResponse, model: str) -> Piece:
    """What a response (or a streamed chunk) carries; ProviderError if the prompt was blocked."""
    feedback = response.prompt_feedback
    if feedback is not None and feedback.block_reason is not None:
        reason = _enum_name(feedback.block_reason)
        raise ProviderError(
            f"gemini blocked the prompt: {reason}", kind="safety", provider="gemini", model=model
        )
    finish = _enum_name(response.candidates[0].finish_reason) if response.candidates else None
    return Piece(_text_of(response), finish, _usage(response.usage_metadata))


def sdk_tls_args() -> dict[str, Any]:
    """HttpOptions that give google-genai the process's TLS context (`tls_context`), which it
    would otherwise build twice per client: once for its sync and async httpx clients
    (`verify`), once for websockets (`ssl`)."""
    context = tls_context()
    return {"client_args": {"verify": context}, "async_client_args": {"verify": context, "ssl": context}}


def _in_memory_reply(request: httpx.Request) -> httpx.Response:
    """A Gemini answer (WARM_UP_REPLY), as one JSON body or as one server-sent event."""
    if request.url.path.endswith(":streamGenerateContent"):
        sse = f"data: {json.dumps(WARM_UP_REPLY)}\r\n\r\n".encode()
        return httpx.Response(200, content=sse, headers={"content-type": "text/event-stream"})
    return httpx.Response(200, json=WARM_UP_REPLY)


@contextlib.asynccontextmanager
async def _in_memory_sdk(
    answer: Callable[[httpx.Request], httpx.Response], extra_body: dict[str, Any] | None = None
) -> AsyncIterator[Any]:
    """google-genai's async models API on an in-memory transport that `answer`s each request."""
    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http:
        options = types.HttpOptions(
            base_url="http://in-memory.invalid",
            httpx_async_client=http,
            extra_body=extra_body,
            **sdk_tls_args(),
        )
        yield genai.Client(api_key="in-memory", http_options=options).aio.models


async def _wire_body(config: types.GenerateContentConfig) -> dict[str, Any]:
    """The fields google-genai sends for `config` in a generateContent body (all but the
    contents: systemInstruction, generationConfig with its responseSchema), as it builds
    them: one call to an in-memory transport, which records the body."""
    sent: dict[str, Any] = {}

    def record(request: httpx.Request) -> httpx.Response:
        sent.update(json.loads(request.content))
        return _in_memory_reply(request)

    async with _in_memory_sdk(record) as models:
        await models.generate_content(model="in-memory", contents="-", config=config)
    sent.pop("contents", None)
    return sent


class _LoopClients:
    """One event loop's google-genai clients, all on the loop's transport: `base`, and one per
    request body (`for_body`) whose HttpOptions carry it (`extra_body`), so that a call to it
    passes no config at all."""

    def __init__(self, api_key: str, options: types.HttpOptions) -> None:
        self.api_key = api_key
        self.options = options
        self.base = genai.Client(api_key=api_key, http_options=options)
        self._by_shape: dict[tuple[Any, ...], tuple[dict[str, Any], genai.Client]] = {}

    def for_body(self, shape: tuple[Any, ...], body: dict[str, Any]) -> genai.Client:
        """The client sending `body` (the shape's, from GeminiProvider._body), built once."""
        cached = self._by_shape.get(shape)
        if cached is not None and cached[0] is body:  # a shape's body is rebuilt if evicted
            return cached[1]
        if len(self._by_shape) >= CONFIG_SHAPES:
            self._by_shape.clear()
        options = self.options.model_copy(update={"extra_body": body})
        client = genai.Client(api_key=self.api_key, http_options=options)
        self._by_shape[shape] = (body, client)
        return client

    async def aclose(self) -> None:
        for client in (self.base, *(client for _, client in self._by_shape.values())):
            await client.aio.aclose()


class GeminiProvider(Provider):
    """Google Gemini via google-genai's async client."""

    name = "gemini"

    supports_structured = True
    safety_finish_reasons = frozenset({"SAFETY", "PROHIBITED_CONTENT", "BLOCKLIST", "SPII", "IMAGE_SAFETY"})

    def __init__(self, *, api_key: str, base_url: str | None = None, timeout: float = 60.0) -> None:
        self.timeout = timeout
        self.timeout_ms = max(1, int(timeout * 1000))
        http_options = types.HttpOptions(
            base_url=base_url or None,
            timeout=self.timeout_ms,
            retry_options=None,  # one retry layer: ours (agents.resilience)
            **sdk_tls_args(),
        )

        # One aiohttp session per event loop (a session is bound to its loop), no connection cap.
        self._transports: PerLoop[Any] = PerLoop(aiohttp_transport)

        def clients() -> _LoopClients:
            options = http_options.model_copy(update={"httpx_async_client": self._transports.get()})
            return _LoopClients(api_key, options)

        self._clients = PerLoop(clients)
        # Each body keeps the schema it was built for: its id in the key can't be reused meanwhile.
        self._bodies: dict[tuple[Any, ...], tuple[Any, dict[str, Any]]] = {}
        self._configs: dict[tuple[Any, ...], types.GenerateContentConfig] = {}

    async def warm_up(self) -> None:
        """One call and one streamed call through the SDK on an in-memory transport (no network,
        no LLM), so that a process's first real call does not pay for the SDK's and pydantic's
        first run of request building and response parsing."""
        request = GenerationRequest(
            model="warm-up", prompt="warm up", system_instruction="warm up", response_schema=WARM_UP_SCHEMA
        )
        body, _ = await self._body(request)
        # As the calls at the provider's timeout are made: the body in the client, no config.
        async with _in_memory_sdk(_in_memory_reply, extra_body=body) as models:
            response = await models.generate_content(model=request.model, contents=request.prompt)
            _piece(response, request.model)
            stream = await models.generate_content_stream(model=request.model, contents=request.prompt)
            async for chunk in stream:
                _piece(chunk, request.model)

    async def prepare(self, request: GenerationRequest) -> None:
        """Capture the body of the request's shape now (`_body`: an in-memory SDK call)."""
        await self._body(self.as_sent(request))

    async def _sdk(self, request: GenerationRequest) -> tuple[Any, types.GenerateContentConfig | None]:
        """The SDK's async models API for the request, and the config to call it with.

        The request's shape (system instruction, generation settings, response schema) is sent
        as the body the SDK builds for it (`_body`), through the documented
        `HttpOptions.extra_body`. At the provider's timeout (nearly every call) that body and
        the timeout sit in the HttpOptions of a client kept for the shape, and the call passes
        no config: the SDK then neither converts a config (it looks up each of its ~40 fields
        by iterating the pydantic model) nor patches its options per call (`bench/parts.py`;
        docs/scaling.md). The call without a config goes through the SDK's automatic
        function calling loop, which with no tools ends after the one call.
        A timeout shortened by the conversation's deadline keeps the loop's base client and a
        config of its own (AFC disabled, that timeout, the same body).
        """
        timeout_ms = max(1, int((request.timeout or self.timeout) * 1000))
        body, shape = await self._body(request)
        clients = self._clients.get()
        if timeout_ms == self.timeout_ms:
            return clients.for_body(shape, body).aio.models, None
        key = (shape, timeout_ms)
        config = self._configs.get(key)
        if config is None or config.http_options.extra_body is not body:  # type: ignore[union-attr]
            if len(self._configs) >= CONFIG_SHAPES:
                self._configs.clear()
            config = self._configs[key] = types.GenerateContentConfig(
                http_options=types.HttpOptions(timeout=timeout_ms, extra_body=body),
                automatic_function_calling=NO_AFC,
            )
        return clients.base.aio.models, config

    async def _body(self, request: GenerationRequest) -> tuple[dict[str, Any], tuple[Any, ...]]:
        """What the SDK sends for the request's shape (system instruction, generation settings,
        response schema), captured once per shape in memory (`_wire_body`); and the shape.

        A panel sends a handful of shapes (one per agent, and the ballot).
        """
        schema = request.response_schema
        shape = (
            request.system_instruction,
            request.temperature,
            request.max_output_tokens,
            # A schema is a module constant (an OutputFormat's): its identity, not its text.
            id(schema.schema) if schema else None,
        )
        cached = self._bodies.get(shape)
        if cached is not None:
            return cached[1], shape
        full = types.GenerateContentConfig(
            system_instruction=request.system_instruction or None,
            temperature=request.temperature,  # 0.0 is sent as 0.0, never dropped
            max_output_tokens=request.max_output_tokens,
            response_mime_type="application/json" if schema else None,
            response_schema=gemini_schema(schema.schema) if schema else None,
            automatic_function_calling=NO_AFC,
        )
        body = await _wire_body(full)
        if len(self._bodies) >= CONFIG_SHAPES:
            self._bodies.clear()
        self._bodies[shape] = (schema.schema if schema else None, body)
        return body, shape

    def classify(self, exc: Exception, *, model: str) -> ProviderError:
        return classify(exc, model=model)

    async def generate(self, request: GenerationRequest) -> Generation:
        """One generateContent call."""
        started = time.monotonic()
        response = await self.classified(request.model, self._generate(request))
        return self.finished(request, _piece(response, request.model), started)

    async def stream(self, request: GenerationRequest, on_delta: DeltaCallback) -> Generation:
        """One streamGenerateContent (SSE) call; each text chunk goes to `on_delta`."""
        started = time.monotonic()
        chunks = self.classified_stream(request.model, self._open_stream(request))
        return await self.collect(
            request, (_piece(chunk, request.model) async for chunk in chunks), on_delta, started
        )

    async def _generate(self, request: GenerationRequest) -> types.GenerateContentResponse:
        models, config = await self._sdk(request)
        return await models.generate_content(model=request.model, contents=request.prompt, config=config)

    async def _open_stream(self, request: GenerationRequest) -> AsyncIterable[types.GenerateContentResponse]:
        models, config = await self._sdk(request)
        stream: AsyncIterable[types.GenerateContentResponse] = await models.generate_content_stream(
            model=request.model, contents=request.prompt, config=config
        )
        return stream

    async def list_models(self) -> list[str]:
        """Model names the key can use (without the "models/" prefix), for the health check."""
        names: list[str] = []
        try:
            # Options of its own: the SDK then patches a copy of the client's, instead of
            # writing this call's X-Server-Timeout into the headers later calls start from.
            config = types.ListModelsConfig(
                page_size=100, http_options=types.HttpOptions(timeout=self.timeout_ms)
            )
            pager = await self._clients.get().base.aio.models.list(config=config)
            async for model in pager:
                if model.name:
                    names.append(model.name.removeprefix("models/"))
                if len(names) >= MAX_LISTED_MODELS:
                    break
        except Exception as exc:
            raise classify(exc, model="") from exc
        return names

    async def aclose(self) -> None:
        """Close the SDK's HTTP client of the running loop, and its transport (the SDK does not
        close an httpx client it was given)."""
        clients = self._clients.pop()
        if clients is not None:
            await clients.aclose()
        transport = self._transports.pop()
        if transport is not None:
            await transport.aclose()
