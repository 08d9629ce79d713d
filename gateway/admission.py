"""What a request's or a WebSocket handshake's admission checks read, in one call: whether the
client's IP is blocked now (`gateway.blocking.is_blocked`'s query), the row of the API key it
presents, and for a handshake the owner of the conversation it follows.

On PostgreSQL that is one written-out statement on the event loop's own pool (no thread hop,
no ORM); the embedded SQLite reads it through the ORM in its one thread. The owner is read
from the conversations table by name: the gateway imports no code of the layers above it.
None when the database cannot answer: the caller's own checks decide then (they fail open on
the block list).
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import psycopg
from asgiref.sync import sync_to_async
from django.apps import apps
from django.conf import settings
from django.db import DatabaseError
from django.db.models import Q
from django.utils import timezone

from gateway.models import ApiKey, BlockedIP
from loopstate import postgres as pg

ADMISSION = """
SELECT
    EXISTS (SELECT 1 FROM gateway_blockedip b
            WHERE b.ip = %(ip)s::inet AND (b.expires_at IS NULL OR b.expires_at > now())),
    (SELECT c.owner FROM conversations_conversation c WHERE c.id = %(c)s),
    k.id, k.name, k.prefix, k.key_hash, k.permissions, k.rate_limit_override, k.daily_quota,
    k.daily_quota_unit, k.source, k.created_at, k.expires_at, k.revoked_at, k.last_used_at,
    k.replaced_by_id
FROM (SELECT 1) AS one LEFT JOIN gateway_apikey k ON k.key_hash = %(h)s
"""
_KEY_ATTNAMES = (
    "id", "name", "prefix", "key_hash", "permissions", "rate_limit_override", "daily_quota",
    "daily_quota_unit", "source", "created_at", "expires_at", "revoked_at", "last_used_at",
    "replaced_by_id",
)  # fmt: skip


@dataclass(frozen=True)
class AdmissionRead:
    blocked: bool
    key: ApiKey | None  # the key with the hash given, if any
    owner: str | None  # the conversation's owner (None if it is gone, or none was asked)


async def _read_postgres(
    ip: str | None, key_hash: str | None, conversation_id: uuid.UUID | None
) -> AdmissionRead:
    row = await pg.fetch_one(ADMISSION, {"ip": ip, "h": key_hash, "c": conversation_id})
    assert row is not None  # one row always: the LEFT JOIN keeps it without a key
    blocked, owner, *values = row
    key = ApiKey.from_db("default", list(_KEY_ATTNAMES), values) if values[0] is not None else None
    return AdmissionRead(bool(blocked), key, owner)


def _read_orm(ip: str | None, key_hash: str | None, conversation_id: uuid.UUID | None) -> AdmissionRead:
    blocked = ip is not None and (
        BlockedIP.objects.filter(ip=ip)
        .filter(Q(expires_at__isnull=True) | Q(expires_at__gt=timezone.now()))
        .exists()
    )
    key = ApiKey.objects.filter(key_hash=key_hash).first() if key_hash is not None else None
    owner = None
    if conversation_id is not None:
        conversations = apps.get_model("conversations", "Conversation").objects
        owner = conversations.filter(pk=conversation_id).values_list("owner", flat=True).first()
    return AdmissionRead(blocked, key, owner)


Reader = Callable[[str | None, str | None, uuid.UUID | None], Awaitable[AdmissionRead]]


@functools.cache
def _reader() -> tuple[Reader, tuple[type[BaseException], ...]]:
    """The backend's read, and what it raises when the database cannot answer (chosen once)."""
    if settings.USING_POSTGRES:
        return _read_postgres, (psycopg.Error,)
    return sync_to_async(_read_orm), (DatabaseError,)


async def admission_read(
    ip: str | None, key_hash: str | None, conversation_id: uuid.UUID | None = None
) -> AdmissionRead | None:
    """Whether `ip` (a normalised address) is blocked now, the API key with this hash, and the
    conversation's owner; None when the database cannot answer."""
    read, unavailable = _reader()
    try:
        return await read(ip, key_hash, conversation_id)
    except unavailable:
        return None
