"""Who calls /mcp, and what they may do: the same keys, JWTs, permissions and rate limits as
the REST API. The ASGI gate (mcp_server/asgi.py) authenticates each HTTP request and puts
its Principal in the request's state; the tools read it back here."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError

from gateway.principal import Principal
from gateway.ratelimit import Policy, acheck
from telemetry.metrics import RATE_LIMIT_REJECTIONS

STATE_KEY = "polyagents_principal"
CLIENT_KEY = "polyagents_client"  # the rate-limit bucket: the owner, or the IP of anonymous callers


def _state(ctx: Context, name: str) -> Any:
    request: Any = ctx.request_context.request
    return getattr(getattr(request, "state", None), name, None)


def principal_in(ctx: Context) -> Principal:
    """The Principal the gate authenticated for this tool call's HTTP request."""
    principal = _state(ctx, STATE_KEY)
    if not isinstance(principal, Principal):
        raise ToolError("not authenticated")
    return principal


def require(principal: Principal, permission: str) -> None:
    """A tool error unless the principal holds `permission` (admin holds every one)."""
    if not principal.has(permission):
        raise ToolError(f"permission_denied: this tool needs the '{permission}' permission")


async def charge(ctx: Context, principal: Principal) -> None:
    """Take one token from the caller's bucket, the one its REST requests use."""
    config = settings.CONFIG
    if not config.RATE_LIMITING_ENABLED:
        return
    policy = Policy(
        config.RATE_LIMIT_BURST,
        principal.rate_limit_override or config.RATE_LIMIT_REQUESTS,
        config.RATE_LIMIT_WINDOW,
    )
    decision = await acheck("api", _state(ctx, CLIENT_KEY) or principal.owner, policy)
    if not decision.allowed:
        RATE_LIMIT_REJECTIONS.labels("api").inc()
        raise ToolError(f"rate_limited: retry after {decision.retry_after} s")
