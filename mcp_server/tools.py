"""The MCP tools: consult_panel, get_conversation and list_panels, thin adapters over the
services /chat and /conversations use (start a run, run it, read a conversation)."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import uuid
from typing import Any, Literal

from asgiref.sync import sync_to_async
from django.conf import settings
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import Field

from conversations.events import read_events
from conversations.models import Conversation
from conversations.selectors import achat_result, conversation_detail
from conversations.serializers import ChatRequestSerializer
from conversations.services import (
    ConversationError,
    conversation_cancel,
    conversation_run,
    conversation_start,
)
from gateway.principal import Principal
from mcp_server.access import charge, principal_in, require
from panels.registry import PanelNotFound, list_panels, start_options

logger = logging.getLogger("polyagents.mcp")

# How often a waiting consult_panel reads the run's new events (its progress notifications).
FOLLOW_SECONDS = 0.5
# Runs that outlived their tool call (or whose client went away) are kept referenced until they end.
_RUNNING: set[asyncio.Task[Any]] = set()

server: MCPServer = MCPServer(
    name="polyagents",
    instructions=(
        "Ask a panel of LLM agents that discuss, vote and report a calibrated consensus. "
        "consult_panel runs one question (progress notifications at each step); "
        "get_conversation reads a run by id; list_panels names the panels you may use."
    ),
)


def _progress_step(event: dict[str, Any]) -> str | None:
    """The progress message of an event that is one step of a run, else None."""
    kind = event.get("type")
    if kind == "agent_response":
        return f"{event.get('agent_id')} answered (turn {event.get('turn')})"
    if kind == "agent_error":
        return f"{event.get('agent_id')} failed (turn {event.get('turn')})"
    if kind == "vote":
        return f"{event.get('voter')} voted"
    if kind == "consensus_reached":
        reached = "reached" if event.get("reached") else "not reached"
        return f"consensus {reached} (confidence {event.get('confidence')})"
    return None


def _summary(body: dict[str, Any]) -> dict[str, Any]:
    """The tool's result: the answer, confidence, agreement, votes, id and cost of a finished run."""
    consensus = body.get("consensus") or {}
    return {
        "conversation_id": body["conversation_id"],
        "status": body["metadata"]["status"],
        "answer": body.get("consensus_result"),
        "confidence": body.get("confidence"),
        "agreement": body.get("agreement"),
        "votes": {
            "method": consensus.get("method"),
            "reached": consensus.get("reached"),
            "winner": consensus.get("winner"),
            "tallies": consensus.get("tallies"),
            "ballots": [{"voter": v["voter"], "choice": v["choice"]} for v in body.get("votes", [])],
        },
        "cost_usd": (body.get("cost") or {}).get("total_usd"),
        "usage": body.get("usage"),
        "error": body["metadata"].get("error"),
    }


async def _options(principal: Principal, fields: dict[str, Any], panel: str) -> dict[str, Any]:
    serializer = ChatRequestSerializer(data={k: v for k, v in fields.items() if v is not None})
    if not serializer.is_valid():
        raise ToolError(f"invalid arguments: {dict(serializer.errors)}")
    data = serializer.validated_data
    asked = {
        "num_agents": data.get("num_agents"),
        "turns": data.get("turns"),
        "strategy": data.get("strategy"),
    }
    try:
        return await start_options(principal=principal, panel_id=panel, **asked)
    except PanelNotFound as exc:
        raise ToolError(str(exc)) from None
    except ValueError as exc:
        raise ToolError(f"num_agents: {exc}") from None


async def _follow(
    ctx: Context, conversation_id: uuid.UUID, run: asyncio.Task[Conversation], total: int
) -> bool:
    """Report each step of the run as progress until it ends (True) or MCP_WAIT_SECONDS pass (False)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.CONFIG.MCP_WAIT_SECONDS
    seen, steps = 0, 0
    while True:
        await asyncio.wait({run}, timeout=min(FOLLOW_SECONDS, max(0.0, deadline - loop.time())))
        for event in await read_events(conversation_id, seen):
            seen = max(seen, int(event.get("seq", seen)))
            message = _progress_step(event)
            if message is not None:
                steps += 1
                await ctx.report_progress(steps, max(total, steps), message)
        if run.done():
            return True
        if loop.time() >= deadline:
            return False


def _keep(task: asyncio.Task[Any]) -> None:
    _RUNNING.add(task)
    task.add_done_callback(_RUNNING.discard)


@server.tool(
    description=(
        "Ask the panel a question. Agents answer over one or more turns, vote, and the result "
        "carries the answer, a calibrated confidence, the agreement, the votes, the "
        "conversation_id and the cost. Progress is reported at each agent's turn, the vote and "
        "the consensus. A run that outlives the call returns its conversation_id and status: "
        "follow it with get_conversation."
    )
)
async def consult_panel(
    ctx: Context,
    question: str = Field(description="The question for the panel.", min_length=1, max_length=8000),
    panel: str = Field(default="default", description="A panel id from list_panels."),
    num_agents: int | None = Field(default=None, ge=1, description="How many of the panel's agents sit."),
    turns: int | None = Field(default=None, ge=1, description="Discussion turns before the vote."),
    strategy: Literal["majority", "weighted", "reliability"] | None = None,
) -> dict[str, Any]:
    principal = principal_in(ctx)
    require(principal, "write")
    await charge(ctx, principal)
    fields = {"message": question, "num_agents": num_agents, "turns": turns, "strategy": strategy}
    options = await _options(principal, fields, panel)
    try:
        conversation, exchange = await conversation_start(
            principal=principal, message=question, running=True, **options
        )
    except ConversationError as exc:
        raise ToolError(f"{exc.code}: {exc}") from None
    run = asyncio.get_running_loop().create_task(
        conversation_run(
            conversation_id=conversation.pk, exchange=exchange, stream_when_watched=True,
            fresh=conversation, question=question,
        ),
        context=contextvars.Context(),
    )  # fmt: skip
    _keep(run)
    total = conversation.num_agents * (conversation.turns_requested + 1) + 1
    try:
        finished = await _follow(ctx, conversation.pk, run, total)
    except asyncio.CancelledError:
        # The client went away (or cancelled the request): the run stops, as a WebSocket cancel stops it.
        logger.info("MCP client went away; cancelling", extra={"conversation_id": str(conversation.pk)})
        _keep(asyncio.ensure_future(conversation_cancel(conversation_id=conversation.pk)))
        raise
    if not finished:
        return {
            "conversation_id": str(conversation.pk),
            "status": "running",
            "detail": "The run goes on; follow it with get_conversation.",
        }
    return _summary(await achat_result(run.result(), exchange))


@server.tool(description="One of your conversations by id: status, answer, confidence, messages and votes.")
async def get_conversation(
    ctx: Context, conversation_id: str = Field(description="The conversation_id consult_panel returned.")
) -> dict[str, Any]:
    principal = principal_in(ctx)
    require(principal, "read")
    await charge(ctx, principal)
    try:
        pk = uuid.UUID(conversation_id)
    except ValueError:
        raise ToolError("conversation_id: not a UUID") from None
    detail = await sync_to_async(conversation_detail)(principal, pk)
    if detail is None:
        raise ToolError(f"conversation {conversation_id} not found")  # someone else's looks the same
    return detail


@server.tool(
    name="list_panels", description="The panels you may consult: id, description, agents, turns and strategy."
)
async def list_panels_tool(ctx: Context) -> list[dict[str, Any]]:
    principal = principal_in(ctx)
    require(principal, "read")
    panels = await list_panels(principal=principal)
    return [
        {
            "id": panel.id,
            "description": panel.description,
            "agents": [agent.describe() for agent in panel.agents],
            "turns": panel.turns,
            "strategy": panel.strategy,
        }
        for panel in panels
    ]
