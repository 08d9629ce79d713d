"""Django admin for API keys (shown once on creation), security events and blocked IPs."""

from __future__ import annotations

import math
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from gateway import quota
from gateway.keys import PERMISSIONS, PREFIX_LENGTH, key_revoke, key_rotate
from gateway.models import ApiKey, BlockedIP, QuotaUnit, QuotaUsage, SecurityEvent, generate_key, hash_key
from gateway.security import log_key_event, log_security_event
from gateway.serializers import key_status


class ApiKeyForm(forms.ModelForm):
    """Name, permissions as checkboxes, rate-limit override and expiry; never the hash."""

    permissions = forms.MultipleChoiceField(
        choices=[(p, p) for p in PERMISSIONS],
        widget=forms.CheckboxSelectMultiple,
        help_text="admin implies read and write.",
    )

    class Meta:
        model = ApiKey
        fields = (
            "name",
            "permissions",
            "rate_limit_override",
            "daily_quota",
            "daily_quota_unit",
            "expires_at",
        )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        unit = self.fields["daily_quota_unit"]
        unit.required = False  # empty means tokens
        unit.help_text = "Unit of the daily quota: tokens, or estimated cost in USD."

    def clean_daily_quota_unit(self) -> str:
        return self.cleaned_data.get("daily_quota_unit") or QuotaUnit.TOKENS

    def clean_daily_quota(self) -> float | None:
        value = self.cleaned_data.get("daily_quota")
        if value is not None and not (math.isfinite(value) and 0 < value <= 1e12):
            raise forms.ValidationError("A positive number (tokens or USD per UTC day), or empty for none.")
        return value

    def clean_permissions(self) -> list[str]:
        chosen = set(self.cleaned_data["permissions"])
        return [p for p in PERMISSIONS if p in chosen]


def _admin_user(request: HttpRequest) -> str:
    """Who did it, as security events record an admin-site user."""
    return f"admin:{request.user.get_username()}"


def _show_key_once(request: HttpRequest, raw: str, what: str) -> None:
    messages.warning(
        request,
        f"{what}: {raw} — copy it now, it is shown only once (only its hash is stored). "
        f"Use it as: Authorization: Bearer {raw}",
    )


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    form = ApiKeyForm
    list_display = (
        "name",
        "prefix",
        "permission_list",
        "source",
        "created_at",
        "last_used_at",
        "expires_at",
        "revoked_at",
        "status",
        "quota_today",
    )
    list_filter = ("source", "revoked_at", "created_at")
    search_fields = ("name", "prefix")
    readonly_fields = (
        "prefix",
        "source",
        "created_at",
        "last_used_at",
        "revoked_at",
        "replaced_by",
        "quota_today",
    )
    actions = ("revoke_keys", "rotate_keys")
    ordering = ("-created_at",)

    def get_readonly_fields(self, request: HttpRequest, obj: ApiKey | None = None) -> tuple[str, ...]:
        return () if obj is None else self.readonly_fields

    def get_fields(self, request: HttpRequest, obj: ApiKey | None = None) -> list[str]:  # type: ignore[override]
        base = ["name", "permissions", "rate_limit_override", "daily_quota", "daily_quota_unit", "expires_at"]
        return base if obj is None else base + list(self.readonly_fields)

    @admin.display(description="permissions")
    def permission_list(self, obj: ApiKey) -> str:
        return ", ".join(obj.permissions)

    @admin.display(description="quota used today")
    def quota_today(self, obj: ApiKey) -> str:
        state = quota.usage(obj.pk)
        if state is None:
            return "no quota"
        body = state.to_dict()
        reserved = f" (+{body['reserved']:g} reserved)" if state.reserved else ""
        return f"{body['used']:g}{reserved} of {state.quota:g} {state.unit}"

    @admin.display(description="status")
    def status(self, obj: ApiKey) -> str:
        return key_status(obj)

    def save_model(self, request: HttpRequest, obj: ApiKey, form: Any, change: bool) -> None:
        if change:
            super().save_model(request, obj, form, change)
            return
        raw = generate_key()
        obj.prefix, obj.key_hash = raw[:PREFIX_LENGTH], hash_key(raw)
        super().save_model(request, obj, form, change)
        log_key_event("key_created", request, obj, by=_admin_user(request))
        _show_key_once(request, raw, f"New API key {obj.name!r}")

    @admin.action(description="Revoke selected keys")
    def revoke_keys(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        count = 0
        for key in queryset.filter(revoked_at__isnull=True):
            key_revoke(key=key)
            log_key_event("key_revoked", request, key, by=_admin_user(request))
            count += 1
        self.message_user(request, f"Revoked {count} key(s).", messages.SUCCESS)

    @admin.action(description="Rotate selected keys (old keys keep working for the grace period)")
    def rotate_keys(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        for key in queryset:
            if key.revoked_at is not None:
                self.message_user(request, f"{key} is revoked and was not rotated.", messages.ERROR)
                continue
            issued = key_rotate(key=key)
            log_key_event("key_rotated", request, key, by=_admin_user(request), new_key=issued.key.pk)
            until = f"{key.expires_at:%Y-%m-%d %H:%M:%S} UTC" if key.expires_at else "-"
            _show_key_once(request, issued.raw, f"Replacement for {key.name!r} (old key valid until {until})")


@admin.register(QuotaUsage)
class QuotaUsageAdmin(admin.ModelAdmin):
    """Settled usage of each key and UTC day (read-only; written when conversations end)."""

    list_display = ("day", "api_key", "used", "reserved", "unit", "updated_at")
    list_filter = ("day", "unit")
    search_fields = ("api_key__name", "api_key__prefix")
    date_hierarchy = "day"
    ordering = ("-day",)
    list_select_related = ("api_key",)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: QuotaUsage | None = None) -> bool:
        return False


@admin.register(SecurityEvent)
class SecurityEventAdmin(admin.ModelAdmin):
    list_display = ("created_at", "kind", "ip", "path", "api_key")
    list_filter = ("kind", "created_at")
    search_fields = ("ip", "path")
    date_hierarchy = "created_at"
    ordering = ("-created_at",)
    list_select_related = ("api_key",)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: SecurityEvent | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: SecurityEvent | None = None) -> bool:
        return False


def _log_unblock(request: HttpRequest, block: BlockedIP) -> None:
    log_security_event(
        "ip_unblocked",
        ip=block.ip,
        path=request.path,
        reason=block.reason,
        by=_admin_user(request),
    )


@admin.register(BlockedIP)
class BlockedIPAdmin(admin.ModelAdmin):
    list_display = ("ip", "reason", "created_at", "expires_at", "active")
    search_fields = ("ip", "reason")
    list_filter = ("created_at",)
    ordering = ("-created_at",)
    actions = ("lift_blocks",)

    @admin.display(boolean=True, description="active")
    def active(self, obj: BlockedIP) -> bool:
        return obj.is_active()

    @admin.action(description="Lift selected blocks")
    def lift_blocks(self, request: HttpRequest, queryset: QuerySet[BlockedIP]) -> None:
        blocks = list(queryset)
        self.delete_queryset(request, queryset)
        self.message_user(request, f"Lifted {len(blocks)} block(s).", messages.SUCCESS)

    def delete_model(self, request: HttpRequest, obj: BlockedIP) -> None:
        _log_unblock(request, obj)
        super().delete_model(request, obj)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[BlockedIP]) -> None:
        for block in queryset:
            _log_unblock(request, block)
        super().delete_queryset(request, queryset)
