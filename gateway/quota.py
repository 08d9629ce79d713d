"""Daily quotas per API key (tokens or USD per UTC day): reserve, then settle.

Before a conversation starts, the estimate of its first round is *reserved*: the check
`used + reserved + estimate <= quota` and the reservation are one atomic step, so
concurrent requests of one key can never together pass a quota that each alone fits.
When the run ends (completed, no consensus, failed or cancelled) the reservation is
*settled*: it is released and the actual usage is added to `used`. The reservation is
charged to the UTC day it was made on; the counters reset at UTC midnight.

With REDIS_URL the counters live in one Redis hash per key and day, changed by Lua
scripts (atomic across every process and machine). Without Redis, or while it is down,
the database row `QuotaUsage` of the key and day is the counter, locked with
SELECT ... FOR UPDATE. The settled usage is always written to the database as well (the
durable record shown in the admin), and a Redis counter that does not exist yet (a new
day, or a Redis that lost its data) starts from it.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from typing import Any

import redis
from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.db.models.functions import Greatest

from gateway.models import ApiKey, QuotaUnit, QuotaUsage
from telemetry.metrics import API_KEY_COST, API_KEY_TOKENS, QUOTA_BACKEND_ERRORS, QUOTA_REJECTIONS

logger = logging.getLogger("polyagents.quota")

# KEYS[1] hash {used, reserved}; ARGV quota, amount, used as the database knows it, ttl.
# Returns {allowed, used, reserved} (numbers as strings: Redis truncates Lua numbers).
RESERVE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'used', ARGV[3], 'reserved', '0')
end
local used = tonumber(redis.call('HGET', KEYS[1], 'used')) or 0
local reserved = tonumber(redis.call('HGET', KEYS[1], 'reserved')) or 0
local allowed = 0
if used + reserved + tonumber(ARGV[2]) <= tonumber(ARGV[1]) then
  reserved = tonumber(redis.call('HINCRBYFLOAT', KEYS[1], 'reserved', ARGV[2]))
  allowed = 1
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
return {allowed, tostring(used), tostring(reserved)}
"""

# KEYS[1]; ARGV actual usage, reservation to release. A missing hash is left alone: the
# next reservation starts it from the database, which already holds this usage.
SETTLE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HINCRBYFLOAT', KEYS[1], 'used', ARGV[1])
  local reserved = tonumber(redis.call('HINCRBYFLOAT', KEYS[1], 'reserved', ARGV[2]))
  if reserved < 0 then redis.call('HSET', KEYS[1], 'reserved', '0') end
end
return 1
"""

REDIS_TIMEOUT = 0.5
REDIS_BACKOFF = 1.0  # seconds without trying Redis after a failure
TTL_SECONDS = 2 * 86400
_WARN_INTERVAL = 10.0
_last_warning = 0.0
_down_until: dict[str, float] = {}


@dataclass(frozen=True)
class QuotaState:
    """A key's quota and what it has used today."""

    quota: float
    unit: str
    used: float
    reserved: float
    day: date
    backend: str  # "redis" or "database"

    @property
    def remaining(self) -> float:
        return max(0.0, self.quota - self.used - self.reserved)

    @property
    def resets_at(self) -> datetime:
        return datetime.combine(self.day + timedelta(days=1), datetime.min.time(), tzinfo=UTC)

    def retry_after(self, now: datetime | None = None) -> int:
        """Whole seconds (>= 1) until the counters reset at the next UTC midnight."""
        now = now or datetime.now(UTC)
        return max(1, math.ceil((self.resets_at - now).total_seconds()))

    def to_dict(self) -> dict[str, Any]:
        digits = 0 if self.unit == QuotaUnit.TOKENS else 8
        return {
            "daily_quota": self.quota,
            "unit": self.unit,
            "used": round(self.used, digits),
            "reserved": round(self.reserved, digits),
            "remaining": round(self.remaining, digits),
            "day": self.day.isoformat(),
            "resets_at": self.resets_at.isoformat().replace("+00:00", "Z"),
        }


class QuotaExceeded(Exception):
    """The key's daily quota cannot hold the estimate of the conversation asked for."""

    def __init__(self, state: QuotaState, amount: float) -> None:
        self.state = state
        self.amount = amount
        unit = "tokens" if state.unit == QuotaUnit.TOKENS else "USD"
        super().__init__(
            f"The daily quota of this API key ({state.quota:g} {unit}) is used up: "
            f"{state.used + state.reserved:g} used or reserved today, this conversation needs about "
            f"{amount:g} more. It resets at {state.resets_at:%Y-%m-%d %H:%M} UTC."
        )


def _num(value: float) -> str:
    """A number as Redis and Lua read it (never in exponent form)."""
    return f"{value:.10f}"


def today(now: datetime | None = None) -> date:
    return (now or datetime.now(UTC)).astimezone(UTC).date()


def counter_key(key_id: int, day: date) -> str:
    return f"{settings.REDIS_KEY_PREFIX}:quota:{key_id}:{day.isoformat()}"


@lru_cache(maxsize=8)
def _redis(url: str) -> tuple[redis.Redis, Any, Any]:
    conn = redis.Redis.from_url(url, socket_timeout=REDIS_TIMEOUT, socket_connect_timeout=REDIS_TIMEOUT)
    return conn, conn.register_script(RESERVE_LUA), conn.register_script(SETTLE_LUA)


def _redis_url() -> str | None:
    """The Redis to use now, or None (absent, or backing off after a failure)."""
    url = settings.REDIS_URL
    if not url or time.monotonic() < _down_until.get(url, 0.0):
        return None
    return str(url)


def _redis_failed(url: str, exc: Exception) -> None:
    global _last_warning
    QUOTA_BACKEND_ERRORS.inc()
    now = time.monotonic()
    _down_until[url] = now + REDIS_BACKOFF
    if now - _last_warning >= _WARN_INTERVAL:
        _last_warning = now
        logger.warning("quota backend Redis unavailable, using the database: %s", exc)


def quota_of(key_id: int | None) -> tuple[float, str] | None:
    """The (quota, unit) of a key, or None when it has no quota."""
    if key_id is None:
        return None
    row = ApiKey.objects.filter(pk=key_id).values_list("daily_quota", "daily_quota_unit").first()
    if row is None or row[0] is None:
        return None
    return float(row[0]), str(row[1])


def _db_used(key_id: int, day: date) -> float:
    value = QuotaUsage.objects.filter(api_key_id=key_id, day=day).values_list("used", flat=True).first()
    return float(value or 0.0)


def _db_row(key_id: int, day: date, unit: str) -> QuotaUsage:
    """The day's row of a key, locked for this transaction (created when missing)."""
    row, _ = QuotaUsage.objects.select_for_update().get_or_create(
        api_key_id=key_id, day=day, defaults={"unit": unit}
    )
    return row


def _reserve_db(key_id: int, quota: float, unit: str, amount: float, day: date) -> tuple[bool, QuotaState]:
    with transaction.atomic():
        row = _db_row(key_id, day, unit)
        allowed = row.used + row.reserved + amount <= quota
        if allowed:
            QuotaUsage.objects.filter(pk=row.pk).update(reserved=F("reserved") + amount)
            row.reserved += amount
    return allowed, QuotaState(quota, unit, row.used, row.reserved, day, "database")


def reserve(
    key_id: int | None, *, tokens: int, usd: float, now: datetime | None = None
) -> dict[str, Any] | None:
    """Reserve an estimate (`tokens` or `usd`, the key's unit) of today's quota; None without one.

    Returns the reservation to keep until `settle`; raises QuotaExceeded when it does not fit.
    """
    found = quota_of(key_id)
    if found is None or key_id is None:
        return None
    quota, unit = found
    day = today(now)
    amount = max(0.0, float(tokens if unit == QuotaUnit.TOKENS else usd))
    url = _redis_url()
    state: QuotaState | None = None
    allowed = False
    if url is not None:
        try:
            conn, script, _ = _redis(url)
            result = script(
                keys=[counter_key(key_id, day)],
                args=[_num(quota), _num(amount), _num(_db_used(key_id, day)), TTL_SECONDS],
                client=conn,
            )
            allowed = bool(int(result[0]))
            state = QuotaState(quota, unit, float(result[1]), float(result[2]), day, "redis")
        except redis.RedisError as exc:
            _redis_failed(url, exc)
    if state is None:
        allowed, state = _reserve_db(key_id, quota, unit, amount, day)
    if not allowed:
        QUOTA_REJECTIONS.labels(unit).inc()
        raise QuotaExceeded(state, amount)
    return {
        "api_key": key_id,
        "day": day.isoformat(),
        "unit": unit,
        "reserved": amount,
        "backend": state.backend,
        "room": state.remaining + amount,  # what this conversation may spend, as things stand
    }


def release(reservation: dict[str, Any] | None) -> None:
    """Give a reservation back without charging anything (the conversation never started)."""
    settle(reservation, tokens=0, usd=0.0, record=False)


def settle(reservation: dict[str, Any] | None, *, tokens: int, usd: float, record: bool = True) -> None:
    """Release a reservation and charge the actual usage to the day it was made on."""
    if not reservation or reservation.get("settled"):
        return
    key_id = int(reservation["api_key"])
    day = date.fromisoformat(reservation["day"])
    unit = reservation.get("unit", QuotaUnit.TOKENS)
    actual = float(tokens) if unit == QuotaUnit.TOKENS else float(usd)
    held = float(reservation.get("reserved", 0.0))
    on_db = reservation.get("backend") == "database"
    with transaction.atomic():
        row = _db_row(key_id, day, unit)
        QuotaUsage.objects.filter(pk=row.pk).update(
            used=F("used") + actual, reserved=Greatest(F("reserved") - (held if on_db else 0.0), 0.0)
        )
    if not on_db:
        url = _redis_url()
        if url is not None:
            try:
                conn, _, script = _redis(url)
                script(keys=[counter_key(key_id, day)], args=[_num(actual), _num(-held)], client=conn)
            except redis.RedisError as exc:
                _redis_failed(url, exc)
    reservation["settled"] = True
    if record:
        logger.info("quota settled", extra={"api_key": key_id, "day": day.isoformat(), "charged": actual})


def record_spend(owner: str, tokens: int, usd: float) -> None:
    """Prometheus counters of what a key (or user) spent."""
    API_KEY_TOKENS.labels(owner).inc(tokens)
    API_KEY_COST.labels(owner).inc(usd)


def usage(key_id: int | None, *, now: datetime | None = None) -> QuotaState | None:
    """Today's quota state of a key (None without a quota), for /auth/whoami and the admin."""
    found = quota_of(key_id)
    if found is None or key_id is None:
        return None
    quota, unit = found
    day = today(now)
    url = _redis_url()
    if url is not None:
        try:
            conn, _, _ = _redis(url)
            used, reserved = conn.hmget(counter_key(key_id, day), ["used", "reserved"])
            if used is not None:
                return QuotaState(quota, unit, float(used), float(reserved or 0), day, "redis")
            return QuotaState(quota, unit, _db_used(key_id, day), 0.0, day, "redis")
        except redis.RedisError as exc:
            _redis_failed(url, exc)
    row = QuotaUsage.objects.filter(api_key_id=key_id, day=day).first()
    used_db, reserved_db = (row.used, row.reserved) if row else (0.0, 0.0)
    return QuotaState(quota, unit, used_db, reserved_db, day, "database")
