"""A WebSocket handshake decided from one read (`gateway.admission`) decides as `admit` does."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.utils import timezone

from conversations.events import in_pool_thread
from conversations.models import Conversation
from gateway.models import ApiKey, BlockedIP
from gateway.principal import Principal
from streaming import consumers
from streaming.consumers import Admission, admit, admit_in_one_read

pytestmark = [pytest.mark.django_db(transaction=True)]

KeyMaker = Callable[..., tuple[ApiKey, str]]
IP = "203.0.113.9"


def scope_of(token: str, conversation_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": "websocket",
        "path": f"/ws/{conversation_id}",
        "headers": [],
        "client": (IP, 40000),
        "subprotocols": [f"bearer.{token}"],
        "query_string": b"",
        "url_route": {"kwargs": {"conversation_id": conversation_id}},
        **extra,
    }


async def key_and_owner(make_key: KeyMaker, permissions: list[str], **fields: Any) -> tuple[ApiKey, str, str]:
    fields.setdefault("last_used_at", timezone.now())
    row, raw = await sync_to_async(make_key)(permissions, **fields)
    owner = Principal(kind="api_key", permissions=frozenset(permissions), api_key_id=row.pk).owner
    return row, raw, owner


async def both(scope: dict[str, Any]) -> tuple[Admission | None, Admission]:
    """The one statement's decision first, then `admit`'s (which may refresh the key's last use)."""
    return await admit_in_one_read(scope), await in_pool_thread(admit, scope)


async def test_a_known_key_following_its_own_conversation_is_admitted_by_one_statement(
    make_key: KeyMaker,
) -> None:
    _, raw, owner = await key_and_owner(make_key, ["read", "write"])
    conversation = await Conversation.objects.acreate(owner=owner)
    fast, orm = await both(scope_of(raw, str(conversation.pk)))
    assert fast is not None
    assert fast == orm
    assert fast.principal is not None
    assert fast.principal.owner == owner


@pytest.mark.parametrize(
    ("case", "decided_by_the_statement"),
    [
        ("foreign conversation", True),
        ("missing conversation", True),
        ("no read permission", True),
        ("admin reads any", True),
        ("blocked ip", True),
        ("expired block", True),
        ("revoked key", False),
        ("expired key", False),
        ("unknown key", False),
        ("stale last use", False),
        ("malformed id", False),
        ("jwt", False),
    ],
)
async def test_every_other_handshake_is_decided_as_admit_decides(
    case: str, decided_by_the_statement: bool, make_key: KeyMaker
) -> None:
    permissions = {"no read permission": ["write"], "admin reads any": ["admin"]}.get(case, ["read"])
    fields: dict[str, Any] = {}
    if case == "revoked key":
        fields["revoked_at"] = timezone.now()
    if case == "expired key":
        fields["expires_at"] = timezone.now() - timedelta(seconds=1)
    if case == "stale last use":
        fields["last_used_at"] = timezone.now() - timedelta(minutes=5)
    _, raw, owner = await key_and_owner(make_key, permissions, **fields)
    mine = await Conversation.objects.acreate(owner=owner)
    theirs = await Conversation.objects.acreate(owner="key:someone-else")
    conversation_id = {
        "foreign conversation": str(theirs.pk),
        "admin reads any": str(theirs.pk),
        "missing conversation": str(uuid.uuid4()),
        "malformed id": "not-a-uuid",
    }.get(case, str(mine.pk))
    token = {"unknown key": "pk_" + "x" * 40, "jwt": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"}.get(
        case, raw
    )
    if case in ("blocked ip", "expired block"):
        expires = timezone.now() + timedelta(hours=1) if case == "blocked ip" else timezone.now()
        await BlockedIP.objects.acreate(ip=IP, expires_at=expires - timedelta(seconds=1))
    fast, orm = await both(scope_of(token, conversation_id))
    assert (fast is not None) == decided_by_the_statement
    if fast is not None:
        assert fast == orm


async def test_the_consumer_takes_the_one_statement_on_postgresql(
    make_key: KeyMaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, raw, owner = await key_and_owner(make_key, ["read"])
    conversation = await Conversation.objects.acreate(owner=owner)
    hops: list[object] = []
    real = consumers.in_pool_thread

    async def counted(fn: Any, *args: Any) -> Any:
        hops.append(fn)
        return await real(fn, *args)

    monkeypatch.setattr(consumers, "in_pool_thread", counted)
    admission = await consumers.aadmit(scope_of(raw, str(conversation.pk)))
    assert admission.principal is not None
    assert hops == []  # no thread hop, no ORM
