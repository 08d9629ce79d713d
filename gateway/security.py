"""Security events: one SecurityEvent row plus one structured log line per event."""

from __future__ import annotations

import json
import logging
from typing import Any

from django.db import DatabaseError

from gateway.models import ApiKey, SecurityEvent
from gateway.net import client_ip, normalize_ip

logger = logging.getLogger("polyagents.security")

# Routine administrative events are logged at INFO, the rest (attacks, limits) at WARNING.
_INFO_KINDS = frozenset({"key_created", "key_revoked", "key_rotated", "ip_unblocked"})


def _fields(
    kind: str, ip: str | None, path: str, api_key: ApiKey | int | None, detail: dict[str, Any]
) -> dict:
    """Model fields of the event, with the detail made JSON-safe and the path bounded."""
    safe_detail = json.loads(json.dumps(detail, default=str))
    fields: dict[str, Any] = {
        "kind": kind,
        "ip": normalize_ip(ip),
        "path": (path or "")[:500],
        "detail": safe_detail,
    }
    if isinstance(api_key, ApiKey):
        fields["api_key"] = api_key
    elif api_key is not None:
        fields["api_key_id"] = api_key
    return fields


def _log(fields: dict[str, Any]) -> None:
    """Write the structured log line on the "polyagents.security" logger."""
    api_key = fields.get("api_key")
    extra = {
        "event": fields["kind"],
        "ip": fields["ip"],
        "path": fields["path"],
        "key_prefix": api_key.prefix if isinstance(api_key, ApiKey) else None,
        "key_id": api_key.pk if isinstance(api_key, ApiKey) else fields.get("api_key_id"),
        "detail": fields["detail"],
    }
    level = logging.INFO if fields["kind"] in _INFO_KINDS else logging.WARNING
    logger.log(level, "security event: %s", fields["kind"], extra=extra)


def log_security_event(
    kind: str, *, ip: str | None, path: str = "", api_key: ApiKey | int | None = None, **detail: Any
) -> SecurityEvent | None:
    """Record a security event; a database failure is logged, never raised to the caller."""
    fields = _fields(kind, ip, path, api_key, detail)
    _log(fields)
    try:
        return SecurityEvent.objects.create(**fields)
    except DatabaseError:
        logger.exception("could not store security event %s", kind)
        return None


def log_key_event(
    kind: str, request: Any, api_key: ApiKey, *, by: str, **detail: Any
) -> SecurityEvent | None:
    """A key managed through `request` (the admin or the API) by `by`: created, revoked, rotated."""
    return log_security_event(
        kind, ip=client_ip(request), path=request.path, api_key=api_key, by=by, **detail
    )


async def alog_security_event(
    kind: str, *, ip: str | None, path: str = "", api_key: ApiKey | int | None = None, **detail: Any
) -> SecurityEvent | None:
    """Async variant of `log_security_event` (for consumers and async views)."""
    fields = _fields(kind, ip, path, api_key, detail)
    _log(fields)
    try:
        return await SecurityEvent.objects.acreate(**fields)
    except DatabaseError:
        logger.exception("could not store security event %s", kind)
        return None
