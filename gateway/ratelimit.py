"""Token buckets: one atomic Lua script in Redis, or a lock-guarded bucket in the local cache.

With REDIS_URL the bucket lives in Redis and the clock is Redis' own `TIME`, so one bucket
holds across every process and machine. Without Redis (the embedded default) the bucket
lives in Django's local-memory cache and is therefore PER PROCESS. When Redis cannot be
reached the check fails open: the request is allowed, a warning is logged and
`polyagents_rate_limit_backend_errors_total` is incremented; for REDIS_BACKOFF seconds after
a failure Redis is not tried again, so an unreachable server costs no timeout per request.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from functools import lru_cache

import redis
import redis.asyncio as aioredis
from django.conf import settings
from django.core.cache import cache

from loopstate import PerLoop
from telemetry.metrics import RATE_LIMIT_BACKEND_ERRORS

logger = logging.getLogger("polyagents.ratelimit")

# KEYS[1] bucket; ARGV capacity, refill rate (tokens/s), cost. Returns {allowed, tokens}.
# Tokens go back as a string: Redis truncates Lua numbers to integers.
TOKEN_BUCKET_LUA = """
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil or ts == nil then
  tokens = capacity
  ts = now
end
tokens = math.min(capacity, tokens + math.max(0, now - ts) * rate)
local allowed = 0
if tokens >= cost then
  tokens = tokens - cost
  allowed = 1
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.6f', tokens), 'ts', string.format('%.6f', now))
redis.call('EXPIRE', KEYS[1], math.ceil(capacity / rate) + 1)
return {allowed, string.format('%.6f', tokens)}
"""

REDIS_TIMEOUT = 0.5  # seconds: a slow Redis must not stall every request
REDIS_BACKOFF = 1.0  # seconds without trying Redis after a failure (each request fails open at once)
_WARN_INTERVAL = 10.0


@dataclass(frozen=True)
class Policy:
    """A bucket of `capacity` tokens refilled at `requests` per `window` seconds."""

    capacity: int
    requests: int
    window: int

    @property
    def rate(self) -> float:
        return self.requests / self.window

    @property
    def header(self) -> str:
        """The RateLimit-Policy header value."""
        return f"{self.requests};w={self.window};burst={self.capacity}"


@dataclass(frozen=True)
class Decision:
    """The outcome of one check, with everything the RateLimit headers need."""

    allowed: bool
    policy: Policy
    tokens: float
    degraded: bool = False  # True when the backend failed and the check failed open

    @property
    def remaining(self) -> int:
        return max(0, math.floor(self.tokens))

    @property
    def retry_after(self) -> int:
        """Whole seconds (>= 1) until the next token."""
        return max(1, math.ceil((1 - self.tokens) / self.policy.rate)) if self.tokens < 1 else 0

    @property
    def reset(self) -> int:
        """Whole seconds until the bucket is full again."""
        return max(0, math.ceil((self.policy.capacity - self.tokens) / self.policy.rate))

    def headers(self) -> dict[str, str]:
        """The IETF RateLimit headers describing this decision."""
        return {
            "RateLimit-Limit": str(self.policy.capacity),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(self.reset),
            "RateLimit-Policy": self.policy.header,
        }


def bucket_key(scope: str, client: str) -> str:
    return f"{settings.REDIS_KEY_PREFIX}:rl:{scope}:{client}"


@lru_cache(maxsize=8)
def _redis(url: str) -> tuple[redis.Redis, redis.commands.core.Script]:
    conn = redis.Redis.from_url(url, socket_timeout=REDIS_TIMEOUT, socket_connect_timeout=REDIS_TIMEOUT)
    return conn, conn.register_script(TOKEN_BUCKET_LUA)


# One async client per event loop and URL (redis.asyncio pools are per loop).
_async_scripts: PerLoop[dict[str, redis.commands.core.AsyncScript]] = PerLoop(dict)


def _ascript(url: str) -> redis.commands.core.AsyncScript:
    """The bucket script bound to one async client per event loop (redis.asyncio pools are per loop)."""
    per_loop = _async_scripts.get()
    if url not in per_loop:
        conn = aioredis.Redis.from_url(
            url, socket_timeout=REDIS_TIMEOUT, socket_connect_timeout=REDIS_TIMEOUT
        )
        per_loop[url] = conn.register_script(TOKEN_BUCKET_LUA)
    return per_loop[url]


_last_warning = 0.0
_down_until: dict[str, float] = {}


def _backing_off(url: str) -> bool:
    """True for REDIS_BACKOFF seconds after a failure of the Redis at `url`."""
    return time.monotonic() < _down_until.get(url, 0.0)


def _fail_open(scope: str, policy: Policy, exc: Exception | None, url: str) -> Decision:
    """Allow the request when Redis is unreachable; warn at most every few seconds."""
    global _last_warning
    RATE_LIMIT_BACKEND_ERRORS.labels(scope).inc()
    now = time.monotonic()
    if exc is not None:
        _down_until[url] = now + REDIS_BACKOFF
    if now - _last_warning >= _WARN_INTERVAL:
        _last_warning = now
        reason = exc or f"backing off after a failure less than {REDIS_BACKOFF}s ago"
        logger.warning("rate limiter backend unavailable, failing open: %s", reason, extra={"scope": scope})
    return Decision(allowed=True, policy=policy, tokens=float(policy.capacity), degraded=True)


def _decision(policy: Policy, result: list) -> Decision:
    allowed, tokens = result
    return Decision(allowed=bool(int(allowed)), policy=policy, tokens=float(tokens))


_local_lock = threading.Lock()


def _check_local(key: str, policy: Policy, cost: int) -> Decision:
    """The same algorithm in the local cache, serialised by a process-wide lock."""
    with _local_lock:
        now = time.time()
        tokens, ts = cache.get(key) or (float(policy.capacity), now)
        tokens = min(policy.capacity, tokens + max(0.0, now - ts) * policy.rate)
        allowed = tokens >= cost
        if allowed:
            tokens -= cost
        cache.set(key, (tokens, now), timeout=math.ceil(policy.capacity / policy.rate) + 1)
    return Decision(allowed=allowed, policy=policy, tokens=tokens)


def take(url: str, key: str, policy: Policy, cost: int = 1) -> Decision:
    """Run the Lua bucket on the Redis at `url`; raises redis.RedisError when it is down."""
    conn, script = _redis(url)
    return _decision(policy, script(keys=[key], args=[policy.capacity, policy.rate, cost], client=conn))


def check(scope: str, client: str, policy: Policy, cost: int = 1) -> Decision:
    """Take `cost` tokens from the bucket of `client` in `scope`."""
    key = bucket_key(scope, client)
    url = settings.REDIS_URL
    if not url:
        return _check_local(key, policy, cost)
    if _backing_off(url):
        return _fail_open(scope, policy, None, url)
    try:
        return take(url, key, policy, cost)
    except redis.RedisError as exc:
        return _fail_open(scope, policy, exc, url)


async def acheck(scope: str, client: str, policy: Policy, cost: int = 1) -> Decision:
    """Async variant of `check` for consumers and async code paths."""
    key = bucket_key(scope, client)
    url = settings.REDIS_URL
    if not url:
        return _check_local(key, policy, cost)  # in-memory: no I/O, safe to run inline
    if _backing_off(url):
        return _fail_open(scope, policy, None, url)
    try:
        result = await _ascript(url)(keys=[key], args=[policy.capacity, policy.rate, cost])
    except redis.RedisError as exc:
        return _fail_open(scope, policy, exc, url)
    return _decision(policy, result)
