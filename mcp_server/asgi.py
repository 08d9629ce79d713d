"""/mcp: the MCP streamable HTTP endpoint, mounted in the project's ASGI application.

Each HTTP request passes the gateway's checks first (IP blocks, `Authorization: Bearer` with
an API key or a JWT, the `read` permission, Django's ALLOWED_HOSTS), then goes to the SDK's
session manager. The manager is stateless: every POST carries its own call and its progress
comes back on that POST's event stream, so any web process behind a load balancer serves
any request, and a client that closes the stream ends its call.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import MutableMapping
from typing import Any

import orjson
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import close_old_connections
from django.http.request import split_domain_port, validate_host
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecuritySettings

from gateway.auth import (
    ANONYMOUS,
    AUTH_REALM,
    AuthError,
    aauthenticate_bearer,
    parse_authorization,
    report_auth_failure,
)
from gateway.blocking import ais_blocked
from gateway.net import client_ip
from gateway.principal import Principal
from mcp_server.access import CLIENT_KEY, STATE_KEY
from mcp_server.tools import server

logger = logging.getLogger("polyagents.mcp")

Scope = MutableMapping[str, Any]
PATH = "/mcp"

# The SDK's Starlette app is not used (its lifespan never runs under daphne); building it
# creates the session manager, started below on the first request of this process.
server.streamable_http_app(
    streamable_http_path=PATH,
    stateless_http=True,
    # Hosts are checked against ALLOWED_HOSTS below, as Django checks them.
    transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
)
_started: asyncio.Event | None = None
_manager_task: asyncio.Task[None] | None = None


async def _serve_manager(manager: StreamableHTTPSessionManager, started: asyncio.Event) -> None:
    async with manager.run():
        started.set()
        await asyncio.Event().wait()  # for the life of the process


async def running_manager() -> StreamableHTTPSessionManager:
    """The session manager, its task group started once per process (on the server's loop)."""
    global _started, _manager_task
    manager = server.session_manager
    if _started is None:
        _started = asyncio.Event()
        _manager_task = asyncio.get_running_loop().create_task(_serve_manager(manager, _started))
    await _started.wait()
    return manager


async def _answer(
    send: Any, status: int, code: str, detail: str, headers: dict[str, str] | None = None
) -> None:
    body = orjson.dumps({"detail": detail, "code": code})
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


async def _principal(scope: Scope, ip: str | None) -> Principal:
    """The caller, or AuthError (recorded towards the IP's block like every auth failure)."""
    try:
        token = parse_authorization(_header(scope, b"authorization"))
    except AuthError as exc:
        await sync_to_async(report_auth_failure)(exc.code, exc.detail, ip=ip, path=PATH)
        raise
    if token is None:
        if not settings.CONFIG.API_KEY_ENABLED:
            return ANONYMOUS
        raise AuthError("not_authenticated", "Authentication credentials were not provided.")
    return await aauthenticate_bearer(token, ip=ip, path=PATH)


async def mcp_application(scope: Scope, receive: Any, send: Any) -> None:
    """The ASGI application of /mcp."""
    host, _ = split_domain_port(_header(scope, b"host") or "")
    if not validate_host(host, settings.ALLOWED_HOSTS):
        await _answer(send, 400, "bad_host", "Invalid Host header.")
        return
    ip = client_ip(dict(scope))
    if ip and await ais_blocked(ip):
        await _answer(send, 403, "ip_blocked", "Your IP address is blocked.")
        return
    try:
        principal = await _principal(scope, ip)
    except AuthError as exc:
        await _answer(
            send, 401, exc.code, exc.detail, {"WWW-Authenticate": exc.www_authenticate or AUTH_REALM}
        )
        return
    if not principal.has("read"):
        await _answer(send, 403, "permission_denied", "This key needs the 'read' permission.")
        return
    client = principal.owner if principal.kind != "anonymous" else f"ip:{ip or 'unknown'}"
    state = {**scope.get("state", {}), STATE_KEY: principal, CLIENT_KEY: client}
    manager = await running_manager()
    try:
        await manager.handle_request({**scope, "state": state}, receive, send)
    finally:
        await sync_to_async(close_old_connections)()
