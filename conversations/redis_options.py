"""Connection options of the asyncio Redis clients: the event log's and the channel layer's.

A Redis restart closes every pooled connection, and a client learns it only when it next
writes to one. Without a retry policy redis-py raises that first failure to the caller, however
long after the restart it comes (a pooled connection is not checked before use): the first
WebSocket after a restart was closed and the first replay fell back to the database. With one
retry on `ConnectionError` the client reconnects and sends the command again (a pub/sub
connection subscribes again to its channels as it reconnects), so callers see nothing once
Redis is back. While Redis is down the retry is refused at once and the caller's own fallback
runs (replay reads the database). Timeouts are not retried: a host cut off from Redis would
double every wait.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError


def reconnecting() -> dict[str, Any]:
    """Keyword arguments of a client or connection pool (each call a new policy object)."""
    retry = Retry(
        ExponentialWithJitterBackoff(base=0.05, cap=0.5), 1, supported_errors=(RedisConnectionError,)
    )
    return {"retry": retry}
