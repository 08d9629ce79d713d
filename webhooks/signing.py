"""Standard Webhooks signatures: `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32
SECRET_PATTERN = re.compile(r"^whsec_[A-Za-z0-9+/]{32,}={0,2}$")


def new_secret() -> str:
    """A fresh signing secret: `whsec_` and 32 random bytes in base64 (the spec's form)."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode("ascii")


def is_secret(value: str) -> bool:
    if not SECRET_PATTERN.match(value):
        return False
    try:
        return len(base64.b64decode(value.removeprefix(SECRET_PREFIX), validate=True)) >= 24
    except ValueError:
        return False


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """One `v1,<signature>` entry of the webhook-signature header."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def headers(secrets_in_use: list[str], message_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The three Standard Webhooks headers; several secrets (a rotation) sign space-separated."""
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(sign(s, message_id, timestamp, body) for s in secrets_in_use),
    }
