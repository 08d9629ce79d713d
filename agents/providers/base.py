"""The one small interface every LLM provider implements.

Nothing outside `agents/providers/` imports a vendor SDK: the orchestrator sees only
`Provider.generate` / `Provider.stream`, `GenerationRequest`, `Generation` and
`ProviderError`.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

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
class GenerationRequest:
    model: str
    prompt: str
    system_instruction: str = ""
    temperature: float = 0.7
    max_output_tokens: int | None = None
    timeout: float | None = None
    # Context for providers that want it (the simulated one); real vendors ignore it.
    # Keys used: agent_id, turn, kind ("answer" | "ballot"), question, options.
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Generation:
    text: str
    model: str
    provider: str
    usage: Usage = Usage()
    latency_ms: float = 0.0
    finish_reason: str | None = None
    simulated: bool = False


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


class Provider(abc.ABC):
    """An LLM vendor behind one async interface."""

    name: str = "provider"

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

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release network resources."""
