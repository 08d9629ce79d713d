"""API key services: create, revoke, rotate, load DEFAULT_API_KEYS, authenticate."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import IntegrityError, connections, transaction
from django.db.models import Q
from django.utils import timezone

from gateway.models import ApiKey, QuotaUnit, generate_key, hash_key
from gateway.principal import Principal
from gateway.signals import default_keys_loaded

logger = logging.getLogger("polyagents.keys")

PERMISSIONS = ("read", "write", "admin")
PREFIX_LENGTH = 10
LAST_USED_RESOLUTION = timedelta(minutes=1)


class CredentialRejected(Exception):
    """A presented credential is refused; `code` is machine-readable, `detail` for people."""

    def __init__(self, code: str, detail: str, key: ApiKey | None = None) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.key = key


class KeyRejected(CredentialRejected):
    """A presented key is unknown, revoked or expired; `code` says which."""


@dataclass(frozen=True)
class IssuedKey:
    """A freshly created key: the row and the raw secret, shown to its owner once."""

    key: ApiKey
    raw: str


def normalise_permissions(permissions: Iterable[str]) -> list[str]:
    """Known permissions in canonical order, duplicates removed; unknown ones refused."""
    wanted = {p.strip() for p in permissions if p.strip()}
    unknown = wanted - set(PERMISSIONS)
    if unknown:
        raise ValueError(f"unknown permission(s): {', '.join(sorted(unknown))}")
    if not wanted:
        raise ValueError("at least one permission is required")
    return [p for p in PERMISSIONS if p in wanted]


def key_create(
    *,
    name: str,
    permissions: Iterable[str],
    rate_limit_override: int | None = None,
    expires_at: datetime | None = None,
    source: str = ApiKey.Source.MANUAL,
    raw: str | None = None,
    daily_quota: float | None = None,
    daily_quota_unit: str = QuotaUnit.TOKENS,
) -> IssuedKey:
    """Create a key; only its SHA-256 hash is stored, the raw key is returned once."""
    raw = raw or generate_key()
    key = ApiKey.objects.create(
        name=name,
        prefix=raw[:PREFIX_LENGTH],
        key_hash=hash_key(raw),
        permissions=normalise_permissions(permissions),
        rate_limit_override=rate_limit_override,
        expires_at=expires_at,
        source=source,
        daily_quota=daily_quota,
        daily_quota_unit=daily_quota_unit,
    )
    return IssuedKey(key=key, raw=raw)


def key_revoke(*, key: ApiKey) -> ApiKey:
    """Revoke a key at once (idempotent: an earlier revocation time is kept)."""
    if key.revoked_at is None:
        key.revoked_at = timezone.now()
        key.save(update_fields=["revoked_at"])
    return key


def key_rotate(*, key: ApiKey, grace_seconds: int | None = None) -> IssuedKey:
    """Issue a replacement key; the old one keeps working for the grace period only."""
    grace = settings.CONFIG.API_KEY_ROTATION_GRACE if grace_seconds is None else grace_seconds
    if key.revoked_at is not None:
        raise ValueError("a revoked key cannot be rotated")
    with transaction.atomic():
        issued = key_create(
            name=key.name,
            permissions=key.permissions,
            rate_limit_override=key.rate_limit_override,
            expires_at=key.expires_at,
            source=ApiKey.Source.ROTATION,
            daily_quota=key.daily_quota,
            daily_quota_unit=key.daily_quota_unit,
        )
        grace_end = timezone.now() + timedelta(seconds=grace)
        key.expires_at = grace_end if key.expires_at is None else min(key.expires_at, grace_end)
        key.replaced_by = issued.key
        key.save(update_fields=["expires_at", "replaced_by"])
    return issued


def key_find(identifier: str) -> ApiKey:
    """A key by numeric id or by (unique) prefix; raises ApiKey.DoesNotExist or ValueError."""
    identifier = identifier.strip()
    if identifier.isdigit():
        return ApiKey.objects.get(pk=int(identifier))
    if len(identifier) >= PREFIX_LENGTH:  # a prefix as listed, or the whole raw key
        matches = list(ApiKey.objects.filter(prefix=identifier[:PREFIX_LENGTH])[:2])
    else:
        matches = list(ApiKey.objects.filter(prefix__startswith=identifier)[:2]) if identifier else []
    if not matches:
        raise ApiKey.DoesNotExist(f"no API key with id or prefix {identifier!r}")
    if len(matches) > 1:
        raise ValueError(f"prefix {identifier!r} matches several keys; use the id")
    return matches[0]


def keys_load_defaults(specs: Iterable[object] | None = None) -> list[tuple[str, str]]:
    """Load DEFAULT_API_KEYS idempotently (matched by name, source "env"); returns (name, action).

    Safe when several processes start at once: the row is locked while it is compared, and
    a process that loses the race to create it (the key hash is unique) loads it again.
    """
    specs = list(settings.CONFIG.DEFAULT_API_KEYS if specs is None else specs)
    done: list[tuple[str, str]] = []
    for spec in specs:
        try:
            done.append(_load_default(spec))
        except IntegrityError:
            done.append(_load_default(spec))  # created by another process meanwhile
    default_keys_loaded.send(sender=ApiKey, specs=specs)
    return done


def _load_default(spec: object) -> tuple[str, str]:
    name: str = spec.name  # type: ignore[attr-defined]
    raw: str = spec.key  # type: ignore[attr-defined]
    perms = normalise_permissions(spec.permissions)  # type: ignore[attr-defined]
    override: int | None = spec.rate_limit_override  # type: ignore[attr-defined]
    daily_quota: float | None = getattr(spec, "daily_quota", None)
    quota_unit: str = getattr(spec, "daily_quota_unit", QuotaUnit.TOKENS)
    with transaction.atomic():
        existing = ApiKey.objects.select_for_update().filter(name=name, source=ApiKey.Source.ENV).first()
        if existing is None:
            key_create(
                name=name,
                permissions=perms,
                rate_limit_override=override,
                source=ApiKey.Source.ENV,
                raw=raw,
                daily_quota=daily_quota,
                daily_quota_unit=quota_unit,
            )
            return name, "created"
        wanted = {
            "key_hash": hash_key(raw),
            "prefix": raw[:PREFIX_LENGTH],
            "permissions": perms,
            "rate_limit_override": override,
            "revoked_at": None,
            "daily_quota": daily_quota,
            "daily_quota_unit": quota_unit,
        }
        changed = [f for f, v in wanted.items() if getattr(existing, f) != v]
        if not changed:
            return name, "unchanged"
        for field in changed:
            setattr(existing, field, wanted[field])
        existing.save(update_fields=changed)
        return name, "updated"


def load_default_keys_at_start() -> None:
    """Start-up hook of the web process: load DEFAULT_API_KEYS, or say loudly why not.

    Runs in a thread of its own, so it works whether or not an event loop is running.
    """
    if not settings.CONFIG.DEFAULT_API_KEYS:
        return

    def load() -> None:
        try:
            done = keys_load_defaults()
        except Exception as exc:  # e.g. not migrated yet: the server still starts
            logger.warning(
                "DEFAULT_API_KEYS were NOT loaded at start-up (%s: %s); run manage.py migrate, "
                "then manage.py load_api_keys",
                type(exc).__name__,
                str(exc)[:200],
            )
        else:
            logger.info("DEFAULT_API_KEYS loaded: %s", ", ".join(f"{n} {a}" for n, a in done))
        finally:
            connections.close_all()

    thread = threading.Thread(target=load, name="load-default-api-keys")
    thread.start()
    thread.join()


def principal_for_key(key: ApiKey) -> Principal:
    """The Principal an API key authenticates as."""
    return Principal(
        kind="api_key",
        permissions=frozenset(key.permissions),
        name=key.name,
        api_key_id=key.pk,
        rate_limit_override=key.rate_limit_override,
    )


def check_usable(key: ApiKey, now: datetime | None = None) -> None:
    """Raise KeyRejected unless the key may be used now."""
    now = now or timezone.now()
    if key.revoked_at is not None:
        raise KeyRejected("key_revoked", "This API key has been revoked.", key)
    if key.expires_at is not None and key.expires_at <= now:
        if key.replaced_by_id is not None:
            raise KeyRejected("key_rotated", "This API key was rotated and its grace period has ended.", key)
        raise KeyRejected("key_expired", "This API key has expired.", key)


# On an HttpRequest: the API key row already read for the hash of its bearer token, as
# (hash, ApiKey or None) (`polyagents_site.middleware.BlockedIPMiddleware` reads it with the
# block check, in one statement on the event loop).
KEY_READ_ATTR = "api_key_read"
KeyRead = tuple[str, ApiKey | None]


def key_authenticate(raw: str, *, read: KeyRead | None = None) -> ApiKey:
    """The usable key matching a raw secret, its last-used time refreshed at most once a minute.

    `read`: the row of a hash read already during this request; used when it is this secret's.
    """
    key_hash = hash_key(raw)
    key = read[1] if read is not None and read[0] == key_hash else _key_by_hash(key_hash)
    if key is None:
        raise KeyRejected("invalid_token", "Unknown API key.")
    now = timezone.now()
    check_usable(key, now)
    if key.last_used_at is None or key.last_used_at < now - LAST_USED_RESOLUTION:
        # Conditional update: concurrent requests write the row at most once a minute.
        ApiKey.objects.filter(pk=key.pk).filter(
            Q(last_used_at__isnull=True) | Q(last_used_at__lt=now - LAST_USED_RESOLUTION)
        ).update(last_used_at=now)
        key.last_used_at = now
    return key


def _key_by_hash(key_hash: str) -> ApiKey | None:
    return ApiKey.objects.filter(key_hash=key_hash).first()
