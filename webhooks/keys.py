"""Webhook secrets of API keys: created, rotated (the old one signs on during a grace period),
and loaded from DEFAULT_API_KEYS."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from gateway.models import ApiKey
from webhooks.models import WebhookKey
from webhooks.signing import new_secret


def webhook_key_rotate(*, hook_key: WebhookKey, secret: str | None = None) -> str:
    """A new secret for the key; the previous one keeps signing for WEBHOOK_SECRET_ROTATION_GRACE.

    Returns the new secret: the only time it is shown.
    """
    now = timezone.now()
    hook_key.previous_secret = hook_key.secret
    hook_key.previous_secret_until = now + timedelta(seconds=settings.CONFIG.WEBHOOK_SECRET_ROTATION_GRACE)
    hook_key.secret = secret or new_secret()
    hook_key.rotated_at = now
    hook_key.save(update_fields=["previous_secret", "previous_secret_until", "secret", "rotated_at"])
    return hook_key.secret


def webhook_key_create(*, api_key: ApiKey, default_url: str = "", secret: str | None = None) -> WebhookKey:
    """The key's webhook settings with a fresh secret (read it from the returned row, once)."""
    return WebhookKey.objects.create(api_key=api_key, default_url=default_url, secret=secret or new_secret())


def load_default_webhooks(specs: Iterable[Any]) -> None:
    """The webhook_url and webhook_secret of DEFAULT_API_KEYS entries, idempotently.

    Connected to gateway's `default_keys_loaded`, after the keys themselves are loaded. A changed
    secret replaces the old one at once (the deployment's configuration names one secret).
    """
    for spec in specs:
        url, secret = getattr(spec, "webhook_url", None), getattr(spec, "webhook_secret", None)
        if not url and not secret:
            continue
        with transaction.atomic():
            api_key = ApiKey.objects.filter(name=spec.name, source=ApiKey.Source.ENV).first()
            if api_key is None:
                continue
            hook_key = WebhookKey.objects.select_for_update().filter(api_key=api_key).first()
            if hook_key is None:
                webhook_key_create(api_key=api_key, default_url=url or "", secret=secret)
                continue
            wanted = {"default_url": url or "", **({"secret": secret} if secret else {})}
            changed = [name for name, value in wanted.items() if getattr(hook_key, name) != value]
            for name in changed:
                setattr(hook_key, name, wanted[name])
            if changed:
                hook_key.save(update_fields=changed)


def on_default_keys_loaded(sender: Any, specs: Iterable[Any], **kwargs: Any) -> None:
    load_default_webhooks(specs)
