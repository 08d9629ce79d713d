"""Bearer authentication shared by DRF views and WebSocket consumers."""

from __future__ import annotations

import logging
import re
from typing import TypeGuard

from asgiref.sync import sync_to_async

from gateway.keys import KeyRead, KeyRejected, key_authenticate, principal_for_key
from gateway.models import ApiKey
from gateway.principal import Principal
from gateway.tokens import TokenRejected, access_authenticate

logger = logging.getLogger("polyagents.auth")

# A compact JWS: three base64url parts, the header starting with '{"' encoded ("eyJ").
JWT_SHAPE = re.compile(r"^eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$")
MAX_TOKEN_LENGTH = 4096
AUTH_REALM = 'Bearer realm="polyagents"'

ANONYMOUS = Principal(kind="anonymous", permissions=frozenset({"read", "write"}), name="anonymous")


class AuthError(Exception):
    """Authentication failed; `code` is machine-readable, `detail` is for humans."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail

    @property
    def www_authenticate(self) -> str:
        """The WWW-Authenticate header value (RFC 6750) for this failure."""
        if self.code == "not_authenticated":
            return AUTH_REALM
        error = "invalid_request" if self.code == "invalid_request" else "invalid_token"
        return f'{AUTH_REALM}, error="{error}"'


class _KeyedAuthError(AuthError):
    """An AuthError that remembers the key involved, for the security event."""

    def __init__(self, code: str, detail: str, key: ApiKey | None) -> None:
        super().__init__(code, detail)
        self.key = key


def report_auth_failure(
    code: str, detail: str, *, ip: str | None, path: str = "", api_key: ApiKey | None = None
) -> None:
    """Count the failure towards IP blocking and write a security event."""
    from gateway.blocking import record_auth_failure
    from gateway.security import log_security_event

    log_security_event("auth_failed", ip=ip, path=path, api_key=api_key, reason=code, message=detail)
    if ip:
        record_auth_failure(ip, reason=code, path=path, api_key=api_key)


def parse_authorization(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header; None when there is no header."""
    if header is None:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        raise AuthError("invalid_request", 'Authorization must use the Bearer scheme: "Bearer <token>".')
    token = token.strip()
    if not token:
        raise AuthError("invalid_request", "The Bearer token is empty.")
    return token


def _well_formed(token: str | None) -> TypeGuard[str]:
    """Whether a bearer token can be a key or a JWT at all: not empty, not too long, no spaces."""
    if not token:
        return False
    return len(token) <= MAX_TOKEN_LENGTH and not any(c.isspace() for c in token)


def as_api_key(token: str | None) -> str | None:
    """The bearer token if `_authenticate` would look it up as an API key (well formed, not a
    JWT), else None."""
    return token if _well_formed(token) and not JWT_SHAPE.match(token) else None


def _authenticate(raw_token: str, read: KeyRead | None = None) -> tuple[Principal, ApiKey | None]:
    if not _well_formed(raw_token):
        raise AuthError("invalid_token", "Malformed bearer token.")
    if JWT_SHAPE.match(raw_token):
        try:
            return access_authenticate(raw_token), None
        except TokenRejected as exc:
            raise _KeyedAuthError(exc.code, exc.detail, exc.key) from None
    try:
        key = key_authenticate(raw_token, read=read)
    except KeyRejected as exc:
        raise _KeyedAuthError(exc.code, exc.detail, exc.key) from None
    return principal_for_key(key), key


def authenticate_bearer(
    raw_token: str, *, ip: str | None = None, path: str = "", read: KeyRead | None = None
) -> Principal:
    """The Principal of an API key or JWT access token; raises AuthError (and records it).

    `read`: an API key row read already for this request (`gateway.keys.KEY_READ_ATTR`)."""
    try:
        principal, _ = _authenticate(raw_token, read)
    except AuthError as exc:
        report_auth_failure(exc.code, exc.detail, ip=ip, path=path, api_key=getattr(exc, "key", None))
        raise AuthError(exc.code, exc.detail) from None
    return principal


async def aauthenticate_bearer(raw_token: str, *, ip: str | None = None, path: str = "") -> Principal:
    """Async twin of authenticate_bearer (one thread hop for the database work)."""
    return await sync_to_async(authenticate_bearer)(raw_token, ip=ip, path=path)
