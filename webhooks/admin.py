"""Admin: each key's webhook URL and secret (shown once, rotatable), disabled endpoints, and
every delivery with its attempts, last status and next try (redeliverable)."""

from __future__ import annotations

from typing import Any

from asgiref.sync import async_to_sync
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils import timezone

from webhooks.delivery import enqueue
from webhooks.keys import webhook_key_rotate
from webhooks.models import Delivery, DisabledEndpoint, WebhookKey
from webhooks.signing import new_secret


def _show_secret(request: HttpRequest, hook_key: WebhookKey, secret: str) -> None:
    messages.warning(
        request, f"Webhook secret of key {hook_key.api_key}: {secret} (shown once: copy it now)."
    )


@admin.register(WebhookKey)
class WebhookKeyAdmin(admin.ModelAdmin):
    list_display = ("api_key", "default_url", "secret_hint", "rotated_at", "previous_secret_until")
    fields = ("api_key", "default_url", "secret_hint", "created_at", "rotated_at", "previous_secret_until")
    readonly_fields = ("secret_hint", "created_at", "rotated_at", "previous_secret_until")
    actions = ["rotate_secret"]

    def get_readonly_fields(self, request: HttpRequest, obj: WebhookKey | None = None) -> Any:
        return ("api_key", *self.readonly_fields) if obj is not None else self.readonly_fields

    def save_model(self, request: HttpRequest, obj: WebhookKey, form: Any, change: bool) -> None:
        if not change:
            obj.secret = new_secret()
        super().save_model(request, obj, form, change)
        if not change:
            _show_secret(request, obj, obj.secret)

    @admin.action(description="Rotate the secret (the old one signs too for the grace period)")
    def rotate_secret(self, request: HttpRequest, queryset: QuerySet[WebhookKey]) -> None:
        for hook_key in queryset:
            _show_secret(request, hook_key, webhook_key_rotate(hook_key=hook_key))


@admin.register(DisabledEndpoint)
class DisabledEndpointAdmin(admin.ModelAdmin):
    """Deleting a row enables its endpoint again."""

    list_display = ("url", "api_key", "reason", "created_at")
    readonly_fields = ("api_key", "url", "reason", "created_at")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False


@admin.register(Delivery)
class DeliveryAdmin(admin.ModelAdmin):
    list_display = (
        "id",
        "event",
        "url",
        "status",
        "attempts",
        "last_status",
        "next_attempt_at",
        "created_at",
    )
    list_filter = ("status", "event")
    search_fields = ("id", "url", "run__conversation__id")
    readonly_fields = [f.name for f in Delivery._meta.fields]
    actions = ["redeliver"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    @admin.action(description="Redeliver (same webhook-id, attempts start again)")
    def redeliver(self, request: HttpRequest, queryset: QuerySet[Delivery]) -> None:
        now = timezone.now()
        ids = list(queryset.values_list("pk", flat=True))
        queryset.update(status=Delivery.Status.PENDING, attempts=0, next_attempt_at=now, last_error="")
        for delivery_id in ids:
            async_to_sync(enqueue)(delivery_id)
        self.message_user(request, f"{len(ids)} deliveries queued again.")
