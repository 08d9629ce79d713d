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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import (
    IntegrityError,
    InterfaceError,
    OperationalError,
    connection,
    transaction,
)
from django.utils import timezone

from agents.budget import Budget
from agents.orchestrator import (
    AgentResult,
    Orchestrator,
    RunOutcome,
    extra_calls,
    response_payload,
    usage_dict,
)
from agents.profiles import build_panel
from agents.providers.base import Usage
from agents.synthesis import default_mode
from consensus import Proposal, parse_reply
from conversations import budget as admission
from conversations import liveness, store
from conversations.assessment import aassess, apanel_weights
from conversations.events import EventLog, EventLogBroken, has_watchers, in_pool_thread
from conversations.models import ConsensusResult, Conversation, Event, Message, Vote
from conversations.selectors import CHAT_MESSAGE_FIELDS, CHAT_RESULT_FIELDS, CHAT_VOTE_FIELDS
from conversations.signals import agent_turn, conversation_completed, run_finished
from gateway import quota
from gateway.principal import Principal
from panels.registry import panel_profiles
from telemetry.errors import arecord_error
from telemetry.metrics import CONVERSATIONS

logger = logging.getLogger("polyagents.conversations")

TITLE_CHARS = 200

# Fire-and-forget work (search indexing) is kept referenced until it finishes.
_BACKGROUND: set[asyncio.Task[Any]] = set()


def _in_background(coro: Any) -> None:
    task = asyncio.ensure_future(coro)
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)


class ConversationError(Exception):
    code = "conversation_error"
    status_code = 400


class ConversationNotFound(ConversationError):
    code = "not_found"
    status_code = 404


class ConversationBusy(ConversationError):
    code = "conversation_running"
    status_code = 409


class ConversationRefused(ConversationError):
    """Refused before it starts: a budget too small for one round (422), a used-up quota (429)."""

    def __init__(self, refusal: admission.AdmissionRefused) -> None:
        super().__init__(str(refusal))
        self.code = refusal.code
        self.status_code = refusal.status_code
        self.extra = refusal.extra


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
    """`_start` of a new conversation without a budget, on PostgreSQL in one statement on the
    event loop's pool (no thread hop, no ORM); None, with nothing written, when its key has a
    daily quota to reserve (`_start` does that). `running`: stored already running."""
    conversation = _new_conversation(principal, asked.message, None)
    _open_exchange(conversation, asked, admission.NOTHING_ADMITTED)
    conversation.updated_at = conversation.created_at
    if running:
        _mark_running(conversation, conversation.created_at)
    if not await store.start_conversation(conversation, _question(conversation, asked.message)):
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
    command). A new conversation without a budget is then stored already running, on
    PostgreSQL, and `conversation_run(..., fresh=...)` begins from it without a statement.
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
    if store.pipelined() and conversation_id is None and budget is None:
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


async def _announce_unsent(
    log: EventLog,
    conversation_id: uuid.UUID,
    exchange: int,
    prior: dict[int, dict[str, AgentResult]],
    personality: dict[str, str],
) -> None:
    """Emit the agent events of stored answers whose event a dead run never wrote.

    A run killed between an answer's row and its event (the embedded path writes them apart)
    leaves the answer stored but unsent; the resumed run reuses the answer, so without this the
    log would lack it. Emitted straight to the log: the row exists already.
    """
    sent = {
        (data.get("turn"), data.get("agent_id"))
        async for data in Event.objects.filter(
            conversation_id=conversation_id, type__in=["agent_response", "agent_error"]
        ).values_list("data", flat=True)
        if isinstance(data, dict) and data.get("exchange") == exchange
    }
    for turn, results in sorted(prior.items()):
        for agent_id, result in sorted(results.items()):
            if (turn, agent_id) in sent:
                continue
            if result.ok:
                payload = response_payload(result, personality.get(agent_id, ""))
                await log.emit("agent_response", exchange=exchange, recovered=True, **payload)
            else:
                await log.emit(
                    "agent_error",
                    exchange=exchange,
                    recovered=True,
                    agent_id=agent_id,
                    turn=turn,
                    error=result.error,
                    kind=result.error_kind,
                    model=result.model,
                    provider=result.provider,
                )


class RunRecorder:
    """Stores what each orchestrator event means, then appends it to the event log."""

    def __init__(self, conversation: Conversation, exchange: int, log: EventLog) -> None:
        self.conversation = conversation
        self.exchange = exchange
        self.log = log
        self.personality: dict[str, str] = {}  # agent_id -> personality, filled at start

    async def __call__(self, type: str, **data: Any) -> dict[str, Any]:
        handler = getattr(self, f"_on_{type}", None)
        if handler is not None:
            await handler(data)
        return await self.log.emit(type, exchange=self.exchange, **data)

    async def _on_agent_response(self, data: dict[str, Any]) -> None:
        tokens = data.get("tokens") or {}
        await self._store_message(
            agent_id=data["agent_id"],
            turn=data["turn"],
            content=data["content"],
            raw_content=data.get("raw_content") or "",
            position=data.get("position") or "",
            position_source=data.get("position_source") or "",
            repair_calls=data.get("repair_calls") or 0,
            confidence=data.get("confidence"),
            status=Message.Status.ABSTAINED if data.get("abstained") else Message.Status.OK,
            provider=data.get("provider", ""),
            model=data.get("model", ""),
            temperature=data.get("temperature"),
            personality=data.get("personality", ""),
            simulated=bool(data.get("simulated")),
            latency_ms=data.get("latency_ms"),
            prompt_tokens=tokens.get("prompt", 0),
            completion_tokens=tokens.get("completion", 0),
            repair_prompt_tokens=(data.get("repair_tokens") or {}).get("prompt", 0),
            repair_completion_tokens=(data.get("repair_tokens") or {}).get("completion", 0),
            cost_usd=data.get("cost_usd") or 0.0,
            cost_estimated=bool(data.get("cost_estimated")),
        )
        if self.conversation.metadata.get("notify_turns"):
            _in_background(
                agent_turn.asend_robust(
                    sender=Conversation, conversation=self.conversation, exchange=self.exchange, data=data
                )
            )

    async def _on_agent_error(self, data: dict[str, Any]) -> None:
        await arecord_error(
            "agent_call",
            f"{data.get('kind', 'unknown')}: {data.get('error', '')}",
            agent_id=data["agent_id"],
            model=data.get("model", ""),
            provider=data.get("provider", ""),
            conversation_id=str(self.conversation.pk),
        )
        await self._store_message(
            agent_id=data["agent_id"],
            turn=data["turn"],
            status=Message.Status.FAILED,
            error=f"{data.get('kind', 'unknown')}: {data.get('error', '')}"[:2000],
            provider=data.get("provider", ""),
            model=data.get("model", ""),
            personality=self.personality.get(data["agent_id"], ""),
        )

    async def _store_message(self, **fields: Any) -> None:
        if self.log.pipelined:
            # Written with the event that announces it, in one transaction (ON CONFLICT DO NOTHING).
            self.log.stage_message({"exchange": self.exchange, "role": Message.Role.AGENT, **fields})
            return
        try:
            await Message.objects.acreate(
                conversation_id=self.conversation.pk,
                exchange=self.exchange,
                role=Message.Role.AGENT,
                **fields,
            )
        except IntegrityError:
            # Already stored by an earlier attempt of this run: the unique constraint keeps one.
            logger.info("message already stored", extra={"conversation": str(self.conversation.pk), **fields})

    async def _on_turn_completed(self, data: dict[str, Any]) -> None:
        if self.log.pipelined:
            self.log.stage_conversation(turns_completed=data["turn"], heartbeat_at=timezone.now())
            return
        await Conversation.objects.filter(pk=self.conversation.pk).aupdate(
            turns_completed=data["turn"], heartbeat_at=timezone.now()
        )

    async def _on_vote(self, data: dict[str, Any]) -> None:
        if self.log.pipelined:
            self.log.stage_vote(
                {
                    "exchange": self.exchange,
                    "voter": data["voter"],
                    "choice": data.get("choice") or "",
                    "confidence": data.get("confidence"),
                    "reason": (data.get("reason") or "")[:2000],
                }
            )
            return
        await Vote.objects.aupdate_or_create(
            conversation_id=self.conversation.pk,
            exchange=self.exchange,
            voter=data["voter"],
            defaults={
                "choice": data.get("choice") or "",
                "confidence": data.get("confidence"),
                "reason": (data.get("reason") or "")[:2000],
            },
        )


# What a run reads of its exchange's stored messages (by attname), in `turn`, `id` order.
BEGIN_MESSAGE_FIELDS = (
    "id", "role", "turn", "agent_id", "status", "content", "raw_content", "position", "confidence",
    "position_source", "repair_calls", "repair_prompt_tokens", "repair_completion_tokens", "model",
    "provider", "temperature", "latency_ms", "prompt_tokens", "completion_tokens", "simulated", "error",
)  # fmt: skip


def _prior(messages: list[dict[str, Any]]) -> tuple[str, dict[int, dict[str, AgentResult]]]:
    """The exchange's question and the answers its earlier attempts stored, by turn and agent."""
    question = ""
    prior: dict[int, dict[str, AgentResult]] = {}
    for m in messages:
        if m["role"] == Message.Role.USER:
            question = m["content"]
            continue
        ok = m["status"] != Message.Status.FAILED
        proposal = None
        if m["status"] == Message.Status.OK and m["raw_content"] and m["position"]:
            # Stored with its parsed position (a structured or repaired reply may not parse as text).
            proposal = Proposal(m["agent_id"], m["content"], m["position"], m["confidence"])
        elif ok and not m["raw_content"]:
            proposal = parse_reply(m["agent_id"], m["content"])  # a row from before raw_content
        prior.setdefault(m["turn"], {})[m["agent_id"]] = AgentResult(
            agent_id=m["agent_id"],
            turn=m["turn"],
            ok=ok,
            text=m["raw_content"] or m["content"],
            proposal=proposal,
            answer=m["content"] if m["raw_content"] else "",
            position_source=m["position_source"],
            repair_calls=m["repair_calls"],
            repair_usage=Usage(m["repair_prompt_tokens"], m["repair_completion_tokens"]),
            model=m["model"],
            provider=m["provider"],
            temperature=m["temperature"] or 0.0,
            latency_ms=m["latency_ms"] or 0.0,
            usage=Usage(m["prompt_tokens"], m["completion_tokens"]),
            simulated=m["simulated"],
            error=m["error"],
            error_kind=m["error"].split(":", 1)[0] if m["error"] else "",
        )
    return question, prior


def _history(questions: dict[int, str], answers: dict[int, str]) -> list[tuple[str, str]]:
    """Earlier exchanges as (question, answer), oldest first (no answer: an empty one)."""
    return [(questions[n], answers.get(n, "")) for n in sorted(questions)]


def _load_prior(
    conversation: Conversation, exchange: int
) -> tuple[str, dict[int, dict[str, AgentResult]], list[tuple[str, str]]]:
    messages = Message.objects.filter(conversation=conversation, exchange=exchange).order_by("turn", "id")
    question, prior = _prior(list(messages.values(*BEGIN_MESSAGE_FIELDS)))
    if exchange == 1:
        return question, prior, []  # a first exchange has no history: two queries saved
    questions = dict(
        Message.objects.filter(
            conversation=conversation, role=Message.Role.USER, exchange__lt=exchange
        ).values_list("exchange", "content")
    )
    answers = dict(
        ConsensusResult.objects.filter(conversation=conversation, exchange__lt=exchange).values_list(
            "exchange", "answer"
        )
    )
    return question, prior, _history(questions, answers)


@dataclass
class _Begun:
    conversation: Conversation
    question: str = ""
    prior: dict[int, dict[str, AgentResult]] = field(default_factory=dict)
    history: list[tuple[str, str]] = field(default_factory=list)
    last_seq: int = 0


def _mark_running(conversation: Conversation, now: datetime) -> None:
    """The fields a run's begin sets (not saved)."""
    conversation.status = Conversation.Status.RUNNING
    conversation.started_at = conversation.started_at or now
    conversation.heartbeat_at = now


def _begin(conversation_id: uuid.UUID, exchange: int) -> _Begun:
    """What a run starts from, read and marked running in one trip off the event loop (one
    pooled connection instead of four thread hops): the conversation, the stored turns of the
    exchange, the earlier exchanges, the last stored event."""
    conversation = Conversation.objects.get(pk=conversation_id)
    if exchange != conversation.exchanges:
        raise ConversationError(f"exchange {exchange} is not the current one ({conversation.exchanges})")
    if conversation.is_terminal:
        return _Begun(conversation)
    question, prior, history = _load_prior(conversation, exchange)
    last_seq = EventLog.last_stored_seq(conversation.pk)
    now = timezone.now()
    # Set here as in the row: the run keeps this instance and stores its final fields from it.
    _mark_running(conversation, now)
    Conversation.objects.filter(pk=conversation.pk).update(
        status=conversation.status, started_at=conversation.started_at, heartbeat_at=now
    )
    return _Begun(conversation, question, prior, history, last_seq)


async def _abegin(conversation_id: uuid.UUID, exchange: int) -> _Begun:
    """`_begin`, on PostgreSQL in one statement on the event loop's pool (no thread hop, no
    ORM); a missing or finished conversation, or a stale exchange, takes the ORM path, which
    tells those apart."""
    if store.pipelined():
        read = await store.begin_run(conversation_id, exchange, timezone.now(), BEGIN_MESSAGE_FIELDS)
        if read is not None:
            conversation, messages, questions, answers, last_seq = read
            question, prior = _prior(messages)
            asked = {q["exchange"]: q["content"] for q in questions}
            history = _history(asked, {a["exchange"]: a["answer"] for a in answers})
            return _Begun(conversation, question, prior, history, last_seq)
    return await in_pool_thread(_begin, conversation_id, exchange)


async def rehearse_run() -> None:
    """A run's statements on the event store, once, for a throwaway conversation: its start,
    a batch with a message, a ballot, a result and an event, and the /chat body's read. For
    `store.on_every_connection`, which rolls all of it back (the warm-up of a process)."""
    conversation_id, now = uuid.uuid4(), timezone.now()
    one = {"conversation_id": conversation_id, "exchange": 1}
    conversation = Conversation(id=conversation_id, exchanges=1, created_at=now, updated_at=now)
    await store.start_conversation(conversation, {**one, "role": Message.Role.USER, "content": "warm-up"})
    await store.begin_run(conversation_id, 1, now, BEGIN_MESSAGE_FIELDS)
    rows = store.Rows(
        messages=[{**one, "role": Message.Role.AGENT, "agent_id": "a", "turn": 1}],
        votes=[{**one, "voter": "a", "choice": "A"}],
        result={**one, "method": "majority"},
        conversation={"turns_completed": 1},
    )
    event = {"type": "warm_up", "conversation_id": str(conversation_id), "seq": 1}
    await store.write_batch(conversation_id, [event], rows, now)
    await store.exchange_rows(conversation_id, 1, CHAT_MESSAGE_FIELDS, CHAT_RESULT_FIELDS, CHAT_VOTE_FIELDS)


def _watched_by(log: EventLog) -> Callable[[], Awaitable[bool]]:
    """Asked before each round of a /chat run: whether a WebSocket follows the conversation.
    The log learns it too: while no one watches, agents' responses need not wait for their batch."""

    async def watched() -> bool:
        log.watched = await has_watchers(log.conversation_id)
        return log.watched

    return watched


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
    config = settings.CONFIG
    question, prior, history = begun.question, begun.prior, begun.history
    panel = panel_profiles(conversation.metadata.get("agents")) or build_panel(conversation.num_agents)
    log = EventLog(conversation.pk, begun.last_seq, buffered=True)
    recorder = RunRecorder(conversation, exchange, log)
    recorder.personality = {p.agent_id: p.personality for p in panel}
    started = time.monotonic()
    resumed = bool(prior)
    await recorder(
        "conversation_started",
        question=question,
        num_agents=len(panel),
        turns=conversation.turns_requested,
        agents=[p.describe() for p in panel],
        resumed=resumed,
    )
    if resumed:
        await _announce_unsent(log, conversation.pk, exchange, prior, recorder.personality)
    orchestrator = Orchestrator(
        panel=panel,
        question=question,
        turns=conversation.turns_requested,
        emit=recorder,
        history=history,
        strategy=conversation.metadata.get("strategy", "majority"),
        deadline_seconds=config.CONVERSATION_DEADLINE,
        max_output_tokens=config.MAX_OUTPUT_TOKENS,
        prior=prior,
        synthesis=conversation.metadata.get("synthesis") or default_mode(),
        budget=admission.run_budget(conversation.metadata),
        vote_weights=await apanel_weights(panel),
        watched=_watched_by(log) if stream_when_watched else None,
    )
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


async def _finish_cancelled(
    conversation_id: uuid.UUID, exchange: int, recorder: RunRecorder, duration: float
) -> Conversation:
    reservation = await admission.asettle_stored(recorder.conversation, exchange)
    if reservation:
        metadata = {**recorder.conversation.metadata, "quota": reservation}
        await Conversation.objects.filter(pk=conversation_id).aupdate(metadata=metadata)
    await Conversation.objects.filter(pk=conversation_id).aupdate(
        status=Conversation.Status.CANCELLED,
        error="cancelled by request",
        completed_at=timezone.now(),
        duration=round(duration, 3),
    )
    CONVERSATIONS.labels("cancelled").inc()
    await recorder(
        "conversation_failed", status="cancelled", reason="cancelled by request", duration=round(duration, 3)
    )
    conversation = await Conversation.objects.aget(pk=conversation_id)
    _in_background(
        run_finished.asend_robust(sender=Conversation, conversation=conversation, exchange=exchange)
    )
    return conversation


def _store_result(conversation_id: uuid.UUID, exchange: int, result: dict[str, Any]) -> None:
    """The exchange's consensus result, one upsert (a resumed run that decides again replaces it)."""
    ConsensusResult.objects.bulk_create(
        [ConsensusResult(conversation_id=conversation_id, exchange=exchange, **result)],
        update_conflicts=True,
        unique_fields=["conversation", "exchange"],
        update_fields=list(result),
    )


# What a finished run sets on its conversation (the event log keeps `last_seq` current meanwhile).
FINAL_FIELDS = (
    "status", "turns_completed", "consensus_result", "confidence", "error", "duration",
    "completed_at", "prompt_tokens", "completion_tokens", "metadata", "updated_at", "cost_usd",
)  # fmt: skip


def _settle_and_save(conversation: Conversation, tokens: int, usd: float) -> None:
    """Charge the exchange's spend to the key's quota, then store the finished conversation."""
    admission.settle(conversation, tokens=tokens, usd=usd)  # settles metadata["quota"] in place
    conversation.save(update_fields=list(FINAL_FIELDS))


async def _finish(
    conversation_id: uuid.UUID, exchange: int, recorder: RunRecorder, outcome: RunOutcome, duration: float
) -> Conversation:
    duration = round(duration, 3)
    tokens = usage_dict(outcome.usage)
    assessment = await aassess(outcome)
    decision = outcome.decision
    details = decision.to_dict() if decision is not None else {}
    result: dict[str, Any] | None = None
    if decision is not None and assessment is not None:
        result = {
            "method": decision.method,
            "reached": decision.reached,
            "winner": decision.winner or "",
            "answer": outcome.answer if decision.reached else "",
            "confidence": assessment.confidence,
            "tie_break": decision.tie_break or "",
            "tallies": decision.tallies,
            "dissent": details.get("dissent", []),
            "details": {
                **details,
                "position": decision.winner_position,
                "options": outcome.options,
                "leading_answer": outcome.answer,
                "synthesis": outcome.synthesis,
                "confidence": assessment.confidence,
                "agreement": assessment.agreement,
                "margin": assessment.margin,
                "calibration": assessment.details,
            },
        }
    if result is not None:
        if recorder.log.pipelined:
            # Written with the consensus_reached event below, in that batch's one statement.
            recorder.log.stage_result({"exchange": exchange, **result})
        else:
            await in_pool_thread(_store_result, conversation_id, exchange, result)
    # The instance the run began with (_begin): only this run writes its final fields.
    conversation = recorder.conversation
    if decision is not None and assessment is not None:
        await recorder(
            "consensus_reached",
            consensus=outcome.answer if decision.reached else None,
            position=decision.winner_position,
            reached=decision.reached,
            confidence=round(assessment.confidence, 4),
            agreement=round(assessment.agreement, 4),
            share=round(assessment.share, 4),
            margin=round(assessment.margin, 4),
            method=decision.method,
            winner=decision.winner,
            tallies=decision.tallies,
            tie_break=decision.tie_break,
            dissent=details.get("dissent", []),
            synthesis=outcome.synthesis.get("mode"),
        )
    status = outcome.status
    conversation.status = status
    conversation.turns_completed = outcome.turns_completed
    conversation.consensus_result = outcome.answer if status == "completed" else ""
    conversation.confidence = assessment.confidence if assessment is not None else None
    conversation.error = outcome.reason
    conversation.duration = duration
    conversation.completed_at = timezone.now()
    conversation.prompt_tokens += outcome.usage.prompt_tokens
    conversation.completion_tokens += outcome.usage.completion_tokens
    conversation.cost_usd += outcome.cost.usd
    usd = outcome.cost.usd
    reservation = conversation.metadata.get("quota")
    conversation.metadata = {
        **conversation.metadata,
        "early_stop": outcome.early_stop,
        "vote_round": outcome.vote_round,
        "tokens": tokens,
        "synthesis_used": outcome.synthesis,
        "extra_calls": extra_calls(outcome.results, outcome.synthesis),
        "extra_tokens": {
            "repair": usage_dict(outcome.repair_usage),
            "synthesis": usage_dict(outcome.synthesis_usage),
        },
        "no_consensus_reason": outcome.cause or None,
        **({"retry_after": outcome.retry_after} if outcome.retry_after else {}),
        "cost": outcome.cost.fields(),
        "stopped": outcome.stopped,
        "stop_estimate": outcome.stop_estimate,
        "quota": reservation,
    }
    if recorder.log.pipelined and not admission.holds_reservation(conversation):
        # No quota to charge in the database: the finished conversation is written with its
        # terminal event, in that batch's one statement (no thread hop, no separate save).
        admission.settle(conversation, tokens=outcome.usage.total_tokens, usd=usd)  # counters only
        conversation.updated_at = timezone.now()
        recorder.log.stage_conversation(**{name: getattr(conversation, name) for name in FINAL_FIELDS})
    else:
        await in_pool_thread(_settle_and_save, conversation, outcome.usage.total_tokens, usd)
    CONVERSATIONS.labels(status).inc()
    if status == "failed":
        await arecord_error("chat_conversation", outcome.reason, conversation_id=str(conversation_id))
        await recorder(
            "conversation_failed",
            status=status,
            reason=outcome.reason,
            retry_after=outcome.retry_after,
            duration=duration,
            turns_completed=outcome.turns_completed,
            tokens=tokens,
            **outcome.cost.fields(),
        )
    else:
        await recorder(
            "conversation_completed",
            status=status,
            duration=duration,
            turns_completed=outcome.turns_completed,
            early_stop=outcome.early_stop,
            tokens=tokens,
            confidence=conversation.confidence,
            reason=outcome.reason or None,
            no_consensus_reason=outcome.cause or None,
            **outcome.cost.fields(),
            stopped=outcome.stopped,
        )
        # After the terminal event: its batch stored the conversation's final state.
        _in_background(
            conversation_completed.asend_robust(
                sender=Conversation, conversation_id=conversation_id, status=status
            )
        )
    agreement = assessment.agreement if assessment is not None else None
    _in_background(
        run_finished.asend_robust(
            sender=Conversation, conversation=conversation, exchange=exchange, agreement=agreement
        )
    )
    conversation.last_seq = recorder.log.last_seq
    return conversation
