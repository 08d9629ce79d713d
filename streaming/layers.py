"""The channel layer of REDIS_URL deployments: Redis pub/sub, decoded once per process.

channels_redis's `RedisPubSubChannelLayer` already turns a `group_send` into one PUBLISH that
each web process receives once; it then queues that same bytes object for every local member
of the group, and each member's `receive` passes it to the layer's `deserialize`. This layer's
`deserialize` remembers the messages it decoded last, by their bytes: a message for 1,000 local
sockets is decoded once, and every member gets the same dict. Consumers must treat a received
message as read-only (streaming/consumers.py does).
"""

from __future__ import annotations

import threading
from typing import Any

from channels_redis.pubsub import RedisPubSubChannelLayer

# Messages remembered: enough for the ones still queued to some member of a busy process.
REMEMBERED = 256


class LocalFanoutPubSubChannelLayer(RedisPubSubChannelLayer):
    """`RedisPubSubChannelLayer` whose `deserialize` decodes each received message once."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.decoded: dict[bytes, Any] = {}
        self.decoded_lock = threading.Lock()  # a process's event loops share the layer

    def deserialize(self, message: bytes) -> Any:
        with self.decoded_lock:
            found = self.decoded.get(message)  # bytes cache their hash: O(1) after the first
            if found is not None:
                return found
        found = super().deserialize(message)
        with self.decoded_lock:
            self.decoded[message] = found
            if len(self.decoded) > REMEMBERED:
                del self.decoded[next(iter(self.decoded))]
        return found
