"""The event store on PostgreSQL: one written-out statement per operation, run on the event
loop's own connection pool (`loopstate.postgres`: no thread hop, no ORM).

A batch is one statement (`BATCH`): an UPDATE of the conversations with one data-modifying
CTE per kind of row, each `INSERT ... SELECT ... FROM json_populate_recordset(the table's row
type, the rows as one JSON array)`. Autocommit makes the statement its own transaction, so a
batch is stored whole or not at all in a single round trip whatever its size. The batches of
several conversations ready at the same time share one such statement (`conversations.rounds`).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import orjson
import psycopg

from conversations.models import ConsensusResult, Conversation, Message, Vote
from conversations.rounds import Rounds
from conversations.store.base import EventStore, ExchangeRows, Rows, RunStart, latest_votes
from loopstate import PerLoop
from loopstate import postgres as pg

# Every batch, of one conversation or of several: its messages (a stored one is kept: one
# answer per agent and turn), ballots and results (replaced), events, and for each conversation
# the fields it sets (`f`, a JSON object; a field it leaves out keeps its stored value).
BATCH = """
WITH m AS (
    INSERT INTO conversations_message (conversation_id, exchange, role, agent_id, turn, content,
        raw_content, position, position_source,
        repair_calls, confidence, status, error, provider, model, temperature, personality,
        simulated, latency_ms, prompt_tokens, completion_tokens, repair_prompt_tokens,
        repair_completion_tokens, cost_usd, cost_estimated, created_at)
    SELECT conversation_id, exchange, role, agent_id, turn, content, raw_content, position, position_source,
        repair_calls, confidence, status, error, provider, model, temperature, personality,
        simulated, latency_ms, prompt_tokens, completion_tokens, repair_prompt_tokens,
        repair_completion_tokens, cost_usd, cost_estimated, created_at
    FROM json_populate_recordset(NULL::conversations_message, %(messages)s::json)
    ON CONFLICT DO NOTHING
), v AS (
    INSERT INTO conversations_vote (conversation_id, exchange, voter, choice, confidence, reason,
        created_at)
    SELECT conversation_id, exchange, voter, choice, confidence, reason, created_at
    FROM json_populate_recordset(NULL::conversations_vote, %(votes)s::json)
    ON CONFLICT (conversation_id, exchange, voter) DO UPDATE
    SET choice = EXCLUDED.choice, confidence = EXCLUDED.confidence, reason = EXCLUDED.reason
), r AS (
    INSERT INTO conversations_consensusresult (conversation_id, exchange, method, reached, winner,
        answer, confidence, tie_break, tallies, dissent,
        details, created_at)
    SELECT conversation_id, exchange, method, reached, winner, answer, confidence, tie_break, tallies,
        dissent,
        details, created_at
    FROM json_populate_recordset(NULL::conversations_consensusresult, %(results)s::json)
    ON CONFLICT (conversation_id, exchange) DO UPDATE
    SET method = EXCLUDED.method, reached = EXCLUDED.reached, winner = EXCLUDED.winner,
        answer = EXCLUDED.answer, confidence = EXCLUDED.confidence, tie_break = EXCLUDED.tie_break,
        tallies = EXCLUDED.tallies, dissent = EXCLUDED.dissent, details = EXCLUDED.details
), e AS (
    INSERT INTO conversations_event (conversation_id, seq, type, data, created_at)
    SELECT conversation_id, seq, type, data, created_at
    FROM json_populate_recordset(NULL::conversations_event, %(events)s::json)
)
UPDATE conversations_conversation AS t
SET (status, turns_completed, consensus_result, confidence, error, metadata, prompt_tokens,
     completion_tokens, cost_usd, duration, last_seq, updated_at, completed_at, heartbeat_at)
  = (SELECT p.status, p.turns_completed, p.consensus_result, p.confidence, p.error, p.metadata,
            p.prompt_tokens, p.completion_tokens, p.cost_usd, p.duration, p.last_seq, p.updated_at,
            p.completed_at, p.heartbeat_at
     FROM jsonb_populate_record(t, u.f) AS p)
FROM json_to_recordset(%(conversations)s::json) AS u(id uuid, f jsonb)
WHERE t.id = u.id
"""

# A new conversation and its question, unless its key has a daily quota to reserve.
START = """
WITH c AS (
    INSERT INTO conversations_conversation (id, title, status, api_key_id, owner, exchanges, num_agents,
        turns_requested, turns_completed,
        consensus_result, confidence, error, metadata, prompt_tokens, completion_tokens, cost_usd,
        duration, cancel_requested, last_seq, created_at, updated_at, started_at, completed_at,
        heartbeat_at)
    SELECT id, title, status, api_key_id, owner, exchanges, num_agents, turns_requested, turns_completed,
        consensus_result, confidence, error, metadata, prompt_tokens, completion_tokens, cost_usd,
        duration, cancel_requested, last_seq, created_at, updated_at, started_at, completed_at,
        heartbeat_at
    FROM json_populate_record(NULL::conversations_conversation, %(conversation)s::json)
    WHERE NOT EXISTS (SELECT 1 FROM gateway_apikey WHERE id = %(key)s AND daily_quota IS NOT NULL)
    RETURNING 1
), m AS (
    INSERT INTO conversations_message (conversation_id, exchange, role, agent_id, turn, content,
        raw_content, position, position_source,
        repair_calls, confidence, status, error, provider, model, temperature, personality,
        simulated, latency_ms, prompt_tokens, completion_tokens, repair_prompt_tokens,
        repair_completion_tokens, cost_usd, cost_estimated, created_at)
    SELECT conversation_id, exchange, role, agent_id, turn, content, raw_content, position, position_source,
        repair_calls, confidence, status, error, provider, model, temperature, personality,
        simulated, latency_ms, prompt_tokens, completion_tokens, repair_prompt_tokens,
        repair_completion_tokens, cost_usd, cost_estimated, created_at
    FROM json_populate_recordset(NULL::conversations_message, %(question)s::json)
    WHERE EXISTS (SELECT 1 FROM c)
)
SELECT EXISTS (SELECT 1 FROM c)
"""

# A run of the current exchange marked running, with what it starts from.
BEGIN = """
WITH c AS (
    UPDATE conversations_conversation
    SET status = 'running', started_at = COALESCE(started_at, %(now)s), heartbeat_at = %(now)s
    WHERE id = %(c)s AND exchanges = %(x)s AND NOT (status = ANY(%(terminal)s))
    RETURNING id, title, status, api_key_id, owner, exchanges, num_agents, turns_requested, turns_completed,
        consensus_result, confidence, error, metadata, prompt_tokens, completion_tokens, cost_usd,
        duration, cancel_requested, last_seq, created_at, updated_at, started_at, completed_at,
        heartbeat_at
)
SELECT c.*,
    (SELECT json_agg(m ORDER BY m.turn, m.id) FROM (
        SELECT id, role, turn, agent_id, status, content, raw_content, position, confidence,
               position_source, repair_calls, repair_prompt_tokens, repair_completion_tokens, model,
               provider, temperature, latency_ms, prompt_tokens, completion_tokens, simulated, error
        FROM conversations_message WHERE conversation_id = %(c)s AND exchange = %(x)s) m),
    (SELECT json_agg(q ORDER BY q.exchange) FROM (
        SELECT exchange, content FROM conversations_message
        WHERE conversation_id = %(c)s AND exchange < %(x)s AND role = 'user') q),
    (SELECT json_agg(a ORDER BY a.exchange) FROM (
        SELECT exchange, answer FROM conversations_consensusresult
        WHERE conversation_id = %(c)s AND exchange < %(x)s) a),
    (SELECT COALESCE(MAX(seq), 0) FROM conversations_event WHERE conversation_id = %(c)s)
FROM c
"""

# An exchange's rows for the /chat body, as JSON.
EXCHANGE_ROWS = """
SELECT
    (SELECT json_agg(m ORDER BY m.turn, m.agent_id) FROM (
        SELECT agent_id, turn, status, content, raw_content, model, temperature, provider,
               personality, position, confidence, position_source, repair_calls, latency_ms,
               prompt_tokens, completion_tokens, simulated, cost_usd, cost_estimated, error
        FROM conversations_message
        WHERE conversation_id = %(c)s AND exchange = %(x)s AND role = 'agent') m),
    (SELECT row_to_json(r) FROM (
        SELECT reached, method, winner, confidence, tallies, tie_break, dissent, details
        FROM conversations_consensusresult WHERE conversation_id = %(c)s AND exchange = %(x)s) r),
    (SELECT json_agg(v ORDER BY v.voter) FROM (
        SELECT voter, choice, confidence, reason
        FROM conversations_vote WHERE conversation_id = %(c)s AND exchange = %(x)s) v)
"""

_CONVERSATION_ATTNAMES = (
    "id",
    "title",
    "status",
    "api_key_id",
    "owner",
    "exchanges",
    "num_agents",
    "turns_requested",
    "turns_completed",
    "consensus_result",
    "confidence",
    "error",
    "metadata",
    "prompt_tokens",
    "completion_tokens",
    "cost_usd",
    "duration",
    "cancel_requested",
    "last_seq",
    "created_at",
    "updated_at",
    "started_at",
    "completed_at",
    "heartbeat_at",
)


def _defaults(model: type[Any]) -> dict[str, Any]:
    """A row's column values where the caller gives none: the model's defaults."""
    fields = model._meta.concrete_fields
    return {f.attname: f.get_default() for f in fields if not f.primary_key and f.attname != "created_at"}


_MESSAGE_DEFAULTS, _VOTE_DEFAULTS, _RESULT_DEFAULTS = (_defaults(m) for m in (Message, Vote, ConsensusResult))


def _json_default(value: Any) -> Any:
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _json(value: Any) -> str:
    return orjson.dumps(value, default=_json_default, option=orjson.OPT_NON_STR_KEYS).decode()


def _event_json(its_id: str, event: dict[str, Any], text: str, created: str) -> str:
    """One Event row as a JSON object: its columns, then the event's own serialised text as data
    (written out rather than encoded again: only the type is a string from outside)."""
    return (
        f'{{"conversation_id":"{its_id}","seq":{int(event["seq"])},'
        f'"type":{orjson.dumps(event["type"]).decode()},"created_at":"{created}","data":{text}}}'
    )


# A batch to write: its conversation, events, rows, time and the events' texts.
Write = tuple[uuid.UUID, list[dict[str, Any]], Rows, datetime, list[str] | None]


def batch_params(writes: list[Write]) -> dict[str, str]:
    """BATCH's parameters for these batches (each of its own conversation)."""
    events: list[str] = []
    messages: list[dict[str, Any]] = []
    votes: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    conversations: list[dict[str, Any]] = []
    for conversation_id, batch, rows, now, texts in writes:
        created, its_id = now.isoformat(), str(conversation_id)
        if texts is None:
            texts = [orjson.dumps(e, option=orjson.OPT_NON_STR_KEYS).decode() for e in batch]
        events += (_event_json(its_id, e, text, created) for e, text in zip(batch, texts, strict=True))
        messages += ({**_MESSAGE_DEFAULTS, "created_at": now, **m} for m in rows.messages)
        votes += ({**_VOTE_DEFAULTS, "created_at": now, **v} for v in latest_votes(rows.votes))
        if rows.result:
            results.append({**_RESULT_DEFAULTS, "created_at": now, **rows.result})
        fields = {**rows.conversation, "last_seq": batch[-1]["seq"]} if batch else rows.conversation
        if fields:
            conversations.append({"id": its_id, "f": fields})
    return {
        "messages": _json(messages),
        "votes": _json(votes),
        "results": _json(results),
        "events": f"[{','.join(events)}]",
        "conversations": _json(conversations),
    }


async def _write_round(writes: list[Write]) -> list[BaseException | None]:
    """The batches of several conversations ready at once: one statement for all of them.

    If that statement is refused (a stale run's duplicate seq, a conversation deleted meanwhile)
    nothing of it is stored, and each batch is written again on its own, so only the faulty one
    fails. A lost connection fails every batch of the round; each log retries its own. Two
    batches of one conversation (a stale run beside its resumed one) never share a statement.
    """
    if len(writes) > 1 and len({write[0] for write in writes}) == len(writes):
        try:
            await pg.execute(BATCH, batch_params(writes))
            return [None] * len(writes)
        except pg.LOST as exc:
            return [exc] * len(writes)
        except psycopg.Error:  # refused as a whole: written again below, one by one
            pass
    outcomes: list[BaseException | None] = []
    for write in writes:
        try:
            await pg.execute(BATCH, batch_params([write]))
            outcomes.append(None)
        except Exception as exc:
            outcomes.append(exc)
    return outcomes


class PostgresEventStore(EventStore):
    """Each call is one statement on the running event loop's pool."""

    lost = pg.LOST
    duplicate = psycopg.IntegrityError

    def __init__(self) -> None:
        self._rounds: PerLoop[Rounds[Write, None]] = PerLoop(lambda: Rounds(_write_round))

    async def start_conversation(self, conversation: Conversation, question: dict[str, Any]) -> bool:
        record = {name: getattr(conversation, name) for name in _CONVERSATION_ATTNAMES}
        record["updated_at"] = record["updated_at"] or conversation.created_at  # auto_now, as a save
        params = {
            "conversation": _json(record),
            "question": _json([{**_MESSAGE_DEFAULTS, "created_at": conversation.created_at, **question}]),
            "key": conversation.api_key_id,
        }
        row = await pg.fetch_one(START, params)
        return bool(row and row[0])

    async def begin_run(self, conversation_id: uuid.UUID, exchange: int, now: datetime) -> RunStart | None:
        terminal = [str(s) for s in Conversation.TERMINAL]
        row = await pg.fetch_one(
            BEGIN, {"c": conversation_id, "x": exchange, "now": now, "terminal": terminal}
        )
        if row is None:
            return None
        n = len(_CONVERSATION_ATTNAMES)
        conversation = Conversation.from_db("default", _CONVERSATION_ATTNAMES, row[:n])
        messages, questions, answers, last_seq = row[n:]
        return RunStart(conversation, messages or [], questions or [], answers or [], int(last_seq))

    async def write_batch(
        self,
        conversation_id: uuid.UUID,
        batch: list[dict[str, Any]],
        rows: Rows,
        now: datetime,
        texts: list[str] | None = None,
    ) -> None:
        write = (conversation_id, batch, rows, now, texts)
        if pg.pinned():  # a rehearsal on one connection: a round would run on another
            await pg.execute(BATCH, batch_params([write]))
        else:
            await self._rounds.get().submit(write)

    async def exchange_rows(self, conversation_id: uuid.UUID, exchange: int) -> ExchangeRows:
        row = await pg.fetch_one(EXCHANGE_ROWS, {"c": conversation_id, "x": exchange})
        messages, result, votes = row or (None, None, None)
        return messages or [], result, votes or []

    async def reset(self) -> None:
        await pg.discard_pool()

    async def warm_up(self, rehearsal: Any) -> None:
        await pg.pool()  # this loop's connections, all opened now
        await pg.on_every_connection(rehearsal)  # ... each has run a run's statements once

    async def close(self) -> None:
        await pg.close_pool()
