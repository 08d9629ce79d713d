"""The streamed completion: follow the run's events by `seq` (the channel layer's live
messages, gaps and the tail filled from the stored log, as the WebSocket consumer does) and
translate them into chat.completion.chunk events."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from channels.db import aclose_old_connections
from channels.layers import get_channel_layer

from conversations.events import group_name, read_events
from conversations.models import Conversation
from conversations.selectors import achat_result
from conversations.services import conversation_cancel
from openai_api import chunks

logger = logging.getLogger("polyagents.openai")

FINAL_TYPES = frozenset({"conversation_completed", "conversation_failed"})
# How long a follower waits for a live message before it reads the stored log.
CATCH_UP_SECONDS = 2.0
_CANCELLING: set[asyncio.Task[Any]] = set()


async def _stored(conversation_id: Any, after: int) -> list[dict[str, Any]]:
    """The stored events after `after`. The log's database read runs in this request's thread,
    whose connection then goes back to the pool: a stream lasts a whole conversation, and 100
    streams must not hold 100 connections."""
    try:
        return await read_events(conversation_id, after)
    finally:
        await aclose_old_connections()


def _live_events(message: Any) -> list[dict[str, Any]]:
    """The events of a group message: one stored batch (`events`) or a single `event`."""
    if not isinstance(message, dict):
        return []
    events = message.get("events")
    if isinstance(events, list):
        return [e for e in events if isinstance(e, dict)]
    event = message.get("event")
    return [event] if isinstance(event, dict) else []


async def follow(conversation_id: Any, run: asyncio.Task[Conversation]) -> AsyncIterator[dict[str, Any]]:
    """Every event of the conversation once, in `seq` order, until the run ends."""
    layer = get_channel_layer()
    channel = await layer.new_channel()
    await layer.group_add(group_name(conversation_id), channel)
    sent = 0
    receive: asyncio.Task[Any] | None = None
    try:
        while True:
            if run.done():
                for event in await _stored(conversation_id, sent):
                    yield event
                return
            if receive is None:
                receive = asyncio.ensure_future(layer.receive(channel))
            done, _ = await asyncio.wait(
                {receive, run}, timeout=CATCH_UP_SECONDS, return_when="FIRST_COMPLETED"
            )
            live: list[dict[str, Any]] = []
            if receive in done:
                message, receive = receive.result(), None
                heard = [e for e in _live_events(message) if e["seq"] > sent]
                if not heard:
                    continue
                if heard[0]["seq"] == sent + 1:
                    live = heard
            if not live and not run.done():
                live = await _stored(conversation_id, sent)  # a gap, or a quiet spell
            for event in live:
                if event["seq"] > sent:
                    sent = event["seq"]
                    yield event
    finally:
        if receive is not None:
            receive.cancel()
        await layer.group_discard(group_name(conversation_id), channel)


def _translate(writer: chunks.ChunkWriter, event: dict[str, Any], spoken: set[tuple[str, int]]) -> str | None:
    kind = event.get("type")
    if kind == "agent_delta":
        spoken.add((event["agent_id"], event["turn"]))
        return writer.reasoning(event["agent_id"], event["turn"], event.get("delta", ""))
    if kind == "agent_response" and (event["agent_id"], event["turn"]) not in spoken:
        return writer.reasoning(event["agent_id"], event["turn"], event.get("content", ""))
    if kind == "agent_error":
        agent, turn = event.get("agent_id"), event.get("turn")
        return writer.note(
            f"[{agent}, turn {turn} failed: {event.get('kind', 'error')}]", agent_id=agent, turn=turn
        )
    if kind == "consensus_reached":
        vote = {
            k: event.get(k) for k in ("winner", "tallies", "reached", "confidence", "agreement", "method")
        }
        return writer.note(chunks.vote_summary(event), vote=vote)
    return None


async def completion_stream(
    *,
    conversation: Conversation,
    exchange: int,
    run: asyncio.Task[Conversation],
    writer: chunks.ChunkWriter,
    panel: str,
    include_usage: bool,
) -> AsyncIterator[str]:
    """The SSE body. A client that goes away cancels the run."""
    try:
        yield writer.chunk({"role": "assistant", "content": "", "refusal": None})
        spoken: set[tuple[str, int]] = set()
        async for event in follow(conversation.pk, run):
            text = _translate(writer, event, spoken)
            if text is not None:
                yield text
        finished = await run
        body = await achat_result(finished, exchange)
        if finished.status in ("failed", "cancelled"):
            error = {"message": f"The panel could not answer: {finished.error}", "type": "server_error"}
            yield writer.event({"error": {**error, "param": None, "code": "agents_unavailable"}})
        else:
            yield writer.chunk({"content": chunks.answer_text(body)})
            yield writer.chunk({}, chunks.finish_reason(body), polyagents=chunks.polyagents(body, panel))
            if include_usage:
                yield writer.event(
                    {**writer.head, "system_fingerprint": None, "choices": [], "usage": chunks.usage(body)}
                )
        yield "data: [DONE]\n\n"
    finally:
        if not run.done():
            logger.info("client went away; cancelling", extra={"conversation_id": str(conversation.pk)})
            task = asyncio.ensure_future(conversation_cancel(conversation_id=conversation.pk))
            _CANCELLING.add(task)
            task.add_done_callback(_CANCELLING.discard)
