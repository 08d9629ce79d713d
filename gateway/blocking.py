"""IP blocking: authentication failures counted per IP in a window, then a timed block.

Failures are counted in the Django cache (Redis when REDIS_URL is set, else local memory)
with an atomic increment over a fixed window of IP_BLOCK_WINDOW seconds that starts at the
first failure. Blocks are BlockedIP rows, read with one indexed query per request, so
deleting a row in the admin lifts the block at once in every process. When the database
cannot answer, the check fails open (logged) rather than failing every request.
"""

from __future__ import annotations

import logging
import time

from django.conf import settings
from django.core.cache import cache
from django.db import DatabaseError
from django.db.models import Q, QuerySet
from django.utils import timezone

from gateway.models import ApiKey, BlockedIP
from gateway.net import normalize_ip
from gateway.security import log_security_event

logger = logging.getLogger("polyagents.security")


def _failures_key(ip: str) -> str:
    return f"gw:authfail:{ip}"


def _count_failure(ip: str, window: int) -> int:
    """Increment the failure counter of `ip`, creating it with the window as its lifetime."""
    key = _failures_key(ip)
    cache.add(key, 0, timeout=window)
    try:
        return cache.incr(key)
    except ValueError:  # the counter expired between add() and incr()
        cache.add(key, 1, timeout=window)
        return 1


def record_auth_failure(
    ip: str | None, *, reason: str, path: str, api_key: ApiKey | int | None = None
) -> bool:
    """Count one authentication failure from `ip`; block it at IP_BLOCK_THRESHOLD. True if blocked now.

    The caller writes the "auth_failed" security event itself; this writes "ip_blocked".
    """
    address = normalize_ip(ip)
    if address is None:
        return False
    config = settings.CONFIG
    failures = _count_failure(address, config.IP_BLOCK_WINDOW)
    if failures < config.IP_BLOCK_THRESHOLD:
        return False
    cache.delete(_failures_key(address))
    BlockedIP.block_for(
        address,
        config.IP_BLOCK_DURATION,
        reason=f"{failures} authentication failures within {config.IP_BLOCK_WINDOW}s (last: {reason})"[:200],
    )
    log_security_event(
        "ip_blocked",
        ip=address,
        path=path,
        api_key=api_key,
        failures=failures,
        window=config.IP_BLOCK_WINDOW,
        duration=config.IP_BLOCK_DURATION,
        reason=reason,
    )
    return True


def _active_blocks(ip: str) -> QuerySet[BlockedIP]:
    return BlockedIP.objects.filter(ip=ip).filter(
        Q(expires_at__isnull=True) | Q(expires_at__gt=timezone.now())
    )


_last_db_warning = 0.0


def _db_unavailable(exc: DatabaseError) -> bool:
    """Fail open when the database cannot answer: a liveness probe must not turn into a 500."""
    global _last_db_warning
    now = time.monotonic()
    if now - _last_db_warning >= 10.0:
        _last_db_warning = now
        logger.warning("IP block check failed, letting the request through: %s", exc)
    return False


def is_blocked(ip: str | None) -> bool:
    """True while `ip` has an unexpired BlockedIP row (one indexed query)."""
    address = normalize_ip(ip)
    if address is None:
        return False
    try:
        return _active_blocks(address).exists()
    except DatabaseError as exc:
        return _db_unavailable(exc)


async def ais_blocked(ip: str | None) -> bool:
    """Async variant of `is_blocked`."""
    address = normalize_ip(ip)
    if address is None:
        return False
    try:
        return await _active_blocks(address).aexists()
    except DatabaseError as exc:
        return _db_unavailable(exc)


def should_log_blocked_request(ip: str) -> bool:
    """True at most once per IP per minute, so a flood cannot fill the events table."""
    return bool(cache.add(f"gw:blockedlog:{ip}", 1, timeout=60))


async def ashould_log_blocked_request(ip: str) -> bool:
    """Async variant of `should_log_blocked_request`."""
    return bool(await cache.aadd(f"gw:blockedlog:{ip}", 1, timeout=60))


def block_ip(ip: str, *, seconds: int | None, reason: str) -> BlockedIP:
    """Block `ip` by hand (admin, commands); `seconds=None` blocks until lifted."""
    address = normalize_ip(ip)
    if address is None:
        raise ValueError(f"{ip!r} is not an IP address")
    if seconds is None:
        obj, _ = BlockedIP.objects.update_or_create(
            ip=address, defaults={"reason": reason, "expires_at": None}
        )
    else:
        obj = BlockedIP.block_for(address, seconds, reason)
    log_security_event("ip_blocked", ip=address, reason=reason, duration=seconds, manual=True)
    return obj
