"""Any OpenAI-compatible chat-completions server (OpenAI, Ollama, vLLM, llama.cpp...).

The SDK's retries are off (`max_retries=0`): `agents.resilience` is the one retry layer.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from datetime import UTC, datetime
from typing import Any

import openai
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessageParam
from openai.types.completion_usage import CompletionUsage

from agents.providers.base import (
    DeltaCallback,
    ErrorKind,
    Generation,
    GenerationRequest,
    Piece,
    Provider,
    ProviderError,
    Usage,
    status_kind,
)
from agents.providers.loops import aiohttp_transport, refused
from loopstate import PerLoop


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait from `retry-after-ms` or `retry-after` (seconds or an HTTP date)."""
    try:
        if headers.get("retry-after-ms"):
            return max(0.0, float(headers["retry-after-ms"]) / 1000)
    except ValueError:
        pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _error_code(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            return str(inner.get("code") or inner.get("type") or "")
    return ""


def classify(exc: Exception, *, model: str) -> ProviderError:
    """Classify an exception raised by the openai SDK."""
    if isinstance(exc, ProviderError):
        return exc
    kind: ErrorKind
    if isinstance(exc, openai.APITimeoutError) and not refused(exc):  # a subclass of APIConnectionError
        return ProviderError(f"openai timed out: {exc}", kind="timeout", provider="openai", model=model)
    if isinstance(exc, openai.APIConnectionError):
        return ProviderError(
            f"openai connection failed: {exc}", kind="connection", provider="openai", model=model
        )
    if isinstance(exc, openai.APIStatusError):
        code = exc.status_code
        kind = status_kind(code)
        retry_after = None
        if code == 429:
            kind = "quota_exhausted" if _error_code(exc) == "insufficient_quota" else "rate_limited"
            retry_after = parse_retry_after(exc.response.headers)
        return ProviderError(
            f"openai {code}: {exc.message}",
            kind=kind,
            status=code,
            retry_after=retry_after,
            provider="openai",
            model=model,
        )
    return ProviderError(f"openai failed: {exc!r}", kind="unknown", provider="openai", model=model)


def _usage(usage: CompletionUsage | None) -> Usage | None:
    if usage is None:
        return None
    return Usage(prompt_tokens=usage.prompt_tokens or 0, completion_tokens=usage.completion_tokens or 0)


def _reply(completion: ChatCompletion) -> Piece:
    choice = completion.choices[0] if completion.choices else None
    text = (choice.message.content or "") if choice else ""
    return Piece(text, choice.finish_reason if choice else None, _usage(completion.usage))


async def _pieces(chunks: AsyncIterable[ChatCompletionChunk]) -> AsyncIterator[Piece]:
    """The pieces of a streamed completion; usage comes in the last chunk (include_usage)."""
    async for chunk in chunks:
        if not chunk.choices:
            yield Piece(usage=_usage(chunk.usage))
            continue
        choice = chunk.choices[0]
        text = choice.delta.content if choice.delta else None
        yield Piece(text or "", choice.finish_reason, _usage(chunk.usage))


class OpenAICompatProvider(Provider):
    """Chat completions through the openai SDK against a configurable base URL."""

    name = "openai"

    supports_structured = True
    safety_finish_reasons = frozenset({"content_filter"})
    safety_refusal = "filtered the answer"

    def __init__(self, *, base_url: str, api_key: str | None = None, timeout: float = 60.0) -> None:
        self.timeout = timeout
        # Local servers accept any key; the SDK refuses to start without one.
        self._clients = PerLoop(
            lambda: AsyncOpenAI(
                base_url=base_url,
                api_key=api_key or "none",
                max_retries=0,
                timeout=timeout,
                http_client=aiohttp_transport(),  # aiohttp's connection pool (agents.providers.loops)
            )
        )

    def _arguments(self, request: GenerationRequest) -> dict[str, Any]:
        messages: list[ChatCompletionMessageParam] = []
        if request.system_instruction:
            messages.append({"role": "system", "content": request.system_instruction})
        messages.append({"role": "user", "content": request.prompt})
        arguments: dict[str, Any] = {
            "model": request.model,
            "messages": messages,
            "temperature": request.temperature,
            "timeout": request.timeout or self.timeout,
        }
        if request.max_output_tokens is not None:
            arguments["max_tokens"] = request.max_output_tokens
        if request.response_schema is not None:
            arguments["response_format"] = {
                "type": "json_schema",
                "json_schema": {
                    "name": request.response_schema.name,
                    "schema": dict(request.response_schema.schema),
                    "strict": True,
                },
            }
        return arguments

    def classify(self, exc: Exception, *, model: str) -> ProviderError:
        return classify(exc, model=model)

    async def generate(self, request: GenerationRequest) -> Generation:
        """One chat completion."""
        started = time.monotonic()
        completion = await self.classified(request.model, self._create(request))
        return self.finished(request, _reply(completion), started)

    async def stream(self, request: GenerationRequest, on_delta: DeltaCallback) -> Generation:
        """One streamed chat completion; each text chunk goes to `on_delta`."""
        started = time.monotonic()
        chunks = self.classified_stream(request.model, self._create_stream(request))
        return await self.collect(request, _pieces(chunks), on_delta, started)

    async def _create(self, request: GenerationRequest) -> ChatCompletion:
        return await self._clients.get().chat.completions.create(**self._arguments(request))

    async def _create_stream(self, request: GenerationRequest) -> AsyncIterable[ChatCompletionChunk]:
        return await self._clients.get().chat.completions.create(
            **self._arguments(request), stream=True, stream_options={"include_usage": True}
        )

    async def list_models(self) -> list[str]:
        """Model ids the server offers, for the health check."""
        try:
            page = await self._clients.get().models.list()
        except Exception as exc:
            raise classify(exc, model="") from exc
        return [model.id for model in page.data]

    async def aclose(self) -> None:
        """Close the SDK's HTTP client of the running loop."""
        client = self._clients.pop()
        if client is not None:
            await client.close()
