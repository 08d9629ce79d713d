"""The official `openai` SDK (sync and async, streamed and not) and langchain-openai's ChatOpenAI
against a live daphne: /v1/models and /v1/chat/completions, every error class, a disconnect."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from asgiref.sync import sync_to_async
from langchain_openai import ChatOpenAI

from conversations.models import Conversation
from tests.conftest import requires_postgres, requires_redis
from tests.test_stream_live import KeyMaker, live_env, start_web

pytestmark = [requires_redis, requires_postgres, pytest.mark.slow, pytest.mark.django_db(transaction=True)]

QUESTION = "Should cities ban cars from their centres?"


@pytest.fixture
def web(transactional_db: None, tmp_path: Path) -> Iterator[str]:
    """daphne with agents slow enough (0.2 s a call) for a client to leave mid-run, on a default
    panel that discusses for two turns (the simulated agents then converge on one answer)."""
    process, base = start_web(live_env(SIMULATED_LATENCY="0.2", DEFAULT_TURNS="2"), tmp_path)
    yield base
    process.kill()


def client(base: str, key: str, **kwargs: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, **kwargs)


async def stored(conversation_id: str) -> Conversation:
    return await Conversation.objects.aget(pk=conversation_id)


async def test_models_list_the_panels_a_key_may_use(make_key: KeyMaker, web: str) -> None:
    _, raw = await sync_to_async(make_key)(["read"])
    models = client(web, raw).models.list()
    assert [m.id for m in models.data] == ["default"]
    assert models.data[0].owned_by == "polyagents"
    assert client(web, raw).models.retrieve("default").id == "default"
    with pytest.raises(openai.NotFoundError) as caught:
        client(web, raw).models.retrieve("no-such-panel")
    assert caught.value.code == "model_not_found"


async def test_a_completion_carries_the_stored_answer_and_totals(make_key: KeyMaker, web: str) -> None:
    _, raw = await sync_to_async(make_key)(["read", "write"])
    reply = client(web, raw).chat.completions.create(
        model="default",
        messages=[
            {"role": "system", "content": "Answer for a city council."},
            {"role": "user", "content": QUESTION},
        ],
        user="alice",
    )
    extra = reply.model_extra or {}
    conversation = await stored(extra["polyagents"]["conversation_id"])
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.content == conversation.consensus_result
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == conversation.prompt_tokens
    assert reply.usage.completion_tokens == conversation.completion_tokens
    assert conversation.metadata["user"] == "alice"
    assert extra["polyagents"]["status"] == conversation.status
    assert len(extra["polyagents"]["agents"]) == conversation.num_agents
    assert extra["polyagents"]["votes"]


async def test_a_stream_gives_turns_vote_answer_finish_usage_done(make_key: KeyMaker, web: str) -> None:
    _, raw = await sync_to_async(make_key)(["read", "write"])
    async_client = openai.AsyncOpenAI(base_url=f"{web}/v1", api_key=raw, max_retries=0)
    stream = await async_client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": QUESTION}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    reasoning = [(c.choices[0].delta.model_extra or {}).get("reasoning_content") for c in chunks if c.choices]
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert any(r and "[agent_0, turn 1]" in r for r in reasoning)
    assert any(r and "[vote" in r for r in reasoning)
    # The reasoning comes before the answer, the answer before the finish, the usage last.
    first_content = next(i for i, c in enumerate(chunks) if c.choices and c.choices[0].delta.content)
    assert all(r is None for r in reasoning[first_content:])
    assert finish == ["stop"]
    assert chunks[-1].choices == []
    conversation_id = (chunks[-2].model_extra or {})["polyagents"]["conversation_id"]
    conversation = await stored(conversation_id)
    assert content == conversation.consensus_result
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == conversation.prompt_tokens
    assert chunks[-1].usage.total_tokens == conversation.prompt_tokens + conversation.completion_tokens


async def test_sync_stream_and_async_completion(make_key: KeyMaker, web: str) -> None:
    _, raw = await sync_to_async(make_key)(["read", "write"])
    chunks = list(
        client(web, raw).chat.completions.create(
            model="default", messages=[{"role": "user", "content": QUESTION}], stream=True
        )
    )
    assert chunks[-1].choices[0].finish_reason == "stop"  # no usage chunk unless asked
    async_client = openai.AsyncOpenAI(base_url=f"{web}/v1", api_key=raw, max_retries=0)
    reply = await async_client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": [{"type": "text", "text": QUESTION}]}]
    )
    assert reply.choices[0].message.content


async def test_langchain_chat_openai_invokes_and_streams(make_key: KeyMaker, web: str) -> None:
    _, raw = await sync_to_async(make_key)(["read", "write"])
    llm = ChatOpenAI(model="default", base_url=f"{web}/v1", api_key=raw, max_retries=0)  # type: ignore[arg-type]
    answer = await sync_to_async(llm.invoke)(QUESTION)
    assert isinstance(answer.content, str)
    assert answer.content
    pieces = [piece async for piece in llm.astream(QUESTION)]
    assert "".join(str(p.content) for p in pieces)


async def test_every_error_reaches_the_sdk_as_its_class(make_key: KeyMaker, web: str) -> None:
    _, reader = await sync_to_async(make_key)(["read"])
    _, writer = await sync_to_async(make_key)(["read", "write"], rate_limit_override=1)
    ask = {"model": "default", "messages": [{"role": "user", "content": QUESTION}]}
    with pytest.raises(openai.AuthenticationError) as auth:
        client(web, "pk_not_a_key_at_all_1234567890").chat.completions.create(**ask)  # type: ignore[call-overload]
    assert auth.value.code == "invalid_api_key"
    with pytest.raises(openai.PermissionDeniedError):
        client(web, reader).chat.completions.create(**ask)  # type: ignore[call-overload]
    with pytest.raises(openai.NotFoundError) as missing:
        client(web, writer).chat.completions.create(**{**ask, "model": "nope"})  # type: ignore[call-overload]
    assert missing.value.code == "model_not_found"
    refusals: list[tuple[dict[str, Any], str]] = [
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"n": 2}, "n"),
        ({"seed": 1}, "seed"),
        ({"stop": ["x"]}, "stop"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
         "messages[0].content[0]"),
    ]  # fmt: skip
    for refused, param in refusals:
        with pytest.raises(openai.BadRequestError) as bad:
            client(web, writer).chat.completions.create(**{**ask, **refused})
        assert bad.value.param == param, bad.value.body
    limited_client = client(web, writer)
    for _ in range(30):
        try:
            limited_client.models.list()
        except openai.RateLimitError as exc:
            limited = exc
            break
    else:
        pytest.fail("no 429 in 30 requests at a limit of 1 an hour")
    assert limited.response.headers.get("Retry-After")
    assert limited.code == "rate_limit_exceeded"


async def test_an_exhausted_daily_quota_is_insufficient_quota(make_key: KeyMaker, web: str) -> None:
    _, raw = await sync_to_async(make_key)(["read", "write"], daily_quota=1)
    with pytest.raises(openai.RateLimitError) as caught:
        client(web, raw).chat.completions.create(
            model="default", messages=[{"role": "user", "content": QUESTION}]
        )
    assert caught.value.code == "insufficient_quota"
    assert caught.value.response.headers.get("Retry-After")


async def test_a_client_that_disconnects_mid_stream_cancels_the_run(make_key: KeyMaker, web: str) -> None:
    _, raw = await sync_to_async(make_key)(["read", "write"])
    body = {"model": "default", "messages": [{"role": "user", "content": QUESTION}], "stream": True}
    headers = {"Authorization": f"Bearer {raw}"}
    async with (
        httpx.AsyncClient(base_url=web, timeout=30) as http,
        http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response,
    ):
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if "reasoning_content" in line:
                break  # the agents are talking: leave
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        latest = await Conversation.objects.order_by("-created_at").afirst()
        if latest is not None and latest.status == "cancelled":
            break
        await asyncio.sleep(0.2)
    assert latest is not None
    assert latest.status == "cancelled", latest.status


def readme_block(language: str) -> str:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("\n## Use it from the OpenAI SDK\n", 1)[1]
    return section.split(f"```{language}\n", 1)[1].split("\n```", 1)[0]


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
async def test_the_readme_python_and_curl_work(
    make_key: KeyMaker, web: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _, raw = await sync_to_async(make_key)(["read", "write"])
    code = readme_block("python")
    assert len(code.splitlines()) == 5
    await sync_to_async(exec)(code.replace("http://localhost:8000", web).replace('"pk_..."', repr(raw)), {})
    assert capsys.readouterr().out.strip()
    command = readme_block("bash").replace("\\\n", " ").replace("localhost:8000", web.removeprefix("http://"))
    done = await asyncio.to_thread(
        subprocess.run,
        ["bash", "-c", command],
        env={**os.environ, "KEY": raw},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    events = [line for line in done.stdout.splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]", done.stdout + done.stderr
    assert any("reasoning_content" in e for e in events)
