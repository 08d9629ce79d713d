"""Django's own middleware, without a thread hop for work that does no I/O.

Under ASGI, Django runs each hook of a `MiddlewareMixin` middleware (`process_request`,
`process_view`, `process_response`) through `sync_to_async`: the seven built-in middleware this
site needs cost about thirteen hops into the request's thread for every request, each a few
tens of microseconds of CPU plus a wait for the GIL. Most of those hooks only read headers and
cookies or set attributes, so each subclass here runs them on the event loop and keeps the hop
for the cases that can touch the database: a session to save, messages to store, a body to
parse for a CSRF token, CSRF secrets kept in the session. Synchronous mode (the test client, a
WSGI server) is Django's own path, unchanged.

They subclass Django's classes, so `isinstance` checks (the admin's system checks among them) and
every setting those classes read still apply.

`BlockedIPMiddleware` is the gateway's, its block check and an API key's lookup read in one
call (`gateway.admission`).
"""

from __future__ import annotations

from typing import Any

from asgiref.sync import iscoroutinefunction, sync_to_async
from django.conf import settings
from django.contrib.auth import middleware as auth
from django.contrib.messages import middleware as messages
from django.contrib.sessions import middleware as sessions
from django.http import HttpRequest, HttpResponseBase
from django.middleware import clickjacking, common, csrf, security

from gateway import middleware as gateway_middleware
from gateway.admission import admission_read
from gateway.auth import AuthError, as_api_key, parse_authorization
from gateway.keys import KEY_READ_ATTR
from gateway.models import hash_key
from gateway.net import normalize_ip

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})


async def _call(hook: Any, in_thread: bool, *args: Any) -> Any:
    """A middleware hook's result: on the event loop, or in the request's thread as Django would."""
    if in_thread:
        return await sync_to_async(hook, thread_sensitive=True)(*args)
    return hook(*args)


class OnLoop:
    """Async mode for a `MiddlewareMixin`: its hooks run on the event loop unless
    `request_needs_thread` / `response_needs_thread` say the call may block."""

    get_response: Any

    def request_needs_thread(self, request: HttpRequest) -> bool:
        return False

    def response_needs_thread(self, request: HttpRequest, response: HttpResponseBase) -> bool:
        return False

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        response = None
        process_request = getattr(self, "process_request", None)
        if process_request is not None:
            response = await _call(process_request, self.request_needs_thread(request), request)
        response = response or await self.get_response(request)
        process_response = getattr(self, "process_response", None)
        if process_response is not None:
            in_thread = self.response_needs_thread(request, response)
            response = await _call(process_response, in_thread, request, response)
        return response


class SecurityMiddleware(OnLoop, security.SecurityMiddleware):
    """Headers and the HTTPS redirect: no I/O."""


class CommonMiddleware(OnLoop, common.CommonMiddleware):
    """The host check, the user-agent block list and the slash redirect (a URL lookup): no I/O."""


class XFrameOptionsMiddleware(OnLoop, clickjacking.XFrameOptionsMiddleware):
    """One header: no I/O."""


class AuthenticationMiddleware(OnLoop, auth.AuthenticationMiddleware):
    """Sets lazy `request.user` / `request.auser`; the user is read when first used, not here."""


class SessionMiddleware(OnLoop, sessions.SessionMiddleware):
    """Opening a session reads nothing; saving one writes it, so that goes to the thread."""

    def response_needs_thread(self, request: HttpRequest, response: HttpResponseBase) -> bool:
        session = getattr(request, "session", None)
        return session is not None and (session.modified or settings.SESSION_SAVE_EVERY_REQUEST)


class MessageMiddleware(OnLoop, messages.MessageMiddleware):
    """Opening the message storage reads nothing; storing messages that were read or added may
    read and write the session, so that goes to the thread."""

    def response_needs_thread(self, request: HttpRequest, response: HttpResponseBase) -> bool:
        storage = getattr(request, "_messages", None)
        return storage is not None and (storage.used or storage.added_new)


class CsrfViewMiddleware(OnLoop, csrf.CsrfViewMiddleware):
    """The CSRF cookie is read and set on the loop; a token check of an unsafe request (which
    may parse a multipart body) and secrets kept in the session go to the thread."""

    def __init__(self, get_response: Any) -> None:
        super().__init__(get_response)
        if iscoroutinefunction(get_response):  # Django's async mode
            # The handler awaits a coroutine function as it is and wraps anything else in
            # sync_to_async, so async mode gets the coroutine.
            self.process_view = self._aprocess_view  # type: ignore[method-assign,assignment]

    def request_needs_thread(self, request: HttpRequest) -> bool:
        return bool(settings.CSRF_USE_SESSIONS)

    def response_needs_thread(self, request: HttpRequest, response: HttpResponseBase) -> bool:
        return bool(settings.CSRF_USE_SESSIONS)

    async def _aprocess_view(
        self, request: HttpRequest, callback: Any, callback_args: Any, callback_kwargs: Any
    ) -> HttpResponseBase | None:
        in_thread = bool(settings.CSRF_USE_SESSIONS) or (
            request.method not in SAFE_METHODS and not getattr(callback, "csrf_exempt", False)
        )
        result: HttpResponseBase | None = await _call(
            super().process_view, in_thread, request, callback, callback_args, callback_kwargs
        )
        return result


def _api_key_token(request: HttpRequest) -> str | None:
    """The request's bearer token if it has the shape of an API key (not a JWT), else None."""
    try:
        token = parse_authorization(request.META.get("HTTP_AUTHORIZATION"))
    except AuthError:
        return None  # the authentication reports it
    return as_api_key(token)


class BlockedIPMiddleware(gateway_middleware.BlockedIPMiddleware):
    """The gateway's IP block check read with the request's API key in one call
    (`gateway.admission`): the same query, so deleting a block still lifts it at once. The key's
    row goes to the authentication (`gateway.keys.KEY_READ_ATTR`), which then makes no query of
    its own for it. Sync mode and a database that cannot answer keep the gateway's check (which
    fails open)."""

    async def ablocked(self, request: HttpRequest, ip: str) -> bool:
        address = normalize_ip(ip)
        if address is None:
            return False
        token = _api_key_token(request)
        key_hash = hash_key(token) if token is not None else None
        read = await admission_read(address, key_hash)
        if read is None:
            return await super().ablocked(request, ip)
        if key_hash is not None:
            setattr(request, KEY_READ_ATTR, (key_hash, read.key))
        return read.blocked
