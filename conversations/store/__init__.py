"""The event store: where a conversation's events and the rows beside them are kept.

One interface (`base.EventStore`), one backend per database engine, chosen once from
DATABASE_URL as Django chooses its database backend: `postgres` (written-out statements on
each event loop's own connection pool) and `sqlite` (the ORM, for the embedded default).
Callers use `event_store()` and never ask which backend they have.
"""

from __future__ import annotations

from django.conf import settings

from conversations.store.base import (
    BEGIN_MESSAGE_FIELDS,
    CHAT_MESSAGE_FIELDS,
    CHAT_RESULT_FIELDS,
    CHAT_VOTE_FIELDS,
    EventStore,
    ExchangeRows,
    Rows,
    RunStart,
    event_text,
)
from conversations.store.postgres import PostgresEventStore
from conversations.store.sqlite import SqliteEventStore

__all__ = [
    "BEGIN_MESSAGE_FIELDS",
    "CHAT_MESSAGE_FIELDS",
    "CHAT_RESULT_FIELDS",
    "CHAT_VOTE_FIELDS",
    "EventStore",
    "ExchangeRows",
    "Rows",
    "RunStart",
    "event_store",
    "event_text",
]


_chosen: EventStore | None = None


def event_store() -> EventStore:
    """The process's event store: PostgreSQL's when DATABASE_URL names one, else SQLite's
    (chosen on first use)."""
    global _chosen
    if _chosen is None:
        _chosen = PostgresEventStore() if settings.USING_POSTGRES else SqliteEventStore()
    return _chosen
