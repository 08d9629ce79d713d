"""The Gemini provider: the real google-genai client against a fake Gemini REST server."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest

from agents.providers.base import GenerationRequest, ProviderError
from agents.providers.gemini import GeminiProvider, parse_duration
from tests.conftest import on_two_loops
from tests.fakes.gemini_server import (
    FakeGemini,
    http_error,
    ok,
    per_day_quota,
    rate_limited,
    safety_block,
    slow,
)


@pytest.fixture
def fake() -> Iterator[FakeGemini]:
    with FakeGemini() as server:
        yield server


@pytest.fixture
async def gemini(fake: FakeGemini) -> AsyncIterator[GeminiProvider]:
    provider = GeminiProvider(api_key="test-gemini-key", base_url=fake.base_url, timeout=5)
    yield provider
    await provider.aclose()


def request(**fields: object) -> GenerationRequest:
    values: dict[str, object] = {
        "model": "gemini-2.5-flash",
        "prompt": "Is water wet?",
        "system_instruction": "You are a critical thinker.",
        "temperature": 0.0,
        "max_output_tokens": 256,
    }
    values.update(fields)
    return GenerationRequest(**values)  # type: ignore[arg-type]


async def test_generate_sends_model_system_instruction_temperature_and_key(
    fake: FakeGemini, gemini: GeminiProvider
) -> None:
    fake.script(ok("Wet enough.\n\nFINAL POSITION: Yes\nCONFIDENCE: 0.9", prompt_tokens=21, output_tokens=8))
    generation = await gemini.generate(request())
    assert generation.text.endswith("CONFIDENCE: 0.9")
    assert generation.provider == "gemini"
    assert generation.model == "gemini-2.5-flash"
    assert generation.simulated is False
    assert generation.usage.prompt_tokens == 21
    assert generation.usage.completion_tokens == 8
    assert generation.finish_reason == "STOP"
    assert generation.latency_ms > 0
    [(model, sent)] = fake.generate_calls
    assert model == "gemini-2.5-flash"
    assert sent.path.endswith(":generateContent")
    assert sent.headers["x-goog-api-key"] == "test-gemini-key"
    assert sent.body["contents"][0]["parts"][0]["text"] == "Is water wet?"
    assert sent.body["systemInstruction"]["parts"][0]["text"] == "You are a critical thinker."
    config = sent.body["generationConfig"]
    assert config["temperature"] == 0  # zero is sent, not dropped as "unset"
    assert "temperature" in config
    assert config["maxOutputTokens"] == 256


async def test_warm_up_runs_the_sdk_in_memory_without_calling_the_server(
    fake: FakeGemini, gemini: GeminiProvider
) -> None:
    await gemini.warm_up()
    assert fake.generate_calls == []
    fake.script(ok("Warm.\n\nFINAL POSITION: Yes\nCONFIDENCE: 0.9"))
    assert (await gemini.generate(request())).text.startswith("Warm.")  # the real client is untouched


async def test_a_call_logs_no_line_of_its_own(
    fake: FakeGemini, gemini: GeminiProvider, caplog: pytest.LogCaptureFixture
) -> None:
    """At the default INFO level, httpx would log each LLM call ("HTTP Request: POST ...")."""
    caplog.set_level(logging.INFO)
    await gemini.generate(request())
    assert [r.getMessage() for r in caplog.records if r.name.startswith(("httpx", "google"))] == []


async def test_thinking_tokens_count_as_completion_tokens(fake: FakeGemini, gemini: GeminiProvider) -> None:
    fake.script(ok("x", prompt_tokens=5, output_tokens=3, thought_tokens=40))
    generation = await gemini.generate(request())
    assert generation.usage.completion_tokens == 43


async def test_stream_delivers_chunks_and_usage(fake: FakeGemini, gemini: GeminiProvider) -> None:
    text = "First part. Second part. Third part.\n\nFINAL POSITION: No\nCONFIDENCE: 0.6"
    fake.script(ok(text, prompt_tokens=30, output_tokens=17))
    chunks: list[str] = []

    async def on_delta(delta: str) -> None:
        chunks.append(delta)

    generation = await gemini.stream(request(), on_delta)
    assert len(chunks) == 3
    assert "".join(chunks) == text == generation.text
    assert generation.usage.prompt_tokens == 30
    assert generation.usage.completion_tokens == 17
    [(_, sent)] = fake.generate_calls
    assert sent.path.endswith(":streamGenerateContent")
    assert sent.query["alt"] == ["sse"]


async def test_rate_limit_carries_the_retry_info_delay(fake: FakeGemini, gemini: GeminiProvider) -> None:
    fake.script(rate_limited("37s"))
    with pytest.raises(ProviderError) as caught:
        await gemini.generate(request())
    assert caught.value.kind == "rate_limited"
    assert caught.value.retry_after == 37.0
    assert caught.value.status == 429
    assert caught.value.retryable


async def test_per_day_quota_is_not_retryable(fake: FakeGemini, gemini: GeminiProvider) -> None:
    fake.script(per_day_quota())
    with pytest.raises(ProviderError) as caught:
        await gemini.generate(request())
    assert caught.value.kind == "quota_exhausted"
    assert not caught.value.retryable


@pytest.mark.parametrize(
    ("code", "kind", "retryable"),
    [
        (500, "server", True),
        (503, "server", True),
        (400, "bad_request", False),
        (404, "bad_request", False),
        (401, "auth", False),
        (403, "auth", False),
    ],
)
async def test_http_errors_are_classified(
    fake: FakeGemini, gemini: GeminiProvider, code: int, kind: str, retryable: bool
) -> None:
    fake.script(http_error(code))
    with pytest.raises(ProviderError) as caught:
        await gemini.generate(request())
    assert caught.value.kind == kind
    assert caught.value.status == code
    assert caught.value.retryable is retryable
    assert len(fake.generate_calls) == 1  # the SDK did not retry on its own


async def test_stream_errors_are_classified_too(fake: FakeGemini, gemini: GeminiProvider) -> None:
    fake.script(http_error(503))

    async def on_delta(delta: str) -> None:
        raise AssertionError("no delta expected")

    with pytest.raises(ProviderError) as caught:
        await gemini.stream(request(), on_delta)
    assert caught.value.kind == "server"


@pytest.mark.parametrize("where", ["prompt", "candidate"])
async def test_safety_block_is_reported_as_such(fake: FakeGemini, gemini: GeminiProvider, where: str) -> None:
    fake.script(safety_block(where=where), safety_block(where=where))
    with pytest.raises(ProviderError) as caught:
        await gemini.generate(request())
    assert caught.value.kind == "safety"
    assert not caught.value.counts_against_breaker

    async def on_delta(delta: str) -> None:
        return None

    with pytest.raises(ProviderError) as streamed:
        await gemini.stream(request(), on_delta)
    assert streamed.value.kind == "safety"
    blocked = "the prompt: SAFETY" if where == "prompt" else "the answer: SAFETY"
    assert str(caught.value) == str(streamed.value) == f"gemini blocked {blocked}"


async def test_slow_answer_times_out(fake: FakeGemini, gemini: GeminiProvider) -> None:
    fake.script(slow(3))
    started = time.monotonic()
    with pytest.raises(ProviderError) as caught:
        await gemini.generate(request(timeout=0.3))
    assert caught.value.kind == "timeout"
    assert time.monotonic() - started < 2


async def test_unreachable_server_is_a_connection_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    provider = GeminiProvider(api_key="k", base_url=f"http://127.0.0.1:{port}", timeout=2)
    with pytest.raises(ProviderError) as caught:
        await provider.generate(request())
    assert caught.value.kind == "connection"
    await provider.aclose()


async def test_list_models_for_the_health_check(fake: FakeGemini, gemini: GeminiProvider) -> None:
    assert await gemini.list_models() == ["gemini-2.5-flash", "gemini-2.5-pro", "gemini-2.0-flash"]
    assert fake.requests[-1].headers["x-goog-api-key"] == "test-gemini-key"


def test_parse_duration() -> None:
    assert parse_duration("37s") == 37.0
    assert parse_duration("0.2s") == 0.2
    assert parse_duration("soon") is None
    assert parse_duration(None) is None


def test_a_cached_provider_works_from_another_event_loop(fake: FakeGemini) -> None:
    provider = GeminiProvider(api_key="k", base_url=fake.base_url, timeout=5)
    first, second = on_two_loops(provider, lambda: provider.generate(request()))  # a new SDK client each
    assert first.text == second.text
    assert len(fake.generate_calls) == 2


async def test_calls_go_through_aiohttp_and_aclose_releases_the_session(fake: FakeGemini) -> None:
    """The SDK's httpx client runs on aiohttp's pool; closing the provider closes that session
    (the SDK does not close a client it was given: a command's loop would end with it open)."""
    provider = GeminiProvider(api_key="test-gemini-key", base_url=fake.base_url, timeout=5)
    await provider.generate(request())
    transport = provider._transports.get()._transport
    session = transport.client
    assert isinstance(session, aiohttp.ClientSession)
    assert not session.closed
    await provider.aclose()
    assert session.closed


def test_sdk_clients_share_the_process_tls_context(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading the CA bundle costs ~50 ms: google-genai would do it twice per client (one client
    per event loop) and the aiohttp transport once more; they share one context instead."""
    import ssl

    from agents.providers.loops import tls_context

    tls_context()
    made: list[object] = []
    real = ssl.create_default_context

    def counted(*args: object, **kwargs: object) -> ssl.SSLContext:
        made.append(args)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ssl, "create_default_context", counted)
    provider = GeminiProvider(api_key="k", base_url="http://127.0.0.1:9")

    async def build() -> None:
        provider._clients.get()
        await provider.aclose()

    asyncio.run(build())
    asyncio.run(build())
    assert made == []


async def test_the_sdk_transport_runs_more_than_a_hundred_calls_at_once() -> None:
    """No cap on connections to a vendor: aiohttp's default of 100 made 300 calls at once (100
    /chat conversations) run in three waves. The server answers only once 150 requests are in."""
    from agents.providers.loops import aiohttp_transport

    calls = 150
    arrived = 0
    all_in = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal arrived
        await reader.readuntil(b"\r\n\r\n")
        arrived += 1
        if arrived == calls:
            all_in.set()
        try:
            await asyncio.wait_for(all_in.wait(), 10)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = aiohttp_transport()
    try:
        replies = await asyncio.gather(
            *(client.get(f"http://127.0.0.1:{port}/", timeout=15) for _ in range(calls))
        )
    finally:
        await client.aclose()
        server.close()
    assert [reply.text for reply in replies] == ["ok"] * calls
    assert arrived == calls
