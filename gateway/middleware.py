"""Gateway middleware: IP blocks first, then request ids, then RateLimit response headers.

Each class is sync- and async-capable (Django's `markcoroutinefunction` pattern), so under
ASGI no request is pushed through a thread just to pass the middleware.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.core.signals import request_finished
from django.dispatch import receiver
from django.http import HttpRequest, HttpResponseBase, JsonResponse

from gateway.blocking import ais_blocked, ashould_log_blocked_request, is_blocked, should_log_blocked_request
from gateway.net import client_ip, request_id_var
from gateway.security import alog_security_event, log_security_event
from gateway.throttling import STATE_ATTR

GetResponse = Callable[[HttpRequest], Any]

REQUEST_ID_HEADER = "X-Request-ID"
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class _Middleware:
    """Base: stores get_response and marks the instance as a coroutine function when async."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: GetResponse) -> None:
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)  # type: ignore[type-var]


def _blocked_response() -> JsonResponse:
    return JsonResponse(
        {
            "detail": "Your IP address is blocked after repeated authentication failures.",
            "code": "ip_blocked",
        },
        status=403,
    )


class BlockedIPMiddleware(_Middleware):
    """Answers 403 `ip_blocked` to a blocked IP before any other work."""

    def __call__(self, request: HttpRequest) -> HttpResponseBase | Awaitable[HttpResponseBase]:
        if self.is_async:
            return self.__acall__(request)
        ip = client_ip(request)
        if ip and is_blocked(ip):
            if should_log_blocked_request(ip):
                log_security_event("blocked_request", ip=ip, path=request.path, method=request.method)
            return _blocked_response()
        response: HttpResponseBase = self.get_response(request)
        return response

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        ip = client_ip(request)
        if ip and await self.ablocked(request, ip):
            if await ashould_log_blocked_request(ip):
                await alog_security_event("blocked_request", ip=ip, path=request.path, method=request.method)
            return _blocked_response()
        response: HttpResponseBase = await self.get_response(request)
        return response

    async def ablocked(self, request: HttpRequest, ip: str) -> bool:
        """Whether `ip`, the address of `request`, is blocked now (async mode)."""
        return await ais_blocked(ip)


def _request_id(request: HttpRequest) -> str:
    """The client's X-Request-ID when valid (<= 64 chars of [A-Za-z0-9._-]), else a new one."""
    candidate = request.headers.get(REQUEST_ID_HEADER, "")
    return candidate if REQUEST_ID_RE.fullmatch(candidate) else uuid.uuid4().hex


class RequestIdMiddleware(_Middleware):
    """Puts a request id on `request.request_id`, on the response and on every log record.

    The id stays set until `request_finished`, so Django's own "django.request" lines (logged
    after the middleware chain returns, 500 tracebacks included) carry it too.
    """

    def __call__(self, request: HttpRequest) -> HttpResponseBase | Awaitable[HttpResponseBase]:
        if self.is_async:
            return self.__acall__(request)
        request_id = _request_id(request)
        request.request_id = request_id  # type: ignore[attr-defined]
        request_id_var.set(request_id)
        response: HttpResponseBase = self.get_response(request)
        response[REQUEST_ID_HEADER] = request_id
        return response

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        request_id = _request_id(request)
        request.request_id = request_id  # type: ignore[attr-defined]
        request_id_var.set(request_id)  # each ASGI request runs in its own context
        response: HttpResponseBase = await self.get_response(request)
        response[REQUEST_ID_HEADER] = request_id
        return response


@receiver(request_finished)
def _forget_request_id(sender: Any, **kwargs: Any) -> None:
    """Clear the id once the response is closed, so a reused thread does not log a stale one."""
    request_id_var.set(None)


def _add_rate_limit_headers(request: HttpRequest, response: HttpResponseBase) -> HttpResponseBase:
    decision = getattr(request, STATE_ATTR, None)
    if decision is None or decision.degraded:
        return response
    for name, value in decision.headers().items():
        response[name] = value
    if response.status_code == 429 and not decision.allowed and not response.has_header("Retry-After"):
        response["Retry-After"] = str(decision.retry_after)
    return response


class RateLimitHeadersMiddleware(_Middleware):
    """Adds the RateLimit headers of the request's bucket check to its response."""

    def __call__(self, request: HttpRequest) -> HttpResponseBase | Awaitable[HttpResponseBase]:
        if self.is_async:
            return self.__acall__(request)
        return _add_rate_limit_headers(request, self.get_response(request))

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        return _add_rate_limit_headers(request, await self.get_response(request))
