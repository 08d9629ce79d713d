"""Retries, per-call timeout, circuit breakers and model fallback around real provider calls."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from datetime import datetime

import pytest
from django.conf import settings
from prometheus_client import REGISTRY

from agents import resilience
from agents.providers.base import DeltaCallback, Generation, GenerationRequest, ProviderError
from agents.providers.gemini import GeminiProvider
from agents.providers.simulated import SimulatedProvider
from agents.resilience import breaker_snapshot, call_with_resilience, get_breaker, reset_breakers
from tests.fakes.gemini_server import (
    FakeGemini,
    http_error,
    ok,
    per_day_quota,
    rate_limited,
    safety_block,
    slow,
)

THRESHOLD = 3
OPEN_FOR = 30.0


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Iterator[FakeClock]:
    fake_clock = FakeClock()
    reset_breakers(clock=fake_clock)
    yield fake_clock
    reset_breakers()


@pytest.fixture(autouse=True)
def resilience_config(monkeypatch: pytest.MonkeyPatch, clock: FakeClock) -> None:
    """Small delays so the suite stays fast; everything else as in production."""
    monkeypatch.setattr(
        settings,
        "CONFIG",
        settings.CONFIG.model_copy(
            update={
                "RETRY_MAX_ATTEMPTS": 3,
                "RETRY_BASE_DELAY": 0.01,
                "RETRY_MAX_DELAY": 0.5,
                "CIRCUIT_BREAKER_FAILURE_THRESHOLD": THRESHOLD,
                "CIRCUIT_BREAKER_TIMEOUT": OPEN_FOR,
                "AGENT_CALL_TIMEOUT": 5.0,
            }
        ),
    )


def configure(monkeypatch: pytest.MonkeyPatch, **values: object) -> None:
    monkeypatch.setattr(settings, "CONFIG", settings.CONFIG.model_copy(update=values))


@pytest.fixture
def fake() -> Iterator[FakeGemini]:
    with FakeGemini() as server:
        yield server


@pytest.fixture
async def gemini(fake: FakeGemini) -> AsyncIterator[GeminiProvider]:
    provider = GeminiProvider(api_key="test-key", base_url=fake.base_url, timeout=5)
    yield provider
    await provider.aclose()


def request(model: str = "gemini-a") -> GenerationRequest:
    return GenerationRequest(model=model, prompt="Is it?", temperature=0.2)


def calls_to(fake: FakeGemini, model: str) -> int:
    return sum(1 for called, _ in fake.generate_calls if called == model)


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# -- retries -------------------------------------------------------------------------


async def test_rate_limit_is_retried_after_the_retry_info_delay(
    fake: FakeGemini, gemini: GeminiProvider
) -> None:
    fake.script(rate_limited("0.3s"), ok("after the wait"))
    started = time.monotonic()
    generation = await call_with_resilience(gemini, request())
    elapsed = time.monotonic() - started
    assert generation.text == "after the wait"
    assert calls_to(fake, "gemini-a") == 2
    assert 0.3 <= elapsed < 1.5


async def test_retry_after_is_capped_by_retry_max_delay(fake: FakeGemini, gemini: GeminiProvider) -> None:
    fake.script(rate_limited("30s"), ok("capped"))
    started = time.monotonic()
    assert (await call_with_resilience(gemini, request())).text == "capped"
    assert 0.5 <= time.monotonic() - started < 2


async def test_per_day_quota_is_not_retried(fake: FakeGemini, gemini: GeminiProvider) -> None:
    fake.script(per_day_quota(), ok("never reached"))
    with pytest.raises(ProviderError) as caught:
        await call_with_resilience(gemini, request())
    assert caught.value.kind == "quota_exhausted"
    assert calls_to(fake, "gemini-a") == 1


async def test_server_errors_are_retried_then_succeed(fake: FakeGemini, gemini: GeminiProvider) -> None:
    fake.script(http_error(500), http_error(503), ok("third time lucky"))
    generation = await call_with_resilience(gemini, request())
    assert generation.text == "third time lucky"
    assert calls_to(fake, "gemini-a") == 3
    assert get_breaker("gemini", "gemini-a").failure_count == 0  # a success resets the count


async def test_attempts_stop_at_retry_max_attempts(fake: FakeGemini, gemini: GeminiProvider) -> None:
    fake.always(http_error(503))
    with pytest.raises(ProviderError) as caught:
        await call_with_resilience(gemini, request())
    assert caught.value.kind == "server"
    assert calls_to(fake, "gemini-a") == settings.CONFIG.RETRY_MAX_ATTEMPTS


@pytest.mark.parametrize("code", [400, 401, 403, 404])
async def test_client_errors_are_not_retried_and_never_trip_the_breaker(
    fake: FakeGemini, gemini: GeminiProvider, code: int
) -> None:
    fake.always(http_error(code))
    for _ in range(THRESHOLD + 2):
        with pytest.raises(ProviderError) as caught:
            await call_with_resilience(gemini, request())
        assert caught.value.kind in {"bad_request", "auth"}
    assert calls_to(fake, "gemini-a") == THRESHOLD + 2  # one request per call, all let through
    assert get_breaker("gemini", "gemini-a").state == "closed"


async def test_safety_block_is_final_and_does_not_fall_back(fake: FakeGemini, gemini: GeminiProvider) -> None:
    fake.script(safety_block())
    with pytest.raises(ProviderError) as caught:
        await call_with_resilience(gemini, request(), fallback_models=["gemini-b"])
    assert caught.value.kind == "safety"
    assert calls_to(fake, "gemini-a") == 1
    assert calls_to(fake, "gemini-b") == 0


# -- timeouts and deadline -----------------------------------------------------------------


async def test_slow_answer_times_out_at_agent_call_timeout(
    fake: FakeGemini, gemini: GeminiProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    configure(monkeypatch, AGENT_CALL_TIMEOUT=0.3, RETRY_MAX_ATTEMPTS=1)
    fake.script(slow(3))
    started = time.monotonic()
    with pytest.raises(ProviderError) as caught:
        await call_with_resilience(gemini, request())
    assert caught.value.kind == "timeout"
    assert time.monotonic() - started < 1.5
    assert get_breaker("gemini", "gemini-a").failure_count == 1  # a full timeout counts


async def test_deadline_bounds_the_call_and_its_retries(fake: FakeGemini, gemini: GeminiProvider) -> None:
    fake.always(slow(10))
    started = time.monotonic()
    with pytest.raises(ProviderError) as caught:
        await call_with_resilience(gemini, request(), deadline=started + 0.4)
    assert caught.value.kind == "timeout"
    # Cut by the deadline, long before the 10 s answer (the margin absorbs a loaded machine).
    assert time.monotonic() - started < 3
    assert calls_to(fake, "gemini-a") == 1
    assert get_breaker("gemini", "gemini-a").failure_count == 0  # cut by the deadline: no verdict


async def test_a_wait_that_would_pass_the_deadline_gives_up_at_once(
    fake: FakeGemini, gemini: GeminiProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    configure(monkeypatch, RETRY_MAX_DELAY=10.0)
    fake.script(rate_limited("5s"), ok("too late"))
    started = time.monotonic()
    with pytest.raises(ProviderError) as caught:
        await call_with_resilience(gemini, request(), deadline=started + 2)
    assert caught.value.kind == "rate_limited"
    assert time.monotonic() - started < 1
    assert calls_to(fake, "gemini-a") == 1


async def test_a_passed_deadline_makes_no_call(fake: FakeGemini, gemini: GeminiProvider) -> None:
    with pytest.raises(ProviderError) as caught:
        await call_with_resilience(gemini, request(), deadline=time.monotonic() - 1)
    assert caught.value.kind == "timeout"
    assert fake.generate_calls == []


# -- circuit breaker ---------------------------------------------------------------------


async def test_breaker_opens_refuses_half_opens_and_closes(
    fake: FakeGemini, gemini: GeminiProvider, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    configure(monkeypatch, RETRY_MAX_ATTEMPTS=1)
    breaker = get_breaker("gemini", "gemini-a")
    fake.always(http_error(503))
    for _ in range(THRESHOLD):
        with pytest.raises(ProviderError):
            await call_with_resilience(gemini, request())
    assert breaker.state == "open"
    assert breaker.failure_count == THRESHOLD

    refused_before = metric(
        "polyagents_llm_calls_total", provider="gemini", model="gemini-a", outcome="circuit_open"
    )
    with pytest.raises(ProviderError) as caught:
        await call_with_resilience(gemini, request())
    assert caught.value.kind == "circuit_open"
    assert calls_to(fake, "gemini-a") == THRESHOLD  # refused without a request
    refused_after = metric(
        "polyagents_llm_calls_total", provider="gemini", model="gemini-a", outcome="circuit_open"
    )
    assert refused_after == refused_before + 1

    clock.advance(OPEN_FOR - 1)
    assert breaker.state == "open"
    clock.advance(1)
    assert breaker.state == "half_open"
    assert breaker.allow()  # the one trial call
    assert not breaker.allow()  # nobody else while it runs
    breaker.release()

    fake.always(ok("back"))
    assert (await call_with_resilience(gemini, request())).text == "back"
    assert breaker.state == "closed"
    assert breaker.failure_count == 0


async def test_a_failed_trial_reopens_the_breaker(
    fake: FakeGemini, gemini: GeminiProvider, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    configure(monkeypatch, RETRY_MAX_ATTEMPTS=1)
    breaker = get_breaker("gemini", "gemini-a")
    fake.always(http_error(500))
    for _ in range(THRESHOLD):
        with pytest.raises(ProviderError):
            await call_with_resilience(gemini, request())
    clock.advance(OPEN_FOR)
    assert breaker.state == "half_open"
    with pytest.raises(ProviderError) as caught:
        await call_with_resilience(gemini, request())
    assert caught.value.kind == "server"
    assert breaker.state == "open"
    assert calls_to(fake, "gemini-a") == THRESHOLD + 1


async def test_breaker_counts_consecutive_failures_only(
    fake: FakeGemini, gemini: GeminiProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    configure(monkeypatch, RETRY_MAX_ATTEMPTS=1)
    fake.script(http_error(503), http_error(503), ok(), http_error(503), http_error(503), ok())
    outcomes = []
    for _ in range(6):
        try:
            await call_with_resilience(gemini, request())
            outcomes.append("ok")
        except ProviderError as exc:
            outcomes.append(exc.kind)
    assert outcomes == ["server", "server", "ok", "server", "server", "ok"]
    assert get_breaker("gemini", "gemini-a").state == "closed"


async def test_breaker_snapshot_for_statistics(
    fake: FakeGemini, gemini: GeminiProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    configure(monkeypatch, RETRY_MAX_ATTEMPTS=1)
    fake.script(http_error(500))
    with pytest.raises(ProviderError):
        await call_with_resilience(gemini, request())
    await call_with_resilience(gemini, request("gemini-b"))
    snapshot = breaker_snapshot()
    assert set(snapshot) == {"gemini:gemini-a", "gemini:gemini-b"}
    assert snapshot["gemini:gemini-a"]["state"] == "closed"
    assert snapshot["gemini:gemini-a"]["failure_count"] == 1
    last_failure = snapshot["gemini:gemini-a"]["last_failure_time"]
    assert isinstance(last_failure, str)
    assert datetime.fromisoformat(last_failure).tzinfo is not None
    assert snapshot["gemini:gemini-b"] == {"state": "closed", "failure_count": 0, "last_failure_time": None}


# -- fallback ----------------------------------------------------------------------------


async def test_a_failing_model_falls_back_to_the_next(fake: FakeGemini, gemini: GeminiProvider) -> None:
    fake.always(http_error(503), model="gemini-a")
    fake.always(ok("from b"), model="gemini-b")
    generation = await call_with_resilience(gemini, request(), fallback_models=["gemini-b", "gemini-c"])
    assert generation.text == "from b"
    assert generation.model == "gemini-b"
    assert calls_to(fake, "gemini-a") == settings.CONFIG.RETRY_MAX_ATTEMPTS
    assert calls_to(fake, "gemini-c") == 0


async def test_an_open_breaker_sends_calls_straight_to_the_fallback(
    fake: FakeGemini, gemini: GeminiProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    configure(monkeypatch, RETRY_MAX_ATTEMPTS=1)
    fake.always(http_error(500), model="gemini-a")
    for _ in range(THRESHOLD):
        await call_with_resilience(gemini, request(), fallback_models=["gemini-b"])
    assert get_breaker("gemini", "gemini-a").state == "open"
    generation = await call_with_resilience(gemini, request(), fallback_models=["gemini-b"])
    assert generation.model == "gemini-b"
    assert calls_to(fake, "gemini-a") == THRESHOLD


async def test_a_per_day_quota_falls_back_to_the_next_model(fake: FakeGemini, gemini: GeminiProvider) -> None:
    fake.script(per_day_quota(), model="gemini-a")
    generation = await call_with_resilience(gemini, request(), fallback_models=["gemini-b"])
    assert generation.model == "gemini-b"
    assert calls_to(fake, "gemini-a") == 1


async def test_when_every_model_fails_the_last_error_is_raised(
    fake: FakeGemini, gemini: GeminiProvider
) -> None:
    fake.always(http_error(503))
    with pytest.raises(ProviderError) as caught:
        await call_with_resilience(gemini, request(), fallback_models=["gemini-b"])
    assert caught.value.kind == "server"
    assert caught.value.model == "gemini-b"


# -- streaming ---------------------------------------------------------------------------


async def test_stream_is_retried_while_nothing_was_emitted(fake: FakeGemini, gemini: GeminiProvider) -> None:
    text = "Streamed after a retry.\n\nFINAL POSITION: Yes\nCONFIDENCE: 0.9"
    fake.script(http_error(503), ok(text))
    chunks: list[str] = []

    async def on_delta(delta: str) -> None:
        chunks.append(delta)

    generation = await call_with_resilience(gemini, request(), on_delta=on_delta)
    assert "".join(chunks) == text == generation.text
    assert calls_to(fake, "gemini-a") == 2


async def test_stream_failing_after_a_delta_is_not_retried() -> None:
    class Chunked(SimulatedProvider):
        """Simulated answer whose stream breaks after the first chunk (a dropped connection)."""

        async def stream(self, request: GenerationRequest, on_delta: DeltaCallback) -> Generation:
            await on_delta("partial ")
            raise ProviderError("connection dropped", kind="connection", provider=self.name)

    provider = Chunked(latency=0)
    chunks: list[str] = []

    async def on_delta(delta: str) -> None:
        chunks.append(delta)

    with pytest.raises(ProviderError) as caught:
        await call_with_resilience(provider, request(), fallback_models=["gemini-b"], on_delta=on_delta)
    assert caught.value.kind == "connection"
    assert chunks == ["partial "]  # no second attempt, no fallback: listeners never see text twice


# -- metrics -----------------------------------------------------------------------------


async def test_calls_latency_and_tokens_are_counted(fake: FakeGemini, gemini: GeminiProvider) -> None:
    labels = {"provider": "gemini", "model": "gemini-m"}
    before_ok = metric("polyagents_llm_calls_total", **labels, outcome="ok")
    before_err = metric("polyagents_llm_calls_total", **labels, outcome="server")
    before_tokens = metric("polyagents_llm_tokens_total", **labels, kind="completion")
    before_latency = metric("polyagents_llm_call_duration_seconds_count", **labels)
    fake.script(http_error(500), ok("x", output_tokens=7))
    await call_with_resilience(gemini, request("gemini-m"))
    assert metric("polyagents_llm_calls_total", **labels, outcome="ok") == before_ok + 1
    assert metric("polyagents_llm_calls_total", **labels, outcome="server") == before_err + 1
    assert metric("polyagents_llm_tokens_total", **labels, kind="completion") == before_tokens + 7
    assert metric("polyagents_llm_call_duration_seconds_count", **labels) == before_latency + 2
    assert metric("polyagents_circuit_breaker_state", breaker="gemini:gemini-m") == 0


async def test_simulated_failures_are_retried_into_a_success(monkeypatch: pytest.MonkeyPatch) -> None:
    configure(monkeypatch, RETRY_MAX_ATTEMPTS=10)
    provider = SimulatedProvider(latency=0, failure_rate=0.5)
    generation = await call_with_resilience(
        provider, GenerationRequest(model="sim", prompt="Is it?", metadata={"agent_id": "a1", "turn": 1})
    )
    assert generation.simulated is True
    assert "FINAL POSITION:" in generation.text


async def test_a_cancelled_trial_call_frees_the_half_open_slot(
    fake: FakeGemini, gemini: GeminiProvider, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    configure(monkeypatch, RETRY_MAX_ATTEMPTS=1)
    breaker = get_breaker("gemini", "gemini-a")
    fake.always(http_error(503))
    for _ in range(THRESHOLD):
        with pytest.raises(ProviderError):
            await call_with_resilience(gemini, request())
    clock.advance(OPEN_FOR)
    fake.always(slow(3))
    task = asyncio.create_task(call_with_resilience(gemini, request()))
    for _ in range(200):  # until the trial request reached the server
        if calls_to(fake, "gemini-a") == THRESHOLD + 1:
            break
        await asyncio.sleep(0.01)
    assert not breaker.allow()  # the trial is running
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert breaker.state == "half_open"
    assert breaker.allow()  # the slot is free again


async def test_waits_without_retry_after_use_full_jitter(
    fake: FakeGemini, gemini: GeminiProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    configure(
        monkeypatch,
        RETRY_BASE_DELAY=1.0,
        RETRY_MAX_DELAY=4.0,
        RETRY_MAX_ATTEMPTS=4,
        CIRCUIT_BREAKER_FAILURE_THRESHOLD=99,
    )
    waits: list[float] = []

    async def record(seconds: float) -> None:
        waits.append(seconds)

    monkeypatch.setattr(resilience, "_sleep", record)
    for _ in range(5):
        fake.script(http_error(503), http_error(503), http_error(503), ok())
        await call_with_resilience(gemini, request())
    assert len(waits) == 15
    first, second, third = waits[0::3], waits[1::3], waits[2::3]
    assert all(0 <= w <= 1.0 for w in first)  # uniform in [0, base * 2^0]
    assert all(0 <= w <= 2.0 for w in second)  # uniform in [0, base * 2^1]
    assert all(0 <= w <= 4.0 for w in third)  # capped by RETRY_MAX_DELAY
    assert len(set(waits)) == len(waits)  # random, not a fixed schedule


async def test_retry_after_replaces_the_jitter_wait(
    fake: FakeGemini, gemini: GeminiProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    configure(monkeypatch, RETRY_MAX_DELAY=60.0)
    waits: list[float] = []

    async def record(seconds: float) -> None:
        waits.append(seconds)

    monkeypatch.setattr(resilience, "_sleep", record)
    fake.script(rate_limited("37s"), ok("done"))
    assert (await call_with_resilience(gemini, request())).text == "done"
    assert waits == [37.0]
