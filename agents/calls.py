"""One agent call of a run: through the resilience layer, its streamed text batched into events."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from agents.profiles import AgentProfile
from agents.prompts import agent_request
from agents.providers.base import Generation, OutputFormat
from agents.providers.registry import get_provider
from agents.records import AgentResult
from agents.resilience import call_with_resilience

Emit = Callable[..., Awaitable[Any]]

DELTA_FLUSH_SECONDS = 0.2  # agent_delta events are batched: at most ~5 per second per agent
DELTA_FLUSH_CHARS = 600


class DeltaBatcher:
    """Collects token chunks of one agent's turn and emits them as few `agent_delta` events."""

    def __init__(
        self, emit: Emit, agent_id: str, turn: int, *, type: str = "agent_delta", **fields: Any
    ) -> None:
        self.emit = emit
        self.agent_id = agent_id
        self.turn = turn
        self.type = type
        self.fields = fields if type != "agent_delta" else {"agent_id": agent_id, "turn": turn}
        self.buffer: list[str] = []
        self.size = 0
        self.last_flush = time.monotonic()

    async def add(self, chunk: str) -> None:
        self.buffer.append(chunk)
        self.size += len(chunk)
        if self.size >= DELTA_FLUSH_CHARS or time.monotonic() - self.last_flush >= DELTA_FLUSH_SECONDS:
            await self.flush()

    async def flush(self) -> None:
        if self.buffer:
            text = "".join(self.buffer)
            self.buffer.clear()
            self.size = 0
            await self.emit(self.type, **self.fields, delta=text)
        self.last_flush = time.monotonic()


class AgentCaller:
    """Sends the agent calls of one run, all bound by the run's deadline.

    Calls outside the discussion turns (ballots, the chairman) are kept in `other_calls`,
    so that the run's usage and cost count them.
    """

    def __init__(
        self, *, emit: Emit, question: str, deadline_seconds: float, max_output_tokens: int | None
    ) -> None:
        self.emit = emit
        self.question = question
        self.deadline = time.monotonic() + deadline_seconds
        self.max_output_tokens = max_output_tokens
        self.other_calls: list[AgentResult] = []

    async def call(
        self,
        profile: AgentProfile,
        prompt: str,
        turn: int,
        metadata: dict[str, Any],
        stream: bool,
        *,
        output: OutputFormat | None = None,
        batcher: DeltaBatcher | None = None,
    ) -> Generation:
        """One reply of `profile`; streamed as `agent_delta` events (or `batcher`'s) when `stream`."""
        provider = get_provider(profile.provider)
        request = agent_request(
            profile,
            prompt,
            self.max_output_tokens,
            output=output,
            metadata={"agent_id": profile.agent_id, "turn": turn, "question": self.question, **metadata},
        )
        if not stream:
            return await call_with_resilience(
                provider, request, fallback_models=profile.fallback_models, deadline=self.deadline
            )
        batcher = batcher or DeltaBatcher(self.emit, profile.agent_id, turn)
        try:
            return await call_with_resilience(
                provider,
                request,
                fallback_models=profile.fallback_models,
                deadline=self.deadline,
                on_delta=batcher.add,
            )
        finally:
            await batcher.flush()

    def record(self, agent_id: str, turn: int, generation: Generation) -> None:
        """Count a call outside the discussion turns (a ballot, the chairman) in usage and cost."""
        self.other_calls.append(
            AgentResult(
                agent_id=agent_id,
                turn=turn,
                ok=True,
                model=generation.model,
                provider=generation.provider,
                usage=generation.usage,
                simulated=generation.simulated,
            )
        )
