"""The official `mcp` client over streamable HTTP against a live daphne: the tools, progress
notifications, the same keys and permissions as REST, and a client that goes away."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx2
import pytest
from asgiref.sync import sync_to_async
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.types import CallToolResult, TextContent

from conversations.models import Conversation
from tests.conftest import requires_postgres, requires_redis
from tests.test_stream_live import KeyMaker, live_env, start_web

pytestmark = [requires_redis, requires_postgres, pytest.mark.slow, pytest.mark.django_db(transaction=True)]

QUESTION = "Should cities ban cars from their centres?"


@pytest.fixture
def web(transactional_db: None, tmp_path: Path) -> Iterator[str]:
    """daphne with agents slow enough (0.3 s a call) for a client to leave mid-run; a run that
    takes longer than 4 s outlives its consult_panel call."""
    process, base = start_web(live_env(SIMULATED_LATENCY="0.3", MCP_WAIT_SECONDS="4"), tmp_path)
    yield base
    process.kill()


@pytest.fixture
def slow_web(transactional_db: None, tmp_path: Path) -> Iterator[str]:
    """daphne whose runs outlive a consult_panel call (1.5 s a call, 1 s of waiting)."""
    process, base = start_web(live_env(SIMULATED_LATENCY="1.5", MCP_WAIT_SECONDS="1"), tmp_path)
    yield base
    process.kill()


@asynccontextmanager
async def connected(base: str, key: str | None) -> AsyncIterator[Client]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    http = httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=120))
    async with http, Client(streamable_http_client(f"{base}/mcp", http_client=http)) as client:
        yield client


async def key(make_key: KeyMaker, *permissions: str) -> str:
    return (await sync_to_async(make_key)(list(permissions)))[1]


def text_of(result: CallToolResult) -> str:
    return " ".join(part.text for part in result.content if isinstance(part, TextContent))


def structured(result: Any) -> Any:
    assert not result.is_error, result.content
    return result.structured_content.get("result", result.structured_content)


async def test_tools_are_listed(make_key: KeyMaker, web: str) -> None:
    async with connected(web, await key(make_key, "read")) as client:
        tools = await client.list_tools()
        panels = structured(await client.call_tool("list_panels", {}))
    assert {t.name for t in tools.tools} == {"consult_panel", "get_conversation", "list_panels"}
    consult = next(t for t in tools.tools if t.name == "consult_panel")
    assert consult.input_schema["required"] == ["question"]
    assert [p["id"] for p in panels] == ["default"]


async def test_consult_panel_reports_progress_and_stores_the_run(make_key: KeyMaker, web: str) -> None:
    raw = await key(make_key, "read", "write")
    steps: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        steps.append((progress, total, message))

    async with connected(web, raw) as client:
        result = await client.call_tool(
            "consult_panel",
            {"question": QUESTION, "num_agents": 2, "turns": 1},
            progress_callback=on_progress,
        )
        body = structured(result)
        conversation = await Conversation.objects.aget(pk=body["conversation_id"])
        again = structured(
            await client.call_tool("get_conversation", {"conversation_id": body["conversation_id"]})
        )
    messages = [m or "" for _, _, m in steps]
    assert sum("answered" in m for m in messages) == 2  # each agent's turn
    assert sum("voted" in m for m in messages) == 2  # the vote
    assert any(m.startswith("consensus") for m in messages)  # the consensus
    assert [v for v, _, _ in steps] == sorted(v for v, _, _ in steps)
    assert body["status"] == conversation.status
    assert body["answer"] == (conversation.consensus_result or None)
    assert body["confidence"] == conversation.confidence
    assert 0 <= body["agreement"] <= 1
    assert len(body["votes"]["ballots"]) == 2
    assert body["cost_usd"] == pytest.approx(conversation.cost_usd)
    assert conversation.owner.startswith("key:")
    assert again["status"] == conversation.status


async def test_refused_without_a_key(web: str) -> None:
    response = httpx2.post(f"{web}/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    with pytest.raises(Exception):  # the client fails however its version reports a 401
        async with connected(web, None) as client:
            await client.list_tools()
    bad = httpx2.post(f"{web}/mcp", json={}, headers={"Authorization": "Bearer pk_not_a_real_key_at_all_123"})
    assert bad.status_code == 401


async def test_a_read_only_key_cannot_consult(make_key: KeyMaker, web: str) -> None:
    async with connected(web, await key(make_key, "read")) as client:
        result = await client.call_tool("consult_panel", {"question": QUESTION})
    assert result.is_error
    assert "permission_denied" in text_of(result)
    assert not await Conversation.objects.aexists()


async def test_a_used_up_quota_is_refused_as_for_chat(make_key: KeyMaker, web: str) -> None:
    _, raw = await sync_to_async(make_key)(["read", "write"], daily_quota=1.0)
    async with connected(web, raw) as client:
        result = await client.call_tool("consult_panel", {"question": QUESTION})
    assert result.is_error
    assert "quota" in text_of(result)
    assert not await Conversation.objects.aexists()


async def test_a_foreign_conversation_is_not_found(make_key: KeyMaker, web: str) -> None:
    async with connected(web, await key(make_key, "read", "write")) as owner:
        body = structured(
            await owner.call_tool("consult_panel", {"question": QUESTION, "num_agents": 1, "turns": 1})
        )
    async with connected(web, await key(make_key, "read", "write")) as stranger:
        result = await stranger.call_tool("get_conversation", {"conversation_id": body["conversation_id"]})
    assert result.is_error
    assert "not found" in text_of(result)


async def test_a_client_that_goes_away_cancels_its_run(make_key: KeyMaker, web: str) -> None:
    raw = await key(make_key, "read", "write")
    first_step = asyncio.Event()

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        first_step.set()

    async def call() -> None:
        async with connected(web, raw) as client:
            await client.call_tool(
                "consult_panel",
                {"question": QUESTION, "num_agents": 3, "turns": 3},
                progress_callback=on_progress,
            )

    task = asyncio.create_task(call())
    await asyncio.wait_for(first_step.wait(), 30)
    task.cancel()  # the client goes away mid-call: its HTTP stream closes
    with pytest.raises(asyncio.CancelledError):
        await task
    deadline = time.monotonic() + 30
    conversation = await Conversation.objects.aget()
    while conversation.status not in Conversation.TERMINAL and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        conversation = await Conversation.objects.aget()
    assert conversation.status == "cancelled"
    assert conversation.turns_completed < 3


async def test_a_run_that_outlives_the_call_is_followed_by_id(make_key: KeyMaker, slow_web: str) -> None:
    async with connected(slow_web, await key(make_key, "read", "write")) as client:
        first = structured(
            await client.call_tool("consult_panel", {"question": QUESTION, "num_agents": 2, "turns": 1})
        )
        assert first["status"] == "running"
        # The run goes on after the call returned, and is not cancelled by the client's leaving.
        deadline = time.monotonic() + 60
        state = first
        while state["status"] in ("running", "pending") and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            state = structured(
                await client.call_tool("get_conversation", {"conversation_id": first["conversation_id"]})
            )
    assert state["status"] in ("completed", "no_consensus")
    assert state["turns_completed"] >= 1


async def test_a_jwt_access_token_works_as_a_key_does(make_key: KeyMaker, web: str) -> None:
    raw = await key(make_key, "read", "write")
    token = httpx2.post(f"{web}/auth/token", json={"api_key": raw}).json()["access"]
    async with connected(web, token) as client:
        body = structured(
            await client.call_tool("consult_panel", {"question": QUESTION, "num_agents": 1, "turns": 1})
        )
    async with connected(web, raw) as client:
        same_owner = structured(
            await client.call_tool("get_conversation", {"conversation_id": body["conversation_id"]})
        )
    assert same_owner["conversation_id"] == body["conversation_id"]
