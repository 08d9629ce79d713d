"""DRF authentication: `Authorization: Bearer <API key or JWT access token>`."""

from __future__ import annotations

from django.conf import settings
from rest_framework import exceptions
from rest_framework.authentication import BaseAuthentication
from rest_framework.request import Request

from gateway.auth import (
    ANONYMOUS,
    AUTH_REALM,
    AuthError,
    authenticate_bearer,
    parse_authorization,
    report_auth_failure,
)
from gateway.keys import KEY_READ_ATTR
from gateway.net import client_ip
from gateway.principal import Principal


class BearerFailed(exceptions.AuthenticationFailed):
    """AuthenticationFailed carrying its own code and WWW-Authenticate value."""

    def __init__(self, error: AuthError) -> None:
        super().__init__(detail=error.detail, code=error.code)
        self.www_authenticate = error.www_authenticate


class BearerAuthentication(BaseAuthentication):
    """API keys and JWT access tokens as Bearer; anonymous read/write when API_KEY_ENABLED=false."""

    def authenticate(self, request: Request) -> tuple[Principal, str | None] | None:
        ip = client_ip(request)
        header = request.META.get("HTTP_AUTHORIZATION")
        try:
            token = parse_authorization(header)
        except AuthError as exc:
            report_auth_failure(exc.code, exc.detail, ip=ip, path=request.path)
            request._bearer_error = exc.www_authenticate  # type: ignore[attr-defined]
            raise BearerFailed(exc) from None
        if token is None:
            if not settings.CONFIG.API_KEY_ENABLED:
                return ANONYMOUS, None
            return None  # the permission check answers 401 (views open to all still work)
        try:
            read = getattr(request._request, KEY_READ_ATTR, None)
            principal = authenticate_bearer(token, ip=ip, path=request.path, read=read)
        except AuthError as exc:
            request._bearer_error = exc.www_authenticate  # type: ignore[attr-defined]
            raise BearerFailed(exc) from None
        return principal, token

    def authenticate_header(self, request: Request) -> str:
        return getattr(request, "_bearer_error", AUTH_REALM)
