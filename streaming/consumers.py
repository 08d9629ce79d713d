"""WS /ws/{conversation_id}: replay a conversation's event log, then follow it live.

The consumer joins the conversation's group first, replays the stored events after
`?after=N`, then forwards live events, dropping any whose `seq` it already sent and
filling any gap (the channel layer is lossy) from the stored log. The client sees every
event exactly once, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

from channels.db import aclose_old_connections
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings
from django.utils import timezone
from redis.exceptions import RedisError
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, stop_after_delay, wait_random

from conversations.events import group_name, in_pool_thread, read_events
from conversations.models import Conversation
from conversations.services import conversation_cancel
from gateway.admission import admission_read
from gateway.auth import ANONYMOUS, AuthError, as_api_key, authenticate_bearer
from gateway.blocking import is_blocked
from gateway.keys import LAST_USED_RESOLUTION, KeyRejected, check_usable, principal_for_key
from gateway.models import hash_key
from gateway.net import client_ip
from gateway.principal import Principal
from gateway.security import log_security_event
from telemetry.metrics import OPEN_WEBSOCKETS

logger = logging.getLogger("polyagents.ws")

FINAL_TYPES = frozenset({"conversation_completed", "conversation_failed"})
CLOSE_BAD_CREDENTIALS = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_NOT_FOUND = 4404
# "Try again later": the channel layer is unreachable; clients (the dashboard) reconnect.
CLOSE_TRY_AGAIN = 1013
JOIN_ERRORS = (RedisError, OSError, RuntimeError)
JOIN_TRY_SECONDS = 1.0


# Followers of one conversation in one process share a read of its stored last_seq made in the
# last second: 1,000 idle followers cost one query per catch-up round, not 1,000.
LAST_SEQ_SHARED_SECONDS = 1.0
_last_seq_reads: dict[uuid.UUID, tuple[float, asyncio.Future[int | None]]] = {}


async def stored_last_seq(conversation_id: uuid.UUID) -> int | None:
    """The conversation's stored last_seq (None if it is gone), read at most once a second per process."""
    now = time.monotonic()
    loop = asyncio.get_running_loop()
    shared = _last_seq_reads.get(conversation_id)
    if shared is None or now - shared[0] >= LAST_SEQ_SHARED_SECONDS or shared[1].get_loop() is not loop:
        if len(_last_seq_reads) > 1000:
            for key, (at, _) in list(_last_seq_reads.items()):
                if now - at >= LAST_SEQ_SHARED_SECONDS:
                    del _last_seq_reads[key]
        read = Conversation.objects.filter(pk=conversation_id).values_list("last_seq", flat=True).afirst()
        shared = (now, asyncio.ensure_future(read))
        _last_seq_reads[conversation_id] = shared
    # Shielded: a follower that disconnects mid-read must not cancel the others' read.
    return await asyncio.shield(shared[1])


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


def origin_allowed(scope: dict[str, Any]) -> bool:
    """No Origin (non-browser client), an allowed CORS origin, or the server's own host."""
    origin = _header(scope, b"origin")
    if origin is None:
        return True
    if origin in settings.CORS_ALLOWED_ORIGINS:
        return True
    host = _header(scope, b"host")
    return bool(host) and urlsplit(origin).netloc.lower() == str(host).lower()


def token_from_scope(scope: dict[str, Any]) -> tuple[str | None, str | None]:
    """The bearer token and the subprotocol to echo: `?token=`, "bearer.<t>" or ["bearer", "<t>"]."""
    protocols = [p.strip() for p in scope.get("subprotocols") or []]
    for index, proto in enumerate(protocols):
        if proto.lower().startswith("bearer.") and len(proto) > len("bearer."):
            return proto[len("bearer.") :], proto
        if proto.lower() == "bearer" and index + 1 < len(protocols):
            return protocols[index + 1], proto
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    tokens = query.get("token")
    # Echo a subprotocol the client offered, or browsers fail the handshake.
    return (tokens[0] if tokens else None), (protocols[0] if protocols else None)


def _after_param(scope: dict[str, Any]) -> int:
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    try:
        return max(0, int(query.get("after", ["0"])[0]))
    except ValueError:
        return 0


def authenticate(token: str | None, ip: str | None, path: str) -> Principal | None:
    """The principal for a token, or None (failures are recorded by the gateway)."""
    if not token:
        # API_KEY_ENABLED=false lets tokenless clients in, as on the HTTP side.
        return None if settings.CONFIG.API_KEY_ENABLED else ANONYMOUS
    try:
        return authenticate_bearer(token, ip=ip, path=path)
    except AuthError:
        return None


@dataclass(frozen=True)
class Admission:
    """What the handshake decided: accept or not, then close with `code` or follow."""

    accept: bool
    code: int | None = None
    principal: Principal | None = None
    conversation_id: uuid.UUID | None = None


def admit(scope: dict[str, Any]) -> Admission:
    """Every database check of a handshake, in order, in one thread hop.

    Blocked IPs and foreign origins are refused at the handshake; anything else is accepted
    first so browsers see the close code (a refused handshake shows only 1006).
    """
    ip = client_ip(scope)
    path = scope.get("path", "")
    if ip and is_blocked(ip):
        return Admission(accept=False, code=CLOSE_FORBIDDEN)
    if not origin_allowed(scope):
        log_security_event("ws_origin_refused", ip=ip, path=path, origin=_header(scope, b"origin"))
        return Admission(accept=False, code=CLOSE_FORBIDDEN)
    principal = authenticate(token_from_scope(scope)[0], ip, path)
    if principal is None:
        return Admission(accept=True, code=CLOSE_BAD_CREDENTIALS)
    if not principal.has("read"):
        return Admission(accept=True, code=CLOSE_FORBIDDEN)
    try:
        conversation_id = uuid.UUID(str(scope["url_route"]["kwargs"]["conversation_id"]))
    except ValueError:
        return Admission(accept=True, code=CLOSE_NOT_FOUND)
    owner = Conversation.objects.filter(pk=conversation_id).values_list("owner", flat=True).first()
    return _follow(principal, conversation_id, owner)


def _follow(principal: Principal, conversation_id: uuid.UUID, owner: str | None) -> Admission:
    """The last check of a handshake: the conversation exists, and is the principal's (or an admin's)."""
    if owner is None:
        return Admission(accept=True, code=CLOSE_NOT_FOUND)
    if not principal.is_admin and owner != principal.owner:
        return Admission(accept=True, code=CLOSE_FORBIDDEN)
    return Admission(accept=True, principal=principal, conversation_id=conversation_id)


async def aadmit(scope: dict[str, Any]) -> Admission:
    """`admit` off the event loop.

    The common handshake (an API key that is known, usable and recently used, a valid
    conversation id, an allowed origin) is decided from one read (`gateway.admission`).
    Everything else (a JWT, no token, a failure to record, a last-used time to refresh) takes
    `admit` in a pool thread (`in_pool_thread`).
    """
    admission = await admit_in_one_read(scope)
    if admission is not None:
        return admission
    return await in_pool_thread(admit, scope)


async def admit_in_one_read(scope: dict[str, Any]) -> Admission | None:
    """`admit`'s decision from one read (`gateway.admission.admission_read`), or None where
    `admit` must decide (it records failures and refreshes the key's last-used time)."""
    token = as_api_key(token_from_scope(scope)[0])
    if token is None or not origin_allowed(scope):
        return None
    try:
        conversation_id = uuid.UUID(str(scope["url_route"]["kwargs"]["conversation_id"]))
    except ValueError:
        return None
    read = await admission_read(client_ip(scope), hash_key(token), conversation_id)
    if read is None:
        return None  # `admit` decides, and fails open on the block list
    if read.blocked:
        return Admission(accept=False, code=CLOSE_FORBIDDEN)
    key, now = read.key, timezone.now()
    if key is None or key.last_used_at is None or key.last_used_at < now - LAST_USED_RESOLUTION:
        return None
    try:
        check_usable(key, now)
    except KeyRejected:
        return None
    principal = principal_for_key(key)
    if not principal.has("read"):
        return Admission(accept=True, code=CLOSE_FORBIDDEN)
    return _follow(principal, conversation_id, read.owner)


class ConversationConsumer(AsyncJsonWebsocketConsumer):
    """One WebSocket follower of one conversation."""

    # An idle follower re-reads the log this often: a live message lost by the channel
    # layer (or never published while Redis was away) still arrives, even the last one.
    catch_up_seconds = 5.0

    conversation_id: uuid.UUID
    principal: Principal | None = None
    last_sent = 0
    last_activity = 0.0
    last_type = ""
    joined = False
    counted = False
    catch_up_task: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        admission = await aadmit(self.scope)
        if not admission.accept:
            await self.close(code=admission.code)  # refused at the handshake
            return
        await self.accept(subprotocol=token_from_scope(self.scope)[1])
        OPEN_WEBSOCKETS.inc()
        self.counted = True
        if admission.code is not None or admission.principal is None or admission.conversation_id is None:
            await self.close(code=admission.code or CLOSE_FORBIDDEN)
            return
        principal = admission.principal
        self.conversation_id = admission.conversation_id
        self.principal = principal
        # Join the group BEFORE replaying, so nothing emitted in between is missed.
        if not await self._join():
            return
        await self.replay(_after_param(self.scope))
        self.catch_up_task = asyncio.ensure_future(self._catch_up_loop())

    async def _join(self) -> bool:
        """Join the conversation's group, or close with CLOSE_TRY_AGAIN (clients reconnect).

        channels_redis's pub/sub layer reads and subscribes on one connection: the first
        SUBSCRIBE after a Redis restart can meet its receiver reconnecting that connection too
        (a RuntimeError from asyncio's stream). A moment later the connection is back.
        """
        group = group_name(self.conversation_id)
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(3) | stop_after_delay(2),
                wait=wait_random(0.05, 0.3),
                retry=retry_if_exception_type(JOIN_ERRORS),
                reraise=True,
            ):
                with attempt:
                    # A SUBSCRIBE can also hang behind the layer's reconnecting receiver:
                    # each try is bounded (TimeoutError is an OSError, so it is retried too).
                    async with asyncio.timeout(JOIN_TRY_SECONDS):
                        await self.channel_layer.group_add(group, self.channel_name)
        except JOIN_ERRORS as exc:
            logger.warning(
                "channel layer unreachable; asking the client to reconnect", extra={"error": repr(exc)}
            )
            with contextlib.suppress(*JOIN_ERRORS):
                await self.channel_layer.group_discard(group, self.channel_name)
            await self.close(code=CLOSE_TRY_AGAIN)
            return False
        self.joined = True
        return True

    async def _catch_up_loop(self) -> None:
        while True:
            # After the run's final event only a new exchange can bring more: look rarely.
            interval = self.catch_up_seconds * (12 if self.last_type in FINAL_TYPES else 1)
            await asyncio.sleep(interval)
            if time.monotonic() - self.last_activity < interval:
                continue
            try:
                # One primary-key read (shared by this process's followers); the log only when
                # something is missing.
                stored = await stored_last_seq(self.conversation_id)
                if stored is not None and stored > self.last_sent:
                    for event in await read_events(self.conversation_id, self.last_sent):
                        await self._send_event(event)
            except Exception:
                logger.exception("catch-up read failed", extra={"conversation_id": str(self.conversation_id)})
            self.last_activity = time.monotonic()

    async def disconnect(self, code: int) -> None:
        if self.catch_up_task is not None:
            self.catch_up_task.cancel()
            self.catch_up_task = None
        if self.joined:
            await self.channel_layer.group_discard(group_name(self.conversation_id), self.channel_name)
            self.joined = False
        if self.counted:
            OPEN_WEBSOCKETS.dec()
            self.counted = False

    async def replay(self, after: int) -> None:
        """Send every stored event with seq > after (and > what was already sent unless resuming)."""
        self.last_sent = after
        for event in await read_events(self.conversation_id, after):
            await self._send_event(event)

    async def _send_event(self, event: dict[str, Any], text: str | None = None) -> None:
        # Check and update without an await in between: every path sends strictly increasing seqs.
        if event["seq"] <= self.last_sent:
            return
        self.last_sent = event["seq"]
        self.last_type = event.get("type", "")
        self.last_activity = time.monotonic()
        if text is None:
            await self.send_json(event)
        else:
            await self.send(text_data=text)  # serialised once by the publisher, for every socket

    async def dispatch(self, message: dict[str, Any]) -> None:
        # Channels closes stale database connections before every handler, a thread hop per
        # message; a live event touches the database only to fill a gap (and closes it then).
        kind = message.get("type")
        if kind == "conversation.events":
            await self.conversation_events(message)
        elif kind == "conversation.event":
            await self.conversation_event(message)
        else:
            await super().dispatch(message)

    async def conversation_events(self, message: dict[str, Any]) -> None:
        """A batch of live events from the group (one message per stored batch), in order."""
        for event, text in zip(message["events"], message["texts"], strict=True):
            await self.conversation_event({"event": event, "text": text})

    async def conversation_event(self, message: dict[str, Any]) -> None:
        """A live event from the group: drop duplicates, fill gaps from the stored log.

        The message is shared by every local follower (streaming/layers.py): read it, never change it.
        """
        event = message["event"]
        seq = int(event["seq"])
        if seq <= self.last_sent:
            return
        if seq > self.last_sent + 1:
            try:
                for missed in await read_events(self.conversation_id, self.last_sent):
                    if missed["seq"] >= seq:
                        break
                    await self._send_event(missed)
            finally:
                await aclose_old_connections()
        await self._send_event(event, message.get("text"))

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        if self.principal is None:
            return
        kind = content.get("type") if isinstance(content, dict) else None
        if kind == "ping":
            await self.send_json({"type": "pong"})
        elif kind == "resume":
            after = content.get("after", 0)
            if not isinstance(after, int) or isinstance(after, bool) or after < 0:
                await self.send_json(
                    {"type": "error", "code": "invalid", "detail": "after: a non-negative int"}
                )
                return
            await self.replay(after)
        elif kind == "cancel":
            if not self.principal.has("write"):
                await self.send_json({"type": "error", "code": "forbidden", "detail": "cancel needs write"})
                return
            await conversation_cancel(conversation_id=self.conversation_id)
            await self.send_json({"type": "cancel_requested", "conversation_id": str(self.conversation_id)})
        else:
            await self.send_json(
                {"type": "error", "code": "unknown_message", "detail": "expected ping, cancel or resume"}
            )

    async def receive(
        self, text_data: str | None = None, bytes_data: bytes | None = None, **kwargs: Any
    ) -> None:
        try:
            await super().receive(text_data=text_data, bytes_data=bytes_data, **kwargs)
        except ValueError:
            await self.send_json(
                {"type": "error", "code": "invalid_json", "detail": "messages are JSON objects"}
            )
