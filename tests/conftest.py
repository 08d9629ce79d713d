"""Shared fixtures: real rows in the real database, API clients with real keys."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connections
from rest_framework.test import APIClient

from gateway.models import ApiKey, generate_key, hash_key

T = TypeVar("T")

requires_redis = pytest.mark.skipif(not settings.REDIS_URL, reason="needs REDIS_URL (real Redis)")
requires_postgres = pytest.mark.skipif(not settings.USING_POSTGRES, reason="needs DATABASE_URL (PostgreSQL)")


@pytest.fixture
def make_key(db: None) -> Callable[..., tuple[ApiKey, str]]:
    """Create a real API key row; returns (row, raw key)."""

    def _make(
        permissions: list[str] | None = None, name: str = "test", **fields: object
    ) -> tuple[ApiKey, str]:
        raw = generate_key()
        row = ApiKey.objects.create(
            name=name,
            prefix=raw[:10],
            key_hash=hash_key(raw),
            permissions=permissions if permissions is not None else ["read", "write"],
            **fields,
        )
        return row, raw

    return _make


@pytest.fixture
def api_client() -> APIClient:
    return APIClient()


@pytest.fixture
def client_with(make_key: Callable[..., tuple[ApiKey, str]]) -> Callable[..., APIClient]:
    """An APIClient authenticated with a fresh key holding the given permissions."""

    def _client(*permissions: str) -> APIClient:
        _, raw = make_key(list(permissions) or ["read", "write"])
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
        return client

    return _client


@pytest.fixture(autouse=True)
def _clear_cache() -> None:
    """Start every test with empty buckets and caches.

    On Redis only this session's prefix is deleted (never FLUSHDB: other runs share the server).
    """
    if settings.REDIS_URL:
        import redis

        conn = redis.Redis.from_url(settings.REDIS_URL)
        keys = list(conn.scan_iter(match=f"{settings.REDIS_KEY_PREFIX}:*", count=1000))
        if keys:
            conn.delete(*keys)
        conn.close()
    else:
        from django.core.cache import cache

        cache.clear()


@pytest.fixture(scope="session", autouse=True)
def _close_connection_pools(django_db_setup: None, django_db_blocker: object) -> object:
    """Close psycopg pools before the test database is dropped (pooled connections hold it open)."""
    yield

    for conn in connections.all(initialized_only=True):
        close_pool = getattr(conn, "close_pool", None)
        if close_pool is not None and getattr(conn, "pool", None) is not None:
            close_pool()
    if settings.USING_POSTGRES:
        # Async tests run the ORM in worker threads whose connections Django cannot reach
        # from here; end them so the test database can be dropped.
        import psycopg

        name = connections["default"].settings_dict["NAME"]
        with psycopg.connect(settings.CONFIG.DATABASE_URL or "", autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                [name],
            )


@pytest.fixture
async def thread_connections_closed() -> AsyncIterator[None]:
    """Close the database connections (and pools) opened by the async handler's worker thread."""
    yield

    def close() -> None:
        for conn in connections.all(initialized_only=True):
            conn.close()
            if hasattr(conn, "close_pool"):
                conn.close_pool()

    await sync_to_async(close)()


def on_two_loops(provider: Any, call: Callable[[], Awaitable[T]]) -> tuple[T, T]:
    """`call()` on two event loops alive at once (a cached provider used from a second loop),
    then each loop's SDK client closed on its own loop: no session is left open at exit."""
    loops = [asyncio.new_event_loop(), asyncio.new_event_loop()]
    try:
        results = [loop.run_until_complete(call()) for loop in loops]
        for loop in loops:
            loop.run_until_complete(provider.aclose())
            # google-genai's AsyncClient schedules its own aclose() when collected: let it run.
            loop.run_until_complete(asyncio.sleep(0))
    finally:
        for loop in loops:
            loop.close()
    return results[0], results[1]


@pytest.fixture
async def _event_store_pool_closed() -> AsyncIterator[None]:
    """Close the test's event loop's event-store pool before the loop closes.

    A psycopg_pool worker cancelled in the middle of a maintenance task (giving back or adding
    a connection) swallows the cancellation and waits for its next task, so the loop's
    teardown, which cancels every task and waits for them, never ended: a test that failed
    while a batch was being written hung the whole run instead of reporting the failure.
    Closing the pool stops its workers.
    """
    yield
    from loopstate import postgres as pg

    await pg.close_pool()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Every coroutine test (only those: a sync test has no loop of its own to close it on).
    for item in items:
        if asyncio.iscoroutinefunction(getattr(item, "function", None)):
            item.fixturenames.append("_event_store_pool_closed")  # type: ignore[attr-defined]
