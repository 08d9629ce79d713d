"""The OpenAI-compatible provider: the real openai client against a fake server."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator

import pytest

from agents.providers.base import GenerationRequest, ProviderError
from agents.providers.openai_compat import OpenAICompatProvider, parse_retry_after
from tests.conftest import on_two_loops
from tests.fakes.openai_server import FakeOpenAI, content_filter, http_error, ok, rate_limited, slow


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


@pytest.fixture
async def compat(fake: FakeOpenAI) -> AsyncIterator[OpenAICompatProvider]:
    provider = OpenAICompatProvider(base_url=fake.api_url, api_key="sk-test", timeout=5)
    yield provider
    await provider.aclose()


def request(**fields: object) -> GenerationRequest:
    values: dict[str, object] = {
        "model": "llama3.2",
        "prompt": "Is water wet?",
        "system_instruction": "You are practical.",
        "temperature": 0.0,
        "max_output_tokens": 128,
    }
    values.update(fields)
    return GenerationRequest(**values)  # type: ignore[arg-type]


async def test_generate_sends_system_and_user_messages(
    fake: FakeOpenAI, compat: OpenAICompatProvider
) -> None:
    fake.script(
        ok("Yes it is.\n\nFINAL POSITION: Yes\nCONFIDENCE: 0.7", prompt_tokens=40, completion_tokens=12)
    )
    generation = await compat.generate(request())
    assert generation.text.startswith("Yes it is.")
    assert generation.provider == "openai"
    assert generation.usage.prompt_tokens == 40
    assert generation.usage.completion_tokens == 12
    assert generation.finish_reason == "stop"
    sent = fake.requests[-1]
    assert sent.headers["authorization"] == "Bearer sk-test"
    assert sent.headers["x-stainless-retry-count"] == "0"
    assert sent.body["model"] == "llama3.2"
    assert sent.body["messages"] == [
        {"role": "system", "content": "You are practical."},
        {"role": "user", "content": "Is water wet?"},
    ]
    assert sent.body["temperature"] == 0
    assert sent.body["max_tokens"] == 128


async def test_without_a_key_the_client_still_starts(fake: FakeOpenAI) -> None:
    provider = OpenAICompatProvider(base_url=fake.api_url, api_key=None, timeout=5)
    await provider.generate(request(system_instruction=""))
    assert fake.requests[-1].body["messages"] == [{"role": "user", "content": "Is water wet?"}]
    await provider.aclose()


async def test_stream_delivers_chunks_and_usage(fake: FakeOpenAI, compat: OpenAICompatProvider) -> None:
    text = "Streaming works in pieces.\n\nFINAL POSITION: Yes\nCONFIDENCE: 0.8"
    fake.script(ok(text, prompt_tokens=9, completion_tokens=21))
    chunks: list[str] = []

    async def on_delta(delta: str) -> None:
        chunks.append(delta)

    generation = await compat.stream(request(), on_delta)
    assert len(chunks) == 3
    assert "".join(chunks) == text == generation.text
    assert generation.usage.completion_tokens == 21
    assert fake.requests[-1].body["stream"] is True
    assert fake.requests[-1].body["stream_options"] == {"include_usage": True}


async def test_rate_limit_carries_retry_after(fake: FakeOpenAI, compat: OpenAICompatProvider) -> None:
    fake.script(rate_limited("0.25"))
    with pytest.raises(ProviderError) as caught:
        await compat.generate(request())
    assert caught.value.kind == "rate_limited"
    assert caught.value.retry_after == 0.25
    assert len(fake.requests) == 1  # max_retries=0: the SDK did not retry


async def test_insufficient_quota_is_not_retryable(fake: FakeOpenAI, compat: OpenAICompatProvider) -> None:
    fake.script(rate_limited(insufficient_quota=True))
    with pytest.raises(ProviderError) as caught:
        await compat.generate(request())
    assert caught.value.kind == "quota_exhausted"
    assert not caught.value.retryable


@pytest.mark.parametrize(
    ("code", "kind"), [(500, "server"), (503, "server"), (400, "bad_request"), (401, "auth"), (403, "auth")]
)
async def test_http_errors_are_classified(
    fake: FakeOpenAI, compat: OpenAICompatProvider, code: int, kind: str
) -> None:
    fake.script(http_error(code))
    with pytest.raises(ProviderError) as caught:
        await compat.generate(request())
    assert caught.value.kind == kind
    assert caught.value.status == code
    assert len(fake.requests) == 1


async def test_stream_errors_are_classified(fake: FakeOpenAI, compat: OpenAICompatProvider) -> None:
    fake.script(http_error(500))

    async def on_delta(delta: str) -> None:
        raise AssertionError("no delta expected")

    with pytest.raises(ProviderError) as caught:
        await compat.stream(request(), on_delta)
    assert caught.value.kind == "server"


async def test_content_filter_is_a_safety_block(fake: FakeOpenAI, compat: OpenAICompatProvider) -> None:
    fake.script(content_filter())
    with pytest.raises(ProviderError) as caught:
        await compat.generate(request())
    assert caught.value.kind == "safety"


async def test_a_streamed_answer_withheld_by_the_filter_is_a_safety_block(
    fake: FakeOpenAI, compat: OpenAICompatProvider
) -> None:
    fake.script(content_filter())

    async def on_delta(delta: str) -> None:
        raise AssertionError("no delta expected")

    with pytest.raises(ProviderError) as caught:
        await compat.stream(request(), on_delta)
    assert (caught.value.kind, str(caught.value)) == ("safety", "openai filtered the answer: content_filter")


async def test_slow_answer_times_out(fake: FakeOpenAI, compat: OpenAICompatProvider) -> None:
    fake.script(slow(3))
    started = time.monotonic()
    with pytest.raises(ProviderError) as caught:
        await compat.generate(request(timeout=0.3))
    assert caught.value.kind == "timeout"
    assert time.monotonic() - started < 2


async def test_list_models(compat: OpenAICompatProvider) -> None:
    assert await compat.list_models() == ["llama3.2", "qwen2.5"]


def test_parse_retry_after() -> None:
    assert parse_retry_after({"retry-after-ms": "1500"}) == 1.5
    assert parse_retry_after({"retry-after": "2"}) == 2.0
    assert parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0
    assert parse_retry_after({"retry-after": "later"}) is None
    assert parse_retry_after({}) is None


def test_a_cached_provider_works_from_another_event_loop(fake: FakeOpenAI) -> None:
    provider = OpenAICompatProvider(base_url=fake.api_url, api_key="k", timeout=5)
    first, second = on_two_loops(provider, lambda: provider.generate(request()))  # a new SDK client each
    assert first.text == second.text
    assert len(fake.requests) == 2
