"""Request metadata: the client's IP address and the request id carried into log records."""

from __future__ import annotations

import ipaddress
import logging
from contextvars import ContextVar
from typing import Any

from django.conf import settings

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)


def normalize_ip(value: str | None) -> str | None:
    """The address in canonical form, or None when it is not an IP address."""
    if not value:
        return None
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        return None


def client_ip(source: Any) -> str | None:
    """The client IP of an HttpRequest, a DRF Request or an ASGI scope dict.

    X-Forwarded-For is read only with TRUST_X_FORWARDED_FOR=true, and then its FIRST address
    is taken (the original client as reported by the proxy chain). Turn it on only behind a
    proxy that overwrites the header, otherwise clients can choose their own address.
    """
    forwarded: str | None
    if isinstance(source, dict):  # ASGI scope (HTTP or WebSocket)
        headers = {name.lower(): value for name, value in source.get("headers", [])}
        raw = headers.get(b"x-forwarded-for")
        forwarded = raw.decode("latin-1") if raw else None
        client = source.get("client")
        remote = client[0] if client else None
    else:
        request = getattr(source, "_request", source)  # unwrap DRF's Request
        forwarded = request.META.get("HTTP_X_FORWARDED_FOR")
        remote = request.META.get("REMOTE_ADDR")
    if settings.CONFIG.TRUST_X_FORWARDED_FOR and forwarded:
        first = normalize_ip(forwarded.split(",")[0])
        if first:
            return first
    return normalize_ip(remote)


class RequestIdFilter(logging.Filter):
    """Adds `request_id` to every log record emitted while a request is being served."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = request_id_var.get()
        if request_id is not None and not hasattr(record, "request_id"):
            record.request_id = request_id
        return True
