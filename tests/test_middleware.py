"""Django's middleware on the event loop (polyagents_site/middleware.py): the same behaviour as
Django's own classes, with a thread hop only where a hook may touch the database."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth.models import User
from django.test import AsyncClient, Client
from django.utils import deprecation

from polyagents_site import middleware
from tests.conftest import requires_postgres

pytestmark = pytest.mark.django_db(transaction=True)

FULL_KEY = re.compile(r"pk_[A-Za-z0-9_-]{43}")
HEADERS = (
    "X-Frame-Options",
    "X-Content-Type-Options",
    "Referrer-Policy",
    "Cross-Origin-Opener-Policy",
    "Vary",
)


@pytest.fixture
def hops(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The hooks any middleware sent to the request's thread, by name."""
    names: list[str] = []

    def counting(function: Callable[..., Any], **kwargs: Any) -> Callable[..., Any]:
        names.append(function.__qualname__)
        return sync_to_async(function, **kwargs)

    monkeypatch.setattr(middleware, "sync_to_async", counting)
    monkeypatch.setattr(deprecation, "sync_to_async", counting)  # Django's MiddlewareMixin
    return names


async def test_reads_stay_on_the_loop(hops: list[str], thread_connections_closed: None) -> None:
    page = await AsyncClient().get("/django-admin/login/")
    assert page.status_code == 200
    assert "csrftoken" in page.cookies  # CsrfViewMiddleware's response hook ran
    assert page["X-Frame-Options"] == "DENY"
    assert page["X-Content-Type-Options"] == "nosniff"
    assert (await AsyncClient().get("/health")).status_code == 200
    assert hops == []


async def test_same_headers_as_the_sync_path(thread_connections_closed: None) -> None:
    asynchronous = await AsyncClient().get("/django-admin/login/")
    synchronous = await sync_to_async(Client().get)("/django-admin/login/")
    assert {h: asynchronous.get(h) for h in HEADERS} == {h: synchronous.get(h) for h in HEADERS}
    assert asynchronous.cookies.keys() == synchronous.cookies.keys()


async def test_login_checks_csrf_and_saves_the_session_in_the_thread(
    hops: list[str], thread_connections_closed: None
) -> None:
    await sync_to_async(User.objects.create_superuser)("root", "root@example.com", "s3cret-pass")
    client = AsyncClient(enforce_csrf_checks=True)
    token = (await client.get("/django-admin/login/")).cookies["csrftoken"].value
    credentials = {"username": "root", "password": "s3cret-pass", "next": "/django-admin/"}

    refused = await client.post("/django-admin/login/", credentials)
    assert refused.status_code == 403  # no token: the check ran, in the thread
    assert hops == ["CsrfViewMiddleware.process_view"]

    hops.clear()
    signed_in = await client.post("/django-admin/login/", {**credentials, "csrfmiddlewaretoken": token})
    assert signed_in.status_code == 302
    assert "sessionid" in signed_in.cookies
    assert hops == ["CsrfViewMiddleware.process_view", "SessionMiddleware.process_response"]

    index = await client.get("/django-admin/")
    assert index.status_code == 200
    assert "root" in index.content.decode()  # the saved session was read back


async def test_messages_are_stored_and_shown(thread_connections_closed: None) -> None:
    await sync_to_async(User.objects.create_superuser)("root", "root@example.com", "s3cret-pass")
    client = AsyncClient()
    await sync_to_async(client.force_login)(await User.objects.aget(username="root"))
    added = await client.post(
        "/django-admin/gateway/apikey/add/",
        {"name": "svc", "permissions": ["read"], "expires_at_0": "", "expires_at_1": ""},
    )
    assert added.status_code == 302
    shown = await client.get(added["Location"])
    assert len(set(FULL_KEY.findall(shown.content.decode()))) == 1  # the message with the new key
    again = await client.get(added["Location"])
    assert FULL_KEY.findall(again.content.decode()) == []  # shown once: the read was stored too


# --- the gateway's IP block check ----------------------------------------------------------

BLOCKED = "198.51.100.77"


@pytest.fixture
def from_blocked_ip(settings: Any) -> dict[str, str]:
    """Headers of a request from a blocked address (the ASGI test client connects from
    127.0.0.1, so the address comes through a trusted proxy's X-Forwarded-For)."""
    from gateway.blocking import block_ip

    settings.CONFIG = settings.CONFIG.model_copy(update={"TRUST_X_FORWARDED_FOR": True})
    block_ip(BLOCKED, seconds=600, reason="test")
    return {"X-Forwarded-For": BLOCKED}


@requires_postgres
async def test_the_block_check_is_one_statement_on_the_loop(
    from_blocked_ip: dict[str, str], monkeypatch: pytest.MonkeyPatch, thread_connections_closed: None
) -> None:
    from gateway import blocking
    from gateway.models import BlockedIP

    def no_orm(ip: str) -> Any:
        raise AssertionError("the ORM's block check ran")

    monkeypatch.setattr(blocking, "_active_blocks", no_orm)
    refused = await AsyncClient().get("/health", headers=from_blocked_ip)
    assert (refused.status_code, refused.json()["code"]) == (403, "ip_blocked")
    assert (await AsyncClient().get("/health")).status_code == 200  # other addresses
    await BlockedIP.objects.filter(ip=BLOCKED).adelete()
    assert (await AsyncClient().get("/health", headers=from_blocked_ip)).status_code == 200  # at once


@requires_postgres
async def test_a_failed_statement_leaves_the_block_check_to_the_orm(
    from_blocked_ip: dict[str, str], monkeypatch: pytest.MonkeyPatch, thread_connections_closed: None
) -> None:
    import psycopg

    from loopstate import postgres as pg

    async def failing(*args: Any) -> Any:
        raise psycopg.OperationalError("the server closed the connection")

    monkeypatch.setattr(pg, "fetch_one", failing)
    assert (await AsyncClient().get("/health", headers=from_blocked_ip)).status_code == 403


# --- an API key read with the block check ---------------------------------------------------


@pytest.fixture
def recent_key() -> tuple[Any, str]:
    """A read key used a moment ago (so authenticating it writes nothing), and its secret."""
    from django.utils import timezone

    from gateway.keys import key_create
    from gateway.models import ApiKey

    issued = key_create(name="reader", permissions=["read"])
    ApiKey.objects.filter(pk=issued.key.pk).update(last_used_at=timezone.now())
    return issued.key, issued.raw


@requires_postgres
async def test_an_api_key_is_read_in_the_block_checks_statement(
    recent_key: tuple[Any, str], monkeypatch: pytest.MonkeyPatch, thread_connections_closed: None
) -> None:
    from gateway import keys

    key, raw = recent_key

    def no_lookup(key_hash: str) -> Any:
        raise AssertionError("the key was looked up again")

    monkeypatch.setattr(keys, "_key_by_hash", no_lookup)
    client = AsyncClient()
    known = await client.get("/auth/whoami", headers={"Authorization": f"Bearer {raw}"})
    assert (known.status_code, known.json()["name"], known.json()["kind"]) == (200, "reader", "api_key")
    unknown = await client.get("/auth/whoami", headers={"Authorization": "Bearer pk_" + "x" * 43})
    assert (unknown.status_code, unknown.json()["code"]) == (401, "invalid_token")
    await sync_to_async(type(key).objects.filter(pk=key.pk).update)(revoked_at=key.created_at)
    revoked = await client.get("/auth/whoami", headers={"Authorization": f"Bearer {raw}"})
    assert (revoked.status_code, revoked.json()["code"]) == (401, "key_revoked")  # at once


def test_a_key_read_for_another_secret_is_not_used(recent_key: tuple[Any, str]) -> None:
    from gateway.keys import key_authenticate
    from gateway.models import hash_key

    key, raw = recent_key
    assert key_authenticate(raw, read=(hash_key("pk_" + "y" * 43), None)).pk == key.pk
    assert key_authenticate(raw, read=(hash_key(raw), key)) is key


@pytest.mark.parametrize(
    ("header", "token"),
    [
        (None, None),
        ("Basic dXNlcjpwYXNz", None),
        ("Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln", None),  # a JWT: not a key
        ("Bearer " + "k" * 5000, None),
        ("Bearer pk_abc", "pk_abc"),
    ],
)
def test_only_a_bearer_token_shaped_like_an_api_key_is_read_ahead(
    header: str | None, token: str | None
) -> None:
    from django.test import RequestFactory

    request = RequestFactory().get("/", headers={"Authorization": header} if header else None)
    assert middleware._api_key_token(request) == token
