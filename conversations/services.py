"""Services that change conversations: start an exchange, run the panel, cancel.

The orchestrator reports every step through `emit`; `RunRecorder` stores what each
event means (messages, ballots, counters) and then appends the event to the log, so a
client never sees an event that is not stored.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import InterfaceError, OperationalError, connection, transaction

from agents.budget import Budget
from agents.orchestrator import Orchestrator, RunOutcome
from agents.profiles import build_panel
from agents.synthesis import default_mode
from conversations import budget as admission
from conversations import liveness
from conversations.assessment import apanel_weights
from conversations.begin import _abegin, _Begun, _mark_running
from conversations.begin import rehearse_run as rehearse_run  # the warm-up's rehearsal
from conversations.errors import ConversationBusy, ConversationNotFound, ConversationRefused
from conversations.errors import ConversationError as ConversationError  # the services' errors
from conversations.events import EventLog, EventLogBroken
from conversations.finish import _finish, _finish_cancelled
from conversations.models import Conversation, Message
from conversations.recorder import RunRecorder, _watched_by
from conversations.store import event_store
from gateway import quota
from gateway.principal import Principal
from panels.registry import panel_profiles

logger = logging.getLogger("polyagents.conversations")

TITLE_CHARS = 200


def _can_access(principal: Principal, conversation: Conversation) -> bool:
    return principal.is_admin or conversation.owner == principal.owner


@dataclass(frozen=True)
class _Asked:
    """What a new exchange is asked for: its question and how to run it."""

    message: str
    num_agents: int
    turns: int
    strategy: str
    synthesis: str
    agents: list[dict[str, Any]] | None = None  # a named panel's (panels.registry.run_agents)
    tags: dict[str, Any] = field(default_factory=dict)  # stored in metadata (panel, user, surface)


def _start(
    *,
    principal: Principal,
    asked: _Asked,
    conversation_id: uuid.UUID | None,
    create_with_id: bool,
    budget: Budget | None = None,
) -> tuple[Conversation, int]:
    with transaction.atomic():
        conversation = None
        if conversation_id is not None:
            conversation = Conversation.objects.select_for_update().filter(pk=conversation_id).first()
            if conversation is None and not create_with_id:
                raise ConversationNotFound("conversation not found")
            if conversation is not None and not _can_access(principal, conversation):
                # Someone else's conversation is indistinguishable from a missing one.
                raise ConversationNotFound("conversation not found")
        if conversation is None:
            conversation = _new_conversation(principal, asked.message, conversation_id)
        elif conversation.status in (Conversation.Status.PENDING, Conversation.Status.RUNNING):
            raise ConversationBusy("this conversation is already running; wait for it or cancel it")
        try:
            admitted = admission.admit(
                conversation=conversation,
                principal=principal,
                message=asked.message,
                num_agents=asked.num_agents,
                budget=budget,
            )
        except admission.AdmissionRefused as exc:
            raise ConversationRefused(exc) from None
        _open_exchange(conversation, asked, admitted)
        try:
            conversation.save()
            Message.objects.create(**_question(conversation, asked.message))
        except BaseException:
            quota.release(admitted.get("quota"))
            raise
    return conversation, conversation.exchanges


def _new_conversation(principal: Principal, message: str, conversation_id: uuid.UUID | None) -> Conversation:
    return Conversation(
        id=conversation_id or uuid.uuid4(),
        owner=principal.owner,
        api_key_id=principal.api_key_id,
        title=message[:TITLE_CHARS],
    )


def _open_exchange(conversation: Conversation, asked: _Asked, admitted: dict[str, Any]) -> None:
    """Set the fields of a conversation's next exchange, ready to run (not saved)."""
    conversation.exchanges += 1
    conversation.status = Conversation.Status.PENDING
    conversation.num_agents = asked.num_agents
    conversation.turns_requested = asked.turns
    conversation.turns_completed = 0
    conversation.consensus_result = ""
    conversation.confidence = None
    conversation.error = ""
    conversation.cancel_requested = False
    conversation.started_at = None
    conversation.completed_at = None
    conversation.duration = None
    conversation.metadata = {
        **conversation.metadata,
        "strategy": asked.strategy,
        "synthesis": asked.synthesis,
        "agents": asked.agents,
        **asked.tags,
    }
    conversation.metadata.update(admitted)


def _question(conversation: Conversation, message: str) -> dict[str, Any]:
    """The Message fields of the question that opens the conversation's current exchange."""
    return {
        "conversation_id": conversation.pk,
        "exchange": conversation.exchanges,
        "role": Message.Role.USER,
        "turn": 0,
        "content": message,
    }


async def _astart_new(principal: Principal, asked: _Asked, *, running: bool) -> Conversation | None:
    """`_start` of a new conversation without a budget, in one call of the event store; None,
    with nothing written, when its key has a daily quota to reserve (`_start` does that).
    `running`: stored already running."""
    conversation = _new_conversation(principal, asked.message, None)
    _open_exchange(conversation, asked, admission.NOTHING_ADMITTED)
    conversation.updated_at = conversation.created_at
    if running:
        _mark_running(conversation, conversation.created_at)
    if not await event_store().start_conversation(conversation, _question(conversation, asked.message)):
        return None
    conversation._state.adding = False
    conversation._state.db = "default"
    return conversation


def _start_released(**kwargs: Any) -> tuple[Conversation, int]:
    """`_start`, then (PostgreSQL) the calling thread's connection goes back to the pool.

    Under ASGI a request's thread-sensitive ORM calls share one thread, which keeps its pooled
    connection until the request ends. A /chat request lasts a whole conversation, whose own
    database work does not use that thread; handing the connection back here, in the same
    trip, keeps 200 waiting clients from holding 200 connections (and draining the pool).
    """
    try:
        return _start(**kwargs)
    finally:
        release_connection()


def release_connection() -> None:
    """(PostgreSQL) The calling thread's pooled connection goes back to the pool, unless a
    transaction is open on it (closing it would end that transaction under its owner)."""
    if settings.USING_POSTGRES and not connection.in_atomic_block:
        connection.close()


async def conversation_start(
    *,
    principal: Principal,
    message: str,
    conversation_id: uuid.UUID | None = None,
    num_agents: int | None = None,
    turns: int | None = None,
    strategy: str = "majority",
    synthesis: str | None = None,
    create_with_id: bool = False,
    max_cost: float | None = None,
    max_tokens: int | None = None,
    running: bool = False,
    agents: list[dict[str, Any]] | None = None,
    tags: dict[str, Any] | None = None,
) -> tuple[Conversation, int]:
    """Create a conversation (or a new exchange of an existing one) ready to run.

    `create_with_id` lets POST /stream/{id} create a conversation under a client-chosen id;
    /chat only continues existing ids. `synthesis` None means SYNTHESIS_MODE.
    `running`: the caller runs the exchange at once, in this process (/chat, the chat
    command). A new conversation without a budget is then stored already running, and
    `conversation_run(..., fresh=...)` begins from it without reading it back.
    `agents`: a named panel's agents for this exchange (`PanelConfig.run_agents`); `tags`:
    entries stored in its metadata (`panel`, `user`).
    """
    config = settings.CONFIG
    asked = _Asked(
        message=message,
        num_agents=len(agents) if agents else num_agents or config.NUM_AGENTS,
        turns=turns or config.DEFAULT_TURNS,
        strategy=strategy,
        synthesis=synthesis or default_mode(),
        agents=agents,
        tags=dict(tags or {}),
    )
    budget = Budget(max_cost=max_cost, max_tokens=max_tokens) if max_cost or max_tokens else None
    if conversation_id is None and budget is None:
        conversation = await _astart_new(principal, asked, running=running)
        if conversation is not None:
            return conversation, conversation.exchanges
    return await sync_to_async(_start_released)(
        principal=principal,
        asked=asked,
        conversation_id=conversation_id,
        create_with_id=create_with_id,
        budget=budget,
    )


async def conversation_cancel(*, conversation_id: uuid.UUID) -> None:
    """Ask the run of a conversation to stop: the flag is stored, then pushed to its process
    (at once; without Redis, a run in another process notices at its next heartbeat)."""
    asked = await Conversation.objects.filter(
        pk=conversation_id, status__in=[Conversation.Status.PENDING, Conversation.Status.RUNNING]
    ).aupdate(cancel_requested=True)
    if asked:
        await liveness.push_cancel(conversation_id)


async def _orchestrator(begun: _Begun, recorder: RunRecorder, *, stream_when_watched: bool) -> Orchestrator:
    """The panel's orchestrator for the run, once the run has announced itself."""
    config, conversation = settings.CONFIG, begun.conversation
    panel = panel_profiles(conversation.metadata.get("agents")) or build_panel(conversation.num_agents)
    recorder.personality = {p.agent_id: p.personality for p in panel}
    await recorder(
        "conversation_started",
        question=begun.question,
        num_agents=len(panel),
        turns=conversation.turns_requested,
        agents=[p.describe() for p in panel],
        resumed=bool(begun.prior),
    )
    return Orchestrator(
        panel=panel,
        question=begun.question,
        turns=conversation.turns_requested,
        emit=recorder,
        history=begun.history,
        strategy=conversation.metadata.get("strategy", "majority"),
        deadline_seconds=config.CONVERSATION_DEADLINE,
        max_output_tokens=config.MAX_OUTPUT_TOKENS,
        prior=begun.prior,
        synthesis=conversation.metadata.get("synthesis") or default_mode(),
        budget=admission.run_budget(conversation.metadata),
        vote_weights=await apanel_weights(panel),
        watched=_watched_by(recorder.log) if stream_when_watched else None,
    )


async def conversation_run(
    *,
    conversation_id: uuid.UUID,
    exchange: int,
    stream_when_watched: bool = False,
    fresh: Conversation | None = None,
    question: str = "",
) -> Conversation:
    """Run (or resume) the panel for one exchange to a terminal state; idempotent when done.

    A /stream run streams every reply (agent_delta events). `stream_when_watched` (a /chat
    run) streams a round only if a WebSocket follows the conversation when it starts, and
    otherwise makes the cheaper non-streaming provider call.
    `fresh` and `question`: the conversation as `conversation_start(running=True)` returned
    it, and the question asked. If it was stored already running (a new conversation, nothing
    answered yet), the run begins from them instead of marking and reading it back.
    """
    if fresh is not None and fresh.status == Conversation.Status.RUNNING:
        begun = _Begun(fresh, question)
    else:
        begun = await _abegin(conversation_id, exchange)
    conversation = begun.conversation
    if conversation.is_terminal:
        return conversation
    log = EventLog(conversation.pk, begun.last_seq, buffered=True)
    recorder = RunRecorder(conversation, exchange, log)
    started = time.monotonic()
    orchestrator = await _orchestrator(begun, recorder, stream_when_watched=stream_when_watched)
    run = asyncio.ensure_future(orchestrator.run())
    pulse = liveness.pulse()  # this process's one heartbeat for all its runs, and cancel pushes
    pulse.add(conversation.pk, run)
    try:
        outcome = await run
    except asyncio.CancelledError:
        if not run.cancelled():
            raise  # we ourselves are being cancelled (shutdown): leave it resumable
        return await _finish_cancelled(conversation.pk, exchange, recorder, time.monotonic() - started)
    except (OperationalError, InterfaceError, EventLogBroken):
        # The database went away: the run is not over. Leave the conversation running; the
        # job's retry (or the stale sweep) resumes it from its last stored turn.
        logger.warning("conversation run interrupted", extra={"conversation": str(conversation.pk)})
        raise
    except Exception as exc:
        logger.exception("conversation run crashed", extra={"conversation": str(conversation.pk)})
        outcome = RunOutcome(
            status="failed", turns_completed=0, results=orchestrator.results, reason=repr(exc)
        )
        outcome.usage, outcome.cost = orchestrator.total_usage(), orchestrator.total_cost()  # still charged
    finally:
        pulse.discard(conversation.pk, run)
    return await _finish(conversation.pk, exchange, recorder, outcome, time.monotonic() - started)
