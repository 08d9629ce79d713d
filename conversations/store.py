"""One round trip per batch on PostgreSQL: a batch's events, the rows they stand beside and
the conversation's counters, in one SQL statement.

The statement is an UPDATE of the conversation with one data-modifying CTE per kind of row
(`INSERT ... SELECT ... FROM json_to_recordset(the rows as one JSON array)`), run in
autocommit: one statement is one transaction, so a batch is stored whole or not at all, in a
single round trip, whatever its size (no BEGIN/COMMIT, no pipeline synchronisation, no
per-row statements).

The event log (`conversations.events`) calls `write_batch` before it appends anything to the
Redis Stream or publishes it, so durability is the ORM path's: a client never sees an event
that is not stored. Each event loop has one small psycopg `AsyncConnectionPool` (a pool is
bound to the loop that opened it). Connections are not checked before each use (that was one
more round trip per batch): a connection that died with a restarted database fails its
statement, and the event log's retry opens a fresh pool. SQLite keeps the ORM path.

Column lists and types come from the Django models, so the SQL follows the schema and its
migrations.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
from django.db import connections

from agents.providers.loops import PerLoop
from conversations.models import ConsensusResult, Conversation, Event, Message, Vote
from conversations.rounds import Rounds

POOL_MAX = 4  # per event loop: batches of many conversations share a few connections

# Short, so a write retried while the database is away tries a fresh pool several times.
GETCONN_TIMEOUT = 3.0
_pools: dict[asyncio.AbstractEventLoop, tuple[str, Any, asyncio.Task[None]]] = {}


@dataclass
class Rows:
    """What a batch writes beside its events: agent messages, ballots, an exchange's consensus
    result, conversation fields."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    votes: list[dict[str, Any]] = field(default_factory=list)
    result: dict[str, Any] | None = None
    conversation: dict[str, Any] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.messages or self.votes or self.result or self.conversation)


def pipelined() -> bool:
    """Whether the event log and the request checks use this module's statements on the event
    loop's pool: on PostgreSQL, unless EVENT_STORE_PIPELINED is off (SQLite keeps the ORM)."""
    from django.conf import settings

    return bool(settings.USING_POSTGRES and settings.CONFIG.EVENT_STORE_PIPELINED)


def _column(model: type[Any], name: str) -> str:
    return str(model._meta.get_field(name).column)


def _columns(model: type[Any]) -> list[Any]:
    return [f for f in model._meta.concrete_fields if not f.primary_key]


_MESSAGE_FIELDS = _columns(Message)
_VOTE_FIELDS = _columns(Vote)
_RESULT_FIELDS = _columns(ConsensusResult)
_CONVERSATION_FIELDS = list(Conversation._meta.concrete_fields)  # the primary key included
_EVENT_FIELDS = _columns(Event)
# A message already stored by an earlier attempt of the run is kept (msg_one_answer_per_agent_turn).
_MESSAGE_CONFLICT = " ON CONFLICT DO NOTHING"
_VOTE_KEY = ("conversation_id", "exchange", "voter")
_VOTE_CONFLICT = ' ON CONFLICT ("conversation_id", "exchange", "voter") DO UPDATE SET ' + ", ".join(
    f'"{_column(Vote, n)}" = EXCLUDED."{_column(Vote, n)}"' for n in ("choice", "confidence", "reason")
)

# A resumed run that decides again replaces the exchange's result (all but its key and creation).
_RESULT_CONFLICT = ' ON CONFLICT ("conversation_id", "exchange") DO UPDATE SET ' + ", ".join(
    f'"{f.column}" = EXCLUDED."{f.column}"'
    for f in _RESULT_FIELDS
    if f.attname not in ("conversation_id", "exchange", "created_at")
)


def _record_type(db_type: str) -> str:
    """The column's type without its modifier (varchar(64) -> varchar) for the record definition."""
    return re.sub(r"\(.*\)", "", db_type)


def _insert_json(model: type[Any], fields: list[Any], suffix: str) -> str:
    """INSERT of many rows from one JSON array of objects keyed by column (`json_to_recordset`).

    Each column is read with its type's name and cast to the model's type explicitly, as a
    bound `::varchar(64)` parameter was: one JSON text, dumped in C, replaces one array per
    column that psycopg adapted element by element in Python.
    """
    vendor = connections["default"]
    columns = ", ".join(f'"{f.column}"' for f in fields)
    types = [(f.column, f.db_type(vendor)) for f in fields]
    select = ", ".join(f'r."{name}"::{db_type}' for name, db_type in types)
    record = ", ".join(f'"{name}" {_record_type(db_type)}' for name, db_type in types)
    # Identifiers and types come from the models, never from input; values are one bound parameter.
    return (
        f'INSERT INTO "{model._meta.db_table}" ({columns}) '  # noqa: S608
        f"SELECT {select} FROM json_to_recordset(%s::json) AS r({record}){suffix}"
    )


_sql_cache: dict[tuple[bool, bool, bool, bool, tuple[str, ...]], str] = {}


def _with_rows(messages: bool, votes: bool, result: bool, events: bool) -> str:
    """The data-modifying CTEs that insert these kinds of rows (each from one JSON parameter)."""
    parts = _row_ctes(messages, votes, result, events)
    # Every data-modifying CTE runs whether or not the main statement reads it.
    return f"WITH {', '.join(parts)} " if parts else ""


def _row_ctes(messages: bool, votes: bool, result: bool, events: bool) -> list[str]:
    parts = []
    if messages:
        parts.append(f"m AS ({_insert_json(Message, _MESSAGE_FIELDS, _MESSAGE_CONFLICT)})")
    if votes:
        parts.append(f"v AS ({_insert_json(Vote, _VOTE_FIELDS, _VOTE_CONFLICT)})")
    if result:
        parts.append(f"c AS ({_insert_json(ConsensusResult, _RESULT_FIELDS, _RESULT_CONFLICT)})")
    if events:
        parts.append(f"e AS ({_insert_json(Event, _EVENT_FIELDS, '')})")
    return parts


def _batch_sql(messages: bool, votes: bool, result: bool, events: bool, names: tuple[str, ...]) -> str:
    """The one statement of a batch with these parts (cached: a handful of shapes exist)."""
    key = (messages, votes, result, events, names)
    sql = _sql_cache.get(key)
    if sql is None:
        if names:
            sets = ", ".join(f'"{_column(Conversation, n)}" = %s' for n in names)
            main = f'UPDATE "{Conversation._meta.db_table}" SET {sets} WHERE "id" = %s'  # noqa: S608
        else:
            main = "SELECT 1"  # rows without events: the conversation row stays as it is
        sql = _sql_cache[key] = _with_rows(messages, votes, result, events) + main
    return sql


def _record(fields: list[Any], given: dict[str, Any]) -> dict[str, Any]:
    """One row as a JSON object keyed by column: given by attname, else the field's default."""
    return {f.column: given[f.attname] if f.attname in given else f.get_default() for f in fields}


def _json_default(value: Any) -> Any:
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _param(value: Any) -> Any:
    """A conversation field's value as a statement parameter (a JSON field's dict as jsonb)."""
    from psycopg.types.json import Jsonb

    return Jsonb(value) if isinstance(value, dict | list) else value


def event_text(event: dict[str, Any]) -> str:
    """An event as compact JSON: what is stored, appended to the Redis Stream and sent to sockets.

    orjson, not the standard library: a conversation's events cost 350 us of CPU to encode with
    `json.dumps` and 30 us with orjson (docs/scaling.md, phase J). Its text is the same JSON
    value; non-ASCII characters are written as UTF-8 rather than as \\u escapes.
    """
    return orjson.dumps(event, option=orjson.OPT_NON_STR_KEYS).decode()


def _json(value: Any) -> str:
    return orjson.dumps(value, default=_json_default, option=orjson.OPT_NON_STR_KEYS).decode()


def _event_json(conversation_id: uuid.UUID | str, event: dict[str, Any], text: str, created: str) -> str:
    """One Event row as a JSON object: its columns, then the event's own serialised text as data.

    Written out rather than encoded (twice per event otherwise): the columns are fixed, and
    only the type is a string from outside (the others are a UUID, an int and an ISO time).
    """
    return (
        f'{{"{_EVENT_CONVERSATION}":"{conversation_id}","{_EVENT_SEQ}":{int(event["seq"])},'
        f'"{_EVENT_TYPE}":{orjson.dumps(event["type"]).decode()},"{_EVENT_CREATED}":"{created}","data":{text}}}'
    )


# The Event columns _event_json writes: every one but the key (a test holds it to the model).
_EVENT_CONVERSATION, _EVENT_SEQ, _EVENT_TYPE, _EVENT_CREATED = (
    _column(Event, name) for name in ("conversation", "seq", "type", "created_at")
)


_conninfos: dict[tuple[Any, ...], str] = {}


def _conninfo() -> str:
    from django.conf import settings
    from psycopg.conninfo import make_conninfo

    # settings, not connections["default"]: on the event loop that lookup builds a new
    # DatabaseWrapper in every task context. The test runner updates both with the test NAME.
    s = settings.DATABASES["default"]
    key = (s.get("NAME"), s.get("USER"), s.get("PASSWORD"), s.get("HOST"), s.get("PORT"))
    found = _conninfos.get(key)
    if found is None:
        name, user, password, host, port = key
        params = {
            "dbname": name,
            "user": user,
            "password": password,
            "host": host,
            "port": str(port) if port else None,
        }
        found = _conninfos[key] = make_conninfo("", **{k: v for k, v in params.items() if v})
    return found


def _forget_closed_loops() -> None:
    """Drop the pools of loops that have closed (tests, async_to_sync), ending their connections."""
    for loop in [loop for loop in _pools if loop.is_closed()]:
        pool = _pools.pop(loop)[1]
        for conn in list(getattr(pool, "_pool", ())):  # idle connections; nothing can await them now
            with contextlib.suppress(Exception):  # best effort on a dead loop
                conn.pgconn.finish()


async def _configure(conn: Any) -> None:
    """A new connection of the pool reads JSON columns (a run's begin, a /chat body) with orjson."""
    from psycopg.types.json import set_json_loads

    set_json_loads(orjson.loads, conn)


def _opened(opening: asyncio.Task[None]) -> bool:
    return opening.done() and not opening.cancelled() and opening.exception() is None


async def pool() -> Any:
    """The open connection pool of the running event loop (created on first use)."""
    from psycopg_pool import AsyncConnectionPool

    loop = asyncio.get_running_loop()
    conninfo = _conninfo()
    cached = _pools.get(loop)
    if cached is not None and cached[0] == conninfo and _opened(cached[2]):
        return cached[1]  # every statement comes here: no shield of a finished task
    if cached is not None and cached[2].done() and cached[2].exception() is not None:
        await discard_pool()  # it never opened (the database was away): start afresh
        cached = None
    if cached is None or cached[0] != conninfo:
        _forget_closed_loops()
        if cached is not None:
            await cached[1].close()
        new = AsyncConnectionPool(
            conninfo,
            # All opened at once (in the background): a pool that grows under load connects
            # (authentication, configuration) while batches wait.
            min_size=POOL_MAX,
            max_size=POOL_MAX,
            open=False,
            timeout=10,
            name="polyagents-events",
            configure=_configure,
            # The name is visible in pg_stat_activity; autocommit makes each batch's one
            # statement its own transaction.
            # (UTC: datetimes read back are the ORM's.)
            kwargs={
                "application_name": "polyagents-events",
                "autocommit": True,
                "options": "-c TimeZone=UTC",
            },
        )
        cached = (conninfo, new, loop.create_task(new.open(wait=True, timeout=10)))
        _pools[loop] = cached
    await asyncio.shield(cached[2])
    return cached[1]


_closing: set[asyncio.Task[None]] = set()
# The connection every statement of this context runs on (`on_every_connection`), else None.
_pinned: contextvars.ContextVar[Any] = contextvars.ContextVar("polyagents_store_pinned", default=None)


async def _execute(sql: str, params: Any, *, fetch: bool = False) -> tuple[Any, ...] | None:
    """Run one statement on the pinned connection, else on one of the running loop's pool; its
    first row when `fetch`.

    The connection is taken with `getconn` and given back with `putconn`: the pool's
    `connection()` context adds a context manager and a transaction block that autocommit does
    not need: 145 against 103 us of client CPU per `SELECT 1` (docs/scaling.md, phase J).
    `putconn` still checks the connection and replaces a broken one.
    """
    pinned = _pinned.get()
    if pinned is not None:
        return await _execute_on(pinned, sql, params, fetch)
    events_pool = await pool()
    conn = await events_pool.getconn(timeout=GETCONN_TIMEOUT)
    try:
        return await _execute_on(conn, sql, params, fetch)
    finally:
        await events_pool.putconn(conn)


async def _execute_on(conn: Any, sql: str, params: Any, fetch: bool) -> tuple[Any, ...] | None:
    cursor = await conn.execute(sql, params)
    return await cursor.fetchone() if fetch else None


async def on_every_connection(rehearsal: Callable[[], Awaitable[None]]) -> None:
    """Run `rehearsal`'s statements once on each connection of the pool, in a transaction that
    is rolled back (nothing stays).

    A fresh backend loads its catalog and plans its foreign-key checks on first use, and psycopg
    builds its side per connection: a batch costs about 6 ms on a new connection against 2 ms
    after. The warm-up pays that before the first run instead of the run.
    """
    events_pool = await pool()
    held = [await events_pool.getconn(timeout=GETCONN_TIMEOUT) for _ in range(POOL_MAX)]
    try:
        for conn in held:
            token = _pinned.set(conn)
            try:
                async with conn.transaction(force_rollback=True):
                    await rehearsal()
            finally:
                _pinned.reset(token)
    finally:
        for conn in held:
            await events_pool.putconn(conn)


@functools.cache
def _start_statement() -> str:
    """A new conversation and its question, unless the key has a daily quota (one statement)."""
    from gateway.models import ApiKey

    quota = _column(ApiKey, "daily_quota")
    return (
        f'WITH q AS (SELECT EXISTS (SELECT 1 FROM "{ApiKey._meta.db_table}" '  # noqa: S608
        f'WHERE "id" = %s AND "{quota}" IS NOT NULL) AS held), '
        f"c AS ({_insert_json(Conversation, _CONVERSATION_FIELDS, ' WHERE NOT (SELECT held FROM q) RETURNING 1')}), "  # noqa: E501
        f"m AS ({_insert_json(Message, _MESSAGE_FIELDS, ' WHERE EXISTS (SELECT 1 FROM c)')}) "
        "SELECT EXISTS (SELECT 1 FROM c)"
    )


async def start_conversation(conversation: Conversation, question: dict[str, Any]) -> bool:
    """Insert a new conversation (its fields as set on the instance) and its first question (a
    Message's fields by attname, the model's defaults for the rest) in one statement on the
    event loop's pool, unless its API key has a daily quota to reserve: False then, and nothing
    is written (the caller's ORM path reserves it)."""
    fields = {f.attname: getattr(conversation, f.attname) for f in _CONVERSATION_FIELDS}
    params = [
        conversation.api_key_id,
        _json([_record(_CONVERSATION_FIELDS, fields)]),
        _json([_record(_MESSAGE_FIELDS, question)]),
    ]
    row = await _read_one(_start_statement(), params)
    return bool(row and row[0])


async def discard_pool() -> None:
    """Drop the running loop's pool after a failed write; the next write opens a fresh one.

    A pool whose connections died with the database reconnects with a growing back-off and
    can keep refusing for a while after the database is back; a new pool connects at once.
    """
    cached = _pools.pop(asyncio.get_running_loop(), None)
    if cached is not None:
        task = asyncio.get_running_loop().create_task(cached[1].close(timeout=1.0))
        _closing.add(task)
        task.add_done_callback(_closing.discard)


async def close_pool() -> None:
    """Close the running loop's pool (tests and process shutdown)."""
    cached = _pools.pop(asyncio.get_running_loop(), None)
    if cached is not None:
        await cached[1].close()


def _batch_rows(
    conversation_id: uuid.UUID, batch: list[dict[str, Any]], rows: Rows, created: str, texts: list[str] | None
) -> tuple[list[str], list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """A batch's events (JSON texts), messages, ballots and result as the statement's rows."""
    if texts is None:
        texts = [event_text(e) for e in batch]
    its_id = str(conversation_id)  # once per batch, not once per event
    events = [_event_json(its_id, e, text, created) for e, text in zip(batch, texts, strict=True)]
    messages = [_record(_MESSAGE_FIELDS, {"created_at": created, **m}) for m in rows.messages]
    # One statement may not upsert a row twice: the last ballot of a voter wins, as in sequence.
    latest = {tuple(v[k] for k in _VOTE_KEY): v for v in rows.votes}
    votes = [_record(_VOTE_FIELDS, {"created_at": created, **v}) for v in latest.values()]
    results = [_record(_RESULT_FIELDS, {"created_at": created, **rows.result})] if rows.result else []
    return events, messages, votes, results


async def write_batch(
    conversation_id: uuid.UUID,
    batch: list[dict[str, Any]],
    rows: Rows,
    now: datetime,
    texts: list[str] | None = None,
) -> None:
    """Insert the events, the messages, ballots and result, and update the conversation: one statement.

    `texts` are the events already serialised (`event_text`): they go in as they are.
    """
    updates = {**rows.conversation, "last_seq": batch[-1]["seq"]} if batch else dict(rows.conversation)
    events, messages, votes, results = _batch_rows(conversation_id, batch, rows, now.isoformat(), texts)
    names = tuple(updates)
    params: list[Any] = [_json(part) for part in (messages, votes, results) if part]
    if events:
        params.append(f"[{','.join(events)}]")
    if names:
        params += [*(_param(updates[n]) for n in names), conversation_id]
    sql = _batch_sql(bool(messages), bool(votes), bool(results), bool(events), names)
    await _execute(sql, params)


# Batch writes of many conversations (write_batches): one statement per round.
_Write = tuple[uuid.UUID, list[dict[str, Any]], Rows, datetime, list[str] | None]


def _update_json(names: tuple[str, ...]) -> str:
    """UPDATE of many conversations from one JSON array of objects: the id, last_seq and these
    fields (attnames), keyed by column; each read with its type's name and cast to the model's."""
    vendor = connections["default"]
    fields: list[Any] = [Conversation._meta.get_field(name) for name in ("last_seq", *names)]
    sets = ", ".join(f'"{f.column}" = r."{f.column}"::{f.db_type(vendor)}' for f in fields)
    record = ", ".join(['"id" uuid', *(f'"{f.column}" {_record_type(f.db_type(vendor))}' for f in fields)])
    return (
        f'UPDATE "{Conversation._meta.db_table}" AS t SET {sets} '  # noqa: S608
        f'FROM json_to_recordset(%s::json) AS r({record}) WHERE t."id" = r."id"'
    )


@functools.cache
def _many_sql(messages: bool, votes: bool, result: bool, shapes: tuple[tuple[str, ...], ...]) -> str:
    """The statement of a round: the batches' rows and events, and each conversation's last_seq
    and other fields, one UPDATE per set of field names (`shapes`, each from one parameter)."""
    updates = [_update_json(names) for names in shapes]
    ctes = _row_ctes(messages, votes, result, True) + [f"u{n} AS ({u})" for n, u in enumerate(updates[:-1])]
    return f"WITH {', '.join(ctes)} {updates[-1]}"


async def _write_many(writes: list[_Write]) -> None:
    """Batches of several conversations, each with events, in one statement: stored all together
    or not at all."""
    events: list[str] = []
    messages: list[dict[str, Any]] = []
    votes: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    updates: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for conversation_id, batch, rows, now, texts in writes:
        its_events, its_messages, its_votes, its_results = _batch_rows(
            conversation_id, batch, rows, now.isoformat(), texts
        )
        events += its_events
        messages += its_messages
        votes += its_votes
        results += its_results
        names = tuple(sorted(name for name in rows.conversation if name != "last_seq"))
        updates.setdefault(names, []).append(
            {
                "id": str(conversation_id),
                "last_seq": batch[-1]["seq"],
                **{_column(Conversation, name): rows.conversation[name] for name in names},
            }
        )
    params: list[Any] = [_json(part) for part in (messages, votes, results) if part]
    params += [f"[{','.join(events)}]", *(_json(group) for group in updates.values())]
    sql = _many_sql(bool(messages), bool(votes), bool(results), tuple(updates))
    await _execute(sql, params)


async def _write_round(writes: list[_Write]) -> list[BaseException | None]:
    """The batches of several conversations ready at once: one statement for all of them.

    If that statement is refused (a stale run's duplicate seq, a conversation deleted meanwhile)
    nothing of it is stored, and each batch is written again on its own, so only the faulty one
    fails. A lost connection fails every batch of the round; each log retries its own as before.
    Two batches of one conversation (a stale run beside its resumed one) never share a
    statement: each sets the conversation's last_seq as it would alone.
    """
    import psycopg
    import psycopg_pool

    if len(writes) > 1 and len({write[0] for write in writes}) == len(writes):
        try:
            await _write_many(writes)
            return [None] * len(writes)
        except (psycopg.OperationalError, psycopg.InterfaceError, psycopg_pool.PoolTimeout) as exc:
            return [exc] * len(writes)
        except Exception:  # noqa: S110 (refused as a whole: written again below, one by one)
            pass
    outcomes: list[BaseException | None] = []
    for write in writes:
        try:
            await write_batch(*write)
            outcomes.append(None)
        except Exception as exc:
            outcomes.append(exc)
    return outcomes


# One per event loop, forgotten with it.
_rounds: PerLoop[Rounds[_Write, None]] = PerLoop(lambda: Rounds(_write_round))


async def write_batches(
    conversation_id: uuid.UUID,
    batch: list[dict[str, Any]],
    rows: Rows,
    now: datetime,
    texts: list[str] | None = None,
) -> None:
    """`write_batch`, sharing its statement with the batches of other conversations ready at the
    same time (`conversations.rounds`, `_write_round`). A batch without events is written on its
    own."""
    if not batch:
        await write_batch(conversation_id, batch, rows, now, texts)
        return
    await _rounds.get().submit((conversation_id, batch, rows, now, texts))


_read_cache: dict[tuple[tuple[str, ...], ...], str] = {}
_EXCHANGE_OF = '"conversation_id" = %(c)s AND "exchange" = %(x)s'
_BEFORE_EXCHANGE = '"conversation_id" = %(c)s AND "exchange" < %(x)s'


def _json_rows(
    model: type[Any], fields: tuple[str, ...], order: tuple[str, ...], where: str = _EXCHANGE_OF
) -> str:
    """A subquery: these fields of the matching rows (by default: of the exchange) as a JSON
    array in this order, or as one JSON object (the first row, or null) when no order is given.
    Names come from the models; values are the statement's named parameters."""
    columns = ", ".join(f'"{_column(model, n)}" AS "{n}"' for n in fields)
    rows = f'SELECT {columns} FROM "{model._meta.db_table}" WHERE {where}'  # noqa: S608
    if not order:
        return f"(SELECT row_to_json(r) FROM ({rows} LIMIT 1) r)"  # noqa: S608
    order_by = ", ".join(f'r."{n}"' for n in order)
    return f"(SELECT json_agg(r ORDER BY {order_by}) FROM ({rows}) r)"  # noqa: S608


async def exchange_rows(
    conversation_id: uuid.UUID,
    exchange: int,
    message_fields: tuple[str, ...],
    result_fields: tuple[str, ...],
    vote_fields: tuple[str, ...],
) -> tuple[list[dict[str, Any]], dict[str, Any] | None, list[dict[str, Any]]]:
    """An exchange's agent messages (by turn, agent), consensus result and ballots (by voter),
    these fields of each keyed by name: one statement on the event loop's pool, no thread hop.

    A connection that died with a restarted database fails the statement; it is read again
    once on a fresh pool.
    """

    key = (message_fields, result_fields, vote_fields)
    sql = _read_cache.get(key)
    if sql is None:
        parts = (
            _json_rows(Message, message_fields, ("turn", "agent_id"), f'{_EXCHANGE_OF} AND "role" = %(r)s'),
            _json_rows(ConsensusResult, result_fields, ()),
            _json_rows(Vote, vote_fields, ("voter",)),
        )
        sql = _read_cache[key] = f"SELECT {', '.join(parts)}"
    params = {"c": conversation_id, "x": exchange, "r": str(Message.Role.AGENT)}
    messages, result, votes = await _read_one(sql, params) or (None, None, None)
    return messages or [], result, votes or []


async def _read_one(sql: str, params: dict[str, Any] | list[Any]) -> tuple[Any, ...] | None:
    """The first row of a statement on the event loop's pool (autocommit: its own transaction).

    A connection that died with a restarted database fails the statement; it runs again once
    on a fresh pool.
    """
    import psycopg

    for attempt in (1, 2):
        try:
            return await _execute(sql, params, fetch=True)
        except (psycopg.OperationalError, psycopg.InterfaceError):
            if attempt == 2:
                raise
            await discard_pool()
    raise AssertionError("unreachable")


_begin_cache: dict[tuple[str, ...], str] = {}


async def begin_run(
    conversation_id: uuid.UUID, exchange: int, now: datetime, message_fields: tuple[str, ...]
) -> tuple[Conversation, list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]], int] | None:
    """Mark a run of the conversation's current exchange running and read what it starts from,
    in one statement: the conversation, the exchange's messages (these fields, by turn and id),
    the questions and answers of earlier exchanges, the last stored event's seq.

    None when the conversation is missing, finished, or `exchange` is not its current one
    (the caller's slower path tells those apart).
    """
    sql = _begin_cache.get(message_fields)
    if sql is None:
        table = Conversation._meta.db_table
        returning = ", ".join(f'"{f.column}"' for f in _CONVERSATION_FIELDS)
        status, started, beat = (_column(Conversation, n) for n in ("status", "started_at", "heartbeat_at"))
        where = f'"id" = %(c)s AND "exchanges" = %(x)s AND NOT ("{status}" = ANY(%(terminal)s))'
        update = (
            f'UPDATE "{table}" SET "{status}" = %(running)s, '  # noqa: S608
            f'"{started}" = COALESCE("{started}", %(now)s), "{beat}" = %(now)s '
            f"WHERE {where} RETURNING {returning}"
        )
        reads = (
            _json_rows(Message, message_fields, ("turn", "id")),
            _json_rows(
                Message, ("exchange", "content"), ("exchange",), f'{_BEFORE_EXCHANGE} AND "role" = %(u)s'
            ),
            _json_rows(ConsensusResult, ("exchange", "answer"), ("exchange",), _BEFORE_EXCHANGE),
            f'(SELECT COALESCE(MAX("seq"), 0) FROM "{Event._meta.db_table}" WHERE "conversation_id" = %(c)s)',  # noqa: S608
        )
        sql = f"WITH c AS ({update}) SELECT c.*, {', '.join(reads)} FROM c"  # noqa: S608
        _begin_cache[message_fields] = sql
    params = {
        "c": conversation_id,
        "x": exchange,
        "now": now,
        "running": str(Conversation.Status.RUNNING),
        "terminal": [str(s) for s in Conversation.TERMINAL],
        "u": str(Message.Role.USER),
    }
    row = await _read_one(sql, params)
    if row is None:
        return None
    n = len(_CONVERSATION_FIELDS)
    conversation = Conversation.from_db("default", [f.attname for f in _CONVERSATION_FIELDS], row[:n])
    messages, questions, answers, last_seq = row[n:]
    return conversation, messages or [], questions or [], answers or [], int(last_seq)


def _blocked_sql() -> str:
    """Whether %(ip)s is blocked now: `gateway.blocking.is_blocked`'s query, as an expression."""
    from gateway.models import BlockedIP

    return (
        f'EXISTS (SELECT 1 FROM "{BlockedIP._meta.db_table}" b WHERE b."ip" = %(ip)s::inet'  # noqa: S608
        ' AND (b."expires_at" IS NULL OR b."expires_at" > now()))'
    )


@functools.cache
def _admission_statement(owner: bool = True) -> tuple[str, list[str]]:
    """The statement of a handshake (with the conversation's `owner`) or of an HTTP request's
    checks (without), and the attnames of the ApiKey columns it reads, in order."""
    from gateway.models import ApiKey

    fields = ApiKey._meta.concrete_fields
    columns = ", ".join(f'k."{f.column}"' for f in fields)
    owner_sql = (
        f'(SELECT c."owner" FROM "{Conversation._meta.db_table}" c WHERE c."id" = %(c)s), ' if owner else ""  # noqa: S608
    )
    sql = (
        f"SELECT {_blocked_sql()}, {owner_sql}{columns} "  # noqa: S608
        f'FROM (SELECT 1) AS one LEFT JOIN "{ApiKey._meta.db_table}" k ON k."key_hash" = %(h)s'
    )
    return sql, [f.attname for f in fields]


async def ip_blocked(ip: str) -> bool:
    """Whether `ip` (a normalised address) is blocked now, in one statement on the event loop's
    pool: `gateway.blocking.ais_blocked` without the ORM and its thread hop."""
    row = await _read_one(_ip_blocked_statement(), {"ip": ip})
    return bool(row and row[0])


@functools.cache
def _ip_blocked_statement() -> str:
    return f"SELECT {_blocked_sql()}"


def _key_of(attnames: list[str], values: list[Any]) -> Any:
    from gateway.models import ApiKey

    return ApiKey.from_db("default", attnames, values) if values[0] is not None else None


async def blocked_and_key(ip: str, key_hash: str) -> tuple[bool, Any]:
    """Whether `ip` is blocked now, and the API key with this hash (an `ApiKey`, or None), in one
    statement on the event loop's pool: an HTTP request's block check and its key's lookup
    (`gateway.keys.key_authenticate` is handed the key; `polyagents_site.middleware`)."""
    sql, attnames = _admission_statement(owner=False)
    row = await _read_one(sql, {"ip": ip, "h": key_hash})
    assert row is not None  # one row always: the LEFT JOIN keeps it without a key
    blocked_now, *key_values = row
    return bool(blocked_now), _key_of(attnames, key_values)


async def admission_row(
    ip: str | None, key_hash: str, conversation_id: uuid.UUID
) -> tuple[bool, str | None, Any]:
    """What a WebSocket handshake checks, in one statement on the event loop's pool: whether `ip`
    is blocked now, the conversation's owner (None if it is gone), and the API key with this hash
    (an `ApiKey` loaded from its row, or None).

    The same reads as `gateway.blocking.is_blocked`, `gateway.keys.key_authenticate`'s lookup and
    the owner check, without the ORM and its thread hop (`streaming.consumers.aadmit`).
    """
    sql, attnames = _admission_statement()
    row = await _read_one(sql, {"ip": ip, "c": conversation_id, "h": key_hash})
    assert row is not None  # one row always: the LEFT JOIN keeps it without a key
    blocked_now, owner, *key_values = row
    return bool(blocked_now), owner, _key_of(attnames, key_values)
