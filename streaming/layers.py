"""The channel layer of REDIS_URL deployments: Redis pub/sub, decoded once per process.

channels_redis's `RedisPubSubChannelLayer` already turns a `group_send` into one PUBLISH
that each web process receives once, but it then queues the raw bytes for every local
member of the group and each consumer decodes its own copy (msgpack), so a message for
1,000 local sockets is decoded 1,000 times. This layer decodes it once, when it arrives,
and hands the same message to every local member. Consumers must treat a received
message as read-only (streaming/consumers.py does).
"""

from __future__ import annotations

from typing import Any

from channels_redis.pubsub import RedisPubSubChannelLayer, RedisSingleShardConnection


class _DecodedMessage(dict[str, Any]):
    """A message this layer already decoded (so `deserialize` passes it through)."""


class _DecodeOnceShard(RedisSingleShardConnection):
    def _receive_message(self, message: dict[str, Any] | None) -> None:
        if message is not None and isinstance(message.get("data"), bytes):
            decoded = _DecodedMessage(self.channel_layer.channel_layer.deserialize(message["data"]))
            message = {**message, "data": decoded}
        super()._receive_message(message)


class LocalFanoutPubSubChannelLayer(RedisPubSubChannelLayer):
    """`RedisPubSubChannelLayer` that decodes each received message once for all local channels."""

    def _get_layer(self) -> Any:
        layer = super()._get_layer()
        if not getattr(layer, "_decode_once", False):
            # A new per-loop layer: swap its shards (not connected yet) for decode-once ones.
            layer._shards = [_DecodeOnceShard(shard.host, layer) for shard in layer._shards]
            layer._decode_once = True
        return layer

    def deserialize(self, message: Any) -> Any:
        if isinstance(message, _DecodedMessage):
            return message
        return super().deserialize(message)
