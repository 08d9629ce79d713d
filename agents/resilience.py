"""The one retry layer around provider calls: retries, per-call timeout, breakers, fallback.

`call_with_resilience` runs one request through, for each model of its chain in turn:
a circuit breaker per (provider, model), tenacity retries with full jitter (a vendor's
retry-after honoured instead of the jitter), a per-call timeout of
min(AGENT_CALL_TIMEOUT, time left before the deadline), and never a wait that would end
past the deadline. A model whose breaker is open, or that kept failing with a retryable
error (or a per-day quota), hands over to the next model of `fallback_models`.

Streaming: a call is retried (or handed to the next model) only while it has emitted no
delta; once text went out, a failure is final, so listeners never see text twice.

The breaker is written here rather than taken from pybreaker 1.4.1 because pybreaker's
async support needs tornado and it reads the wall clock (`datetime.now`) directly, so a
test cannot inject a clock; this one is ~60 lines with the same consecutive-failure rule.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Literal

from django.conf import settings
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_any,
    wait_random_exponential,
)
from tenacity.stop import stop_base

from agents.pricing import call_cost
from agents.providers.base import DeltaCallback, Generation, GenerationRequest, Provider, ProviderError
from telemetry.metrics import BREAKER_STATE, LLM_CALLS, LLM_COST, LLM_LATENCY, LLM_TOKENS

logger = logging.getLogger(__name__)

BreakerState = Literal["closed", "open", "half_open"]
STATE_GAUGE = {"closed": 0, "half_open": 1, "open": 2}
# Kinds that hand the request to the next model of the chain (after retries, if any).
FALLBACK_KINDS = frozenset(
    {"rate_limited", "server", "timeout", "connection", "circuit_open", "quota_exhausted"}
)


class CircuitBreaker:
    """Counts consecutive failures of one (provider, model); open, then half-open, then closed."""

    def __init__(
        self, name: str, *, failure_threshold: int, reset_timeout: float, clock: Callable[[], float]
    ) -> None:
        self.name = name
        self.failure_threshold = failure_threshold
        self.reset_timeout = reset_timeout
        self.clock = clock
        self.failure_count = 0
        self.last_failure_time: datetime | None = None
        self._state: BreakerState = "closed"
        self._opened_at = 0.0
        self._trial_running = False
        self._lock = threading.Lock()
        BREAKER_STATE.labels(name).set(0)

    @property
    def state(self) -> BreakerState:
        """The current state; an open breaker turns half-open once its timeout has passed."""
        with self._lock:
            return self._current()

    def _current(self) -> BreakerState:
        if self._state == "open" and self.clock() - self._opened_at >= self.reset_timeout:
            self._set("half_open")
            self._trial_running = False
        return self._state

    def _set(self, state: BreakerState) -> None:
        if state != self._state:
            logger.info("circuit breaker %s: %s -> %s", self.name, self._state, state)
        self._state = state
        BREAKER_STATE.labels(self.name).set(STATE_GAUGE[state])

    def allow(self) -> bool:
        """Whether a call may go through now (half-open lets exactly one trial call through)."""
        with self._lock:
            state = self._current()
            if state == "closed":
                return True
            if state == "half_open" and not self._trial_running:
                self._trial_running = True
                return True
            return False

    def record_success(self) -> None:
        """The service answered: close and forget past failures."""
        with self._lock:
            self.failure_count = 0
            self._trial_running = False
            self._set("closed")

    def record_failure(self, error: ProviderError) -> None:
        """Count a failure of the service; a failure of our request (4xx, safety) counts as an answer."""
        if not error.counts_against_breaker:
            self.record_success()  # the service is up and answering (pybreaker's excluded errors)
            return
        with self._lock:
            self.failure_count += 1
            self.last_failure_time = datetime.now(UTC)
            self._trial_running = False
            if self._state == "half_open" or self.failure_count >= self.failure_threshold:
                self._opened_at = self.clock()
                self._set("open")

    def release(self) -> None:
        """A call ended without an outcome (cancelled): free the half-open trial slot."""
        with self._lock:
            self._trial_running = False

    def snapshot(self) -> dict[str, object]:
        """State and counts for GET /statistics."""
        with self._lock:
            return {
                "state": self._current(),
                "failure_count": self.failure_count,
                "last_failure_time": self.last_failure_time.isoformat() if self.last_failure_time else None,
            }


_breakers: dict[str, CircuitBreaker] = {}
_breakers_lock = threading.Lock()
_clock: Callable[[], float] = time.monotonic
_sleep: Callable[[float], Awaitable[None]] = asyncio.sleep


def get_breaker(provider: str, model: str) -> CircuitBreaker:
    """The breaker of one (provider, model), created on first use from the CIRCUIT_BREAKER_* settings."""
    name = f"{provider}:{model}"
    with _breakers_lock:
        breaker = _breakers.get(name)
        if breaker is None:
            config = settings.CONFIG
            breaker = _breakers[name] = CircuitBreaker(
                name,
                failure_threshold=config.CIRCUIT_BREAKER_FAILURE_THRESHOLD,
                reset_timeout=config.CIRCUIT_BREAKER_TIMEOUT,
                clock=_clock,
            )
        return breaker


def breaker_snapshot() -> dict[str, dict[str, object]]:
    """{"provider:model": {"state", "failure_count", "last_failure_time"}} of every breaker used so far."""
    with _breakers_lock:
        breakers = list(_breakers.values())
    return {breaker.name: breaker.snapshot() for breaker in sorted(breakers, key=lambda b: b.name)}


def reset_breakers(*, clock: Callable[[], float] | None = None) -> None:
    """Forget every breaker; tests pass a fake `clock` (seconds, monotonic) to drive open -> half-open."""
    global _clock
    with _breakers_lock:
        _breakers.clear()
        _clock = clock or time.monotonic


def _chain(model: str, fallback_models: Sequence[str]) -> list[str]:
    return list(dict.fromkeys([model, *fallback_models]))


async def call_with_resilience(
    provider: Provider,
    request: GenerationRequest,
    *,
    fallback_models: Sequence[str] = (),
    deadline: float | None = None,
    on_delta: DeltaCallback | None = None,
) -> Generation:
    """Call the provider with retries, timeout, breakers and model fallback; ProviderError if all fail."""
    last_error: ProviderError | None = None
    emitted = False

    async def forward(text: str) -> None:
        nonlocal emitted
        emitted = True
        assert on_delta is not None
        await on_delta(text)

    for model in _chain(request.model, fallback_models):
        if deadline is not None and time.monotonic() >= deadline:
            break
        try:
            return await _call_model(
                provider,
                request if model == request.model else replace(request, model=model),
                deadline=deadline,
                on_delta=forward if on_delta is not None else None,
                emitted=lambda: emitted,
            )
        except ProviderError as exc:
            last_error = exc
            if emitted or exc.kind not in FALLBACK_KINDS:
                raise
            logger.warning("%s:%s failed (%s); trying the next model", provider.name, model, exc.kind)
    if last_error is None:
        raise ProviderError(
            "the conversation deadline passed before the call", kind="timeout", provider=provider.name
        )
    raise last_error


async def _call_model(
    provider: Provider,
    request: GenerationRequest,
    *,
    deadline: float | None,
    on_delta: DeltaCallback | None,
    emitted: Callable[[], bool],
) -> Generation:
    """Retry one model with tenacity until success, a final error, the attempt limit or the deadline.

    The first attempt runs before tenacity is set up (most calls need no second): a failure
    it may retry becomes tenacity's first attempt, so waits, stops and logs are tenacity's.
    """
    config = settings.CONFIG

    def should_retry(exc: BaseException) -> bool:
        return isinstance(exc, ProviderError) and exc.retryable and not emitted()

    try:
        return await _attempt(provider, request, deadline=deadline, on_delta=on_delta)
    except ProviderError as exc:
        if config.RETRY_MAX_ATTEMPTS <= 1 or not should_retry(exc):
            raise
        first_failure: ProviderError | None = exc
    jitter = wait_random_exponential(multiplier=config.RETRY_BASE_DELAY, max=config.RETRY_MAX_DELAY)

    def wait(state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, ProviderError) and exc.retry_after is not None:
            return min(exc.retry_after, config.RETRY_MAX_DELAY)
        return float(jitter(state))

    retrying = AsyncRetrying(
        stop=stop_any(stop_after_attempt(config.RETRY_MAX_ATTEMPTS), stop_before_deadline(deadline)),
        wait=wait,
        retry=retry_if_exception(should_retry),
        before_sleep=_log_retry,
        sleep=lambda seconds: _sleep(seconds),  # looked up at call time so tests can record waits
        reraise=True,
    )
    async for attempt in retrying:
        with attempt:
            if first_failure is not None:  # attempt 1, already made
                failure, first_failure = first_failure, None
                raise failure
            return await _attempt(provider, request, deadline=deadline, on_delta=on_delta)
    raise AssertionError("unreachable: tenacity either returns or re-raises")  # pragma: no cover


class stop_before_deadline(stop_base):  # named like tenacity's own stop strategies
    """Stop when the next wait would end at or past the deadline (give up rather than overrun)."""

    def __init__(self, deadline: float | None) -> None:
        self.deadline = deadline

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self.deadline is not None and time.monotonic() + retry_state.upcoming_sleep >= self.deadline


def _log_retry(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    logger.info("retrying after %s in %.2fs (attempt %d)", exc, state.upcoming_sleep, state.attempt_number)


async def _attempt(
    provider: Provider, request: GenerationRequest, *, deadline: float | None, on_delta: DeltaCallback | None
) -> Generation:
    """One call through the breaker, bounded by the per-call timeout."""
    labels = (provider.name, request.model)
    breaker = get_breaker(*labels)
    if not breaker.allow():
        LLM_CALLS.labels(*labels, "circuit_open").inc()
        raise ProviderError(
            f"circuit breaker {breaker.name} is open",
            kind="circuit_open",
            provider=provider.name,
            model=request.model,
        )
    timeout = settings.CONFIG.AGENT_CALL_TIMEOUT
    if request.timeout:
        timeout = min(timeout, request.timeout)
    full_timeout = timeout
    if deadline is not None:
        timeout = min(timeout, deadline - time.monotonic())
    if timeout <= 0:
        breaker.release()
        raise ProviderError("no time left before the deadline", kind="timeout", provider=provider.name)
    request = replace(request, timeout=timeout)
    started = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            # complete(): structured output where the model takes it, else the text format.
            generation = await provider.complete(request, on_delta)
    except ProviderError as exc:
        _record_failure(breaker, exc, labels, started)
        raise
    except TimeoutError as exc:
        error = ProviderError(
            f"no answer within {timeout:.2f}s", kind="timeout", provider=provider.name, model=request.model
        )
        if timeout < full_timeout:
            breaker.release()  # cut short by the conversation's deadline: no verdict on the service
            LLM_CALLS.labels(*labels, "timeout").inc()
            raise error from exc
        _record_failure(breaker, error, labels, started)
        raise error from exc
    except BaseException:
        breaker.release()  # cancelled, or a bug outside the provider: no verdict on the service
        raise
    breaker.record_success()
    metrics = _success_metrics.get(labels) or _success_metrics.setdefault(labels, _SuccessMetrics(*labels))
    metrics.calls.inc()
    metrics.latency.observe(time.monotonic() - started)
    metrics.prompt_tokens.inc(generation.usage.prompt_tokens)
    metrics.completion_tokens.inc(generation.usage.completion_tokens)
    cost = call_cost(request.model, generation.usage, provider=provider.name, simulated=generation.simulated)
    metrics.cost.inc(cost.usd)
    return generation


class _SuccessMetrics:
    """The metric series a successful call of one (provider, model) adds to, looked up once
    (`labels()` takes a lock and builds its key on every call)."""

    __slots__ = ("calls", "completion_tokens", "cost", "latency", "prompt_tokens")

    def __init__(self, provider: str, model: str) -> None:
        self.calls = LLM_CALLS.labels(provider, model, "ok")
        self.latency = LLM_LATENCY.labels(provider, model)
        self.prompt_tokens = LLM_TOKENS.labels(provider, model, "prompt")
        self.completion_tokens = LLM_TOKENS.labels(provider, model, "completion")
        self.cost = LLM_COST.labels(provider, model)


_success_metrics: dict[tuple[str, str], _SuccessMetrics] = {}


def _record_failure(
    breaker: CircuitBreaker, error: ProviderError, labels: tuple[str, str], started: float
) -> None:
    breaker.record_failure(error)
    LLM_CALLS.labels(*labels, error.kind).inc()
    LLM_LATENCY.labels(*labels).observe(time.monotonic() - started)
