"""DRF throttles backed by the token buckets of `gateway.ratelimit`.

The throttles are synchronous on purpose: DRF calls them directly and adrf's async
dispatch runs `initial()` (authentication, permissions, throttles) in a worker thread.
Each check's Decision is stashed on the Django request so `RateLimitHeadersMiddleware`
can add the RateLimit headers to every response, successful or not.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.cache import cache
from django.http import HttpRequest
from rest_framework.exceptions import Throttled
from rest_framework.request import Request
from rest_framework.throttling import BaseThrottle

from gateway.net import client_ip
from gateway.principal import Principal
from gateway.ratelimit import Decision, Policy, check
from gateway.security import log_security_event
from telemetry.metrics import RATE_LIMIT_REJECTIONS

STATE_ATTR = "rate_limit_decision"


class RateLimited(Throttled):
    """429 with code "rate_limited"; carries the RateLimit headers for the error handler."""

    default_detail = "Rate limit exceeded."
    default_code = "rate_limited"

    def __init__(self, decision: Decision) -> None:
        super().__init__(wait=decision.retry_after)
        self.headers = {**decision.headers(), "Retry-After": str(decision.retry_after)}


def stash_decision(request: HttpRequest, decision: Decision) -> None:
    """Keep the most restrictive decision of this request for the response headers."""
    current: Decision | None = getattr(request, STATE_ATTR, None)
    if current is None or not decision.allowed or (current.allowed and decision.tokens < current.tokens):
        setattr(request, STATE_ATTR, decision)


def _django_request(request: Request | HttpRequest) -> HttpRequest:
    return getattr(request, "_request", request)


class TokenBucketThrottle(BaseThrottle):
    """Per client (the Principal's owner, else the IP): RATE_LIMIT_BURST tokens, refilled at
    RATE_LIMIT_REQUESTS (or the key's override) per RATE_LIMIT_WINDOW seconds."""

    scope = "api"

    def policy(self, request: Request) -> Policy:
        config = settings.CONFIG
        override = getattr(self._principal(request), "rate_limit_override", None)
        return Policy(
            config.RATE_LIMIT_BURST, override or config.RATE_LIMIT_REQUESTS, config.RATE_LIMIT_WINDOW
        )

    def client(self, request: Request) -> str:
        principal = self._principal(request)
        if principal is not None and principal.kind != "anonymous":
            return principal.owner
        return f"ip:{client_ip(request) or 'unknown'}"

    @staticmethod
    def _principal(request: Request) -> Principal | None:
        user: Any = getattr(request, "user", None)
        return user if isinstance(user, Principal) else None

    def allow_request(self, request: Request, view: Any) -> bool:
        if not settings.CONFIG.RATE_LIMITING_ENABLED:
            return True
        client = self.client(request)
        decision = check(self.scope, client, self.policy(request))
        stash_decision(_django_request(request), decision)
        if decision.allowed:
            return True
        RATE_LIMIT_REJECTIONS.labels(self.scope).inc()
        ip = client_ip(request)
        # One event row per client per minute at most: a flood must not fill the table.
        if cache.add(f"gw:rllog:{self.scope}:{client}", 1, timeout=60):
            principal = self._principal(request)
            log_security_event(
                "rate_limited",
                ip=ip,
                path=request.path,
                api_key=principal.api_key_id if principal else None,
                scope=self.scope,
                client=client,
                limit=decision.policy.header,
            )
        raise RateLimited(decision)


class TokenEndpointThrottle(TokenBucketThrottle):
    """Per IP on /auth/token: TOKEN_RATE_LIMIT_REQUESTS per TOKEN_RATE_LIMIT_WINDOW, same burst."""

    scope = "token"

    def policy(self, request: Request) -> Policy:
        config = settings.CONFIG
        requests = config.TOKEN_RATE_LIMIT_REQUESTS
        return Policy(requests, requests, config.TOKEN_RATE_LIMIT_WINDOW)

    def client(self, request: Request) -> str:
        return f"ip:{client_ip(request) or 'unknown'}"
