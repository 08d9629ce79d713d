"""JWT access and refresh tokens (simplejwt) for API keys and Django users."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from rest_framework_simplejwt.exceptions import ExpiredTokenError, TokenError
from rest_framework_simplejwt.settings import api_settings
from rest_framework_simplejwt.tokens import AccessToken, RefreshToken

from gateway.keys import CredentialRejected, KeyRejected, check_usable, principal_for_key
from gateway.models import ApiKey
from gateway.principal import Principal

PERMISSIONS_CLAIM = "permissions"
KIND_CLAIM = "kind"
KEY_CLAIM = "key_id"


class TokenRejected(CredentialRejected):
    """A JWT is malformed, expired, blacklisted, of the wrong type or of a revoked principal."""


@dataclass(frozen=True)
class TokenPair:
    """An access and a refresh token, as the token endpoint returns them."""

    access: str
    refresh: str

    def as_response(self) -> dict[str, Any]:
        lifetime = api_settings.ACCESS_TOKEN_LIFETIME.total_seconds()
        return {
            "access": self.access,
            "refresh": self.refresh,
            "token_type": "Bearer",
            "expires_in": int(lifetime),
        }


def user_permissions(user: Any) -> list[str]:
    """Superusers get read/write/admin, staff read/write, every other active user read."""
    if user.is_superuser:
        return ["read", "write", "admin"]
    if user.is_staff:
        return ["read", "write"]
    return ["read"]


def _pair(refresh: RefreshToken) -> TokenPair:
    refresh.outstand()  # recorded so the blacklist can refer to it
    return TokenPair(access=str(refresh.access_token), refresh=str(refresh))


def issue_for_key(key: ApiKey) -> TokenPair:
    """A token pair carrying a key's id and permissions."""
    refresh = RefreshToken()
    refresh[KIND_CLAIM] = "api_key"
    refresh[KEY_CLAIM] = key.pk
    refresh[PERMISSIONS_CLAIM] = list(key.permissions)
    return _pair(refresh)


def issue_for_user(user: AbstractBaseUser) -> TokenPair:
    """A token pair carrying a Django user's id (`sub`) and permissions."""
    refresh = RefreshToken()
    refresh[api_settings.USER_ID_CLAIM] = str(user.pk)
    refresh[KIND_CLAIM] = "user"
    refresh[PERMISSIONS_CLAIM] = user_permissions(user)
    return _pair(refresh)


def principal_from_claims(payload: dict[str, Any]) -> Principal:
    """The Principal a verified token stands for, checked against the database now."""
    claimed = set(payload.get(PERMISSIONS_CLAIM) or [])
    kind = payload.get(KIND_CLAIM)
    if kind == "api_key":
        key_id = payload.get(KEY_CLAIM)
        key = ApiKey.objects.filter(pk=key_id).first() if isinstance(key_id, int) else None
        if key is None:
            raise TokenRejected("invalid_token", "The API key of this token no longer exists.")
        try:
            check_usable(key)
        except KeyRejected as exc:
            raise TokenRejected(exc.code, f"Token of an unusable key: {exc.detail}", key) from None
        base = principal_for_key(key)
        # A token never grants more than its key holds now.
        return Principal(
            kind="api_key",
            permissions=frozenset(claimed & base.permissions),
            name=base.name,
            api_key_id=base.api_key_id,
            rate_limit_override=base.rate_limit_override,
        )
    if kind == "user":
        user_id = payload.get(api_settings.USER_ID_CLAIM)
        user = get_user_model().objects.filter(pk=str(user_id)).first() if str(user_id).isdigit() else None
        if user is None or not user.is_active:
            raise TokenRejected("invalid_token", "The user of this token is unknown or inactive.")
        perms = claimed & set(user_permissions(user))
        return Principal(kind="user", permissions=frozenset(perms), name=user.get_username(), user_id=user.pk)
    raise TokenRejected("invalid_token", "Token names no principal.")


def _token_error(exc: TokenError) -> TokenRejected:
    if isinstance(exc, ExpiredTokenError):
        return TokenRejected("token_expired", "Token has expired.")
    return TokenRejected("invalid_token", str(exc.args[0]) if exc.args else "Token is invalid.")


def access_authenticate(raw: str) -> Principal:
    """The Principal of a valid access token; refresh tokens are refused here."""
    try:
        token = AccessToken(raw)  # type: ignore[arg-type]
    except TokenError as exc:
        raise _token_error(exc) from None
    return principal_from_claims(token.payload)


def _load_refresh(raw: str) -> RefreshToken:
    try:
        return RefreshToken(raw)  # type: ignore[arg-type]
    except TokenError as exc:
        raise _token_error(exc) from None


def refresh_rotate(raw: str) -> TokenPair:
    """Exchange a refresh token for a new pair; the old refresh token is blacklisted."""
    old = _load_refresh(raw)
    principal = principal_from_claims(old.payload)
    # get_or_create on a unique row: of two concurrent refreshes with one token, only one wins.
    outcome: tuple[object, bool] = old.blacklist()  # type: ignore[assignment]
    if not outcome[1]:
        raise TokenRejected("invalid_token", "Token is blacklisted")
    if principal.api_key_id is not None:
        return issue_for_key(ApiKey.objects.get(pk=principal.api_key_id))
    return issue_for_user(get_user_model().objects.get(pk=str(principal.user_id)))


def refresh_revoke(raw: str) -> None:
    """Blacklist a refresh token so it can never be exchanged again."""
    _load_refresh(raw).blacklist()
