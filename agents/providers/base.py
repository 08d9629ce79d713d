"""The one small interface every LLM provider implements, and the steps vendors share.

Nothing outside `agents/providers/` imports a vendor SDK: the orchestrator sees only
`Provider.generate` / `Provider.stream`, `GenerationRequest`, `Generation` and
`ProviderError`. A vendor's provider turns what its SDK returns into `Piece`s; the base
class collects a stream of them, checks the vendor's safety verdict, classifies the
SDK's failures and builds the `Generation`.
"""

from __future__ import annotations

import abc
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypeVar

import jiter

from consensus import parse_json_object

logger = logging.getLogger(__name__)

ErrorKind = Literal[
    "rate_limited",  # 429 / RESOURCE_EXHAUSTED, per-minute quota: retryable
    "quota_exhausted",  # per-day quota: not worth retrying now
    "server",  # 5xx: retryable
    "timeout",  # no answer in time: retryable
    "connection",  # network failure: retryable
    "auth",  # 401/403: not retryable
    "bad_request",  # 400/404: not retryable
    "safety",  # blocked by the vendor's safety filter: not retryable
    "circuit_open",  # our breaker refused the call
    "unknown",
]

RETRYABLE_KINDS: frozenset[str] = frozenset({"rate_limited", "server", "timeout", "connection"})

T = TypeVar("T")


def status_kind(code: int) -> ErrorKind:
    """The kind of a failure answered with HTTP status `code` (429 as per-minute rate limit)."""
    if code == 429:
        return "rate_limited"
    if code == 408:
        return "timeout"
    if code >= 500:
        return "server"
    if code in (401, 403):
        return "auth"
    if 400 <= code < 500:
        return "bad_request"
    return "unknown"


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.prompt_tokens + other.prompt_tokens, self.completion_tokens + other.completion_tokens
        )


@dataclass(frozen=True)
class ResponseSchema:
    """A JSON schema the vendor is asked to constrain its output to (structured output)."""

    name: str
    schema: Mapping[str, Any]


@dataclass(frozen=True)
class OutputFormat:
    """What a reply must contain, as structured output or, as the fallback, as text lines.

    `Provider.complete` appends `json_instructions` and sends `schema` when the provider
    supports structured output for the model, else appends `text_instructions`.
    `stream_field` is the JSON string field streamed as readable text (None: nothing).
    """

    name: str
    schema: Mapping[str, Any]
    json_instructions: str
    text_instructions: str
    stream_field: str | None = None


@dataclass(frozen=True)
class GenerationRequest:
    model: str
    prompt: str
    system_instruction: str = ""
    temperature: float = 0.7
    max_output_tokens: int | None = None
    timeout: float | None = None
    # Context for providers that want it (the simulated one); real vendors ignore it.
    # Keys used: agent_id, turn, kind ("answer" | "ballot" | "repair"), question, options.
    metadata: dict[str, Any] = field(default_factory=dict)
    # What the reply must contain (see Provider.complete); None: free text.
    output: OutputFormat | None = None
    # Set by Provider.complete for the vendor call: the schema to send, None for text.
    response_schema: ResponseSchema | None = None


@dataclass(frozen=True)
class Generation:
    text: str
    model: str
    provider: str
    usage: Usage = Usage()
    latency_ms: float = 0.0
    finish_reason: str | None = None
    simulated: bool = False
    # The parsed JSON object of a structured reply (None: a text reply, or unreadable JSON).
    data: dict[str, Any] | None = None
    # Whether the reply was requested as structured output.
    structured: bool = False


@dataclass(frozen=True)
class Piece:
    """What one streamed chunk of a vendor's reply (or its whole reply) carries."""

    text: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None  # None: this chunk reports no usage


class ProviderError(Exception):
    """A classified provider failure."""

    def __init__(
        self,
        message: str,
        *,
        kind: ErrorKind = "unknown",
        status: int | None = None,
        retry_after: float | None = None,
        provider: str = "",
        model: str = "",
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status
        self.retry_after = retry_after
        self.provider = provider
        self.model = model

    @property
    def retryable(self) -> bool:
        return self.kind in RETRYABLE_KINDS

    @property
    def counts_against_breaker(self) -> bool:
        """Only failures of the service (not of our request) trip a breaker."""
        return self.kind in RETRYABLE_KINDS or self.kind == "unknown"


DeltaCallback = Callable[[str], Awaitable[None]]


async def _discard(chunk: str) -> None:
    """A delta sink for streamed replies with no readable field."""


# Statuses with which a server refuses a request it cannot serve as asked (400; 422 from
# some OpenAI-compatible servers): when structured output was requested, the call is
# tried once more as text.
SCHEMA_REJECTION_STATUSES = frozenset({400, 422})


class JsonFieldStream:
    """Turns the streamed chunks of a JSON object into the growing text of one string field.

    The buffer is parsed with jiter's partial mode ("trailing-strings": an unfinished
    string counts with what has arrived), so `agent_delta` listeners read the answer's
    prose, never raw JSON. A reply that turns out not to be JSON (a server that ignored
    the schema) is passed through as it comes.
    """

    def __init__(self, field: str, on_delta: DeltaCallback) -> None:
        self.field = field
        self.on_delta = on_delta
        self.buffer = ""
        self.sent = ""
        self.mode: Literal["unknown", "json", "text"] = "unknown"

    async def __call__(self, chunk: str) -> None:
        self.buffer += chunk
        if self.mode == "unknown":
            head = self.buffer.lstrip()
            if len(head) < 3 and "```".startswith(head):
                return  # perhaps the start of a code fence: wait
            if head.startswith("```"):
                if "\n" not in head:
                    return  # wait for the end of the fence line (```json)
                head = head.split("\n", 1)[1].lstrip()
            if not head:
                return
            if head.startswith("{"):
                self.mode = "json"
                self.buffer = head
            else:
                self.mode = "text"
                await self.on_delta(self.buffer)
                return
        if self.mode == "text":
            await self.on_delta(chunk)
            return
        try:
            value = jiter.from_json(self.buffer.encode(), partial_mode="trailing-strings")
        except ValueError:
            return  # not parseable yet (e.g. a partial escape or number): wait for more
        text = value.get(self.field) if isinstance(value, dict) else None
        if isinstance(text, str) and len(text) > len(self.sent) and text.startswith(self.sent):
            delta, self.sent = text[len(self.sent) :], text
            await self.on_delta(delta)


class Provider(abc.ABC):
    """An LLM vendor behind one async interface."""

    name: str = "provider"
    # Whether the vendor can be asked for structured output (a JSON schema).
    supports_structured: bool = False
    # Finish reasons with which the vendor withholds an answer for safety, and how it says so.
    safety_finish_reasons: frozenset[str] = frozenset()
    safety_refusal: str = "blocked the answer"

    @property
    def text_only_models(self) -> set[str]:
        """Models whose server refused structured output: they are asked for text from then on."""
        models: set[str] = self.__dict__.setdefault("_text_only_models", set())
        return models

    def structured_for(self, model: str) -> bool:
        """Whether requests for `model` ask for structured output (not after a server refused it)."""
        return self.supports_structured and model not in self.text_only_models

    def as_sent(self, request: GenerationRequest) -> GenerationRequest:
        """The request `complete` sends first: with its schema and JSON instructions where the
        model takes structured output (`output` set), else as it is."""
        output = request.output
        if output is None or not self.structured_for(request.model):
            return request
        return replace(
            request,
            prompt=f"{request.prompt}\n\n{output.json_instructions}",
            response_schema=ResponseSchema(output.name, output.schema),
        )

    async def prepare(self, request: GenerationRequest) -> None:
        """Build now what calls of this request's shape need (warm-up); nothing by default."""
        return None

    async def complete(self, request: GenerationRequest, on_delta: DeltaCallback | None = None) -> Generation:
        """One reply in the request's output format: structured where possible, else text.

        Without `request.output` this is `generate` (or `stream` with `on_delta`). With it,
        the schema is sent and the JSON instructions appended; a server that refuses the
        schema (400/422) gets the same call once more as text, and the model is
        remembered as text-only (per provider instance, i.e. per provider and model).
        """
        output = request.output
        if output is None:
            return await self._call(request, on_delta)
        if not self.structured_for(request.model):
            return await self._as_text(request, output, on_delta)
        structured = self.as_sent(request)
        forward = on_delta
        if on_delta is not None:
            forward = JsonFieldStream(output.stream_field, on_delta) if output.stream_field else _discard
        try:
            generation = await self._call(structured, forward)
        except ProviderError as exc:
            if exc.kind != "bad_request" or exc.status not in SCHEMA_REJECTION_STATUSES:
                raise
            logger.warning(
                "%s:%s refused structured output (%s); asking for text", self.name, request.model, exc
            )
            generation = await self._as_text(request, output, on_delta)
            self.text_only_models.add(request.model)  # only once the text call went through
            return generation
        return replace(generation, data=parse_json_object(generation.text), structured=True)

    async def _as_text(
        self, request: GenerationRequest, output: OutputFormat, on_delta: DeltaCallback | None
    ) -> Generation:
        text_request = replace(
            request, prompt=f"{request.prompt}\n\n{output.text_instructions}", response_schema=None
        )
        return await self._call(text_request, on_delta)

    async def _call(self, request: GenerationRequest, on_delta: DeltaCallback | None) -> Generation:
        if on_delta is None:
            return await self.generate(request)
        return await self.stream(request, on_delta)

    @abc.abstractmethod
    async def generate(self, request: GenerationRequest) -> Generation:
        """Return the whole answer, or raise ProviderError."""

    async def stream(self, request: GenerationRequest, on_delta: DeltaCallback) -> Generation:
        """Call `on_delta` with each text chunk as the vendor streams it; return the whole answer.

        The default falls back to one chunk from `generate`.
        """
        generation = await self.generate(request)
        if generation.text:
            await on_delta(generation.text)
        return generation

    async def list_models(self) -> list[str]:
        """Model names the vendor offers (for the health check); [] when it cannot tell."""
        return []

    # --- steps a vendor's provider shares ------------------------------------------------
    def classify(self, exc: Exception, *, model: str) -> ProviderError:
        """The ProviderError of a failure raised by the vendor's SDK (a ProviderError as it is)."""
        if isinstance(exc, ProviderError):
            return exc
        return ProviderError(f"{self.name} failed: {exc!r}", kind="unknown", provider=self.name, model=model)

    async def classified(self, model: str, call: Awaitable[T]) -> T:
        """The result of one SDK call, its failure classified."""
        try:
            return await call
        except Exception as exc:
            raise self.classify(exc, model=model) from exc

    async def classified_stream(self, model: str, opened: Awaitable[AsyncIterable[T]]) -> AsyncIterator[T]:
        """The chunks of an SDK stream, its failures (and only its failures) classified."""
        try:
            iterator = (await opened).__aiter__()
        except Exception as exc:
            raise self.classify(exc, model=model) from exc
        while True:
            try:
                chunk = await iterator.__anext__()
            except StopAsyncIteration:
                return
            except Exception as exc:
                raise self.classify(exc, model=model) from exc
            yield chunk

    async def collect(
        self,
        request: GenerationRequest,
        pieces: AsyncIterable[Piece],
        on_delta: DeltaCallback,
        started: float,
    ) -> Generation:
        """A streamed reply: each piece's text goes to `on_delta`; the last finish reason and usage count."""
        parts: list[str] = []
        finish: str | None = None
        usage: Usage | None = None
        async for piece in pieces:
            usage = piece.usage or usage
            finish = piece.finish_reason or finish
            if piece.text:
                parts.append(piece.text)
                await on_delta(piece.text)
        return self.finished(request, Piece("".join(parts), finish, usage), started)

    def finished(self, request: GenerationRequest, reply: Piece, started: float) -> Generation:
        """The Generation of a whole reply (begun at monotonic time `started`), unless withheld for safety."""
        if not reply.text and reply.finish_reason in self.safety_finish_reasons:
            raise ProviderError(
                f"{self.name} {self.safety_refusal}: {reply.finish_reason}",
                kind="safety",
                provider=self.name,
                model=request.model,
            )
        return Generation(
            text=reply.text,
            model=request.model,
            provider=self.name,
            usage=reply.usage or Usage(),
            latency_ms=(time.monotonic() - started) * 1000,
            finish_reason=reply.finish_reason,
        )

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release network resources."""
