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

    from conversations import store

    async def failing(ip: str) -> bool:
        raise psycopg.OperationalError("the server closed the connection")

    monkeypatch.setattr(store, "ip_blocked", failing)
    assert (await AsyncClient().get("/health", headers=from_blocked_ip)).status_code == 403
