"""Request and response shapes of the auth and key-management endpoints."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.utils import timezone
from rest_framework import serializers

from gateway.keys import PERMISSIONS
from gateway.models import ApiKey
from gateway.validation import SafeCharField, StrictPositiveNumberField


class TokenRequestSerializer(serializers.Serializer):
    """Either `api_key`, or `username` and `password`."""

    openapi_body_required = True  # its schema is a oneOf (gateway.openapi.TokenRequestExtension)

    api_key = SafeCharField(max_length=200, required=False)
    username = SafeCharField(max_length=150, required=False)
    password = serializers.CharField(max_length=256, required=False, trim_whitespace=False)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        has_key = "api_key" in attrs
        has_user = "username" in attrs or "password" in attrs
        if has_key and has_user:
            raise serializers.ValidationError("Send either api_key, or username and password, not both.")
        if not has_key and not has_user:
            raise serializers.ValidationError("Send api_key, or username and password.")
        if has_user:
            missing = [f for f in ("username", "password") if not attrs.get(f)]
            if missing:
                raise serializers.ValidationError({f: ["This field is required."] for f in missing})
        return attrs


class RefreshSerializer(serializers.Serializer):
    """A refresh token to rotate or revoke."""

    refresh = SafeCharField(max_length=4096)


class ApiKeySerializer(serializers.ModelSerializer):
    """A key as listed: never its secret or hash."""

    status = serializers.SerializerMethodField()

    class Meta:
        model = ApiKey
        fields: tuple[str, ...] = (
            "id",
            "name",
            "prefix",
            "permissions",
            "rate_limit_override",
            "source",
            "created_at",
            "expires_at",
            "revoked_at",
            "last_used_at",
            "replaced_by",
            "status",
            "daily_quota",
            "daily_quota_unit",
        )
        read_only_fields: tuple[str, ...] = fields

    def get_status(self, key: ApiKey) -> str:
        return key_status(key)


def key_status(key: ApiKey) -> str:
    """active, revoked, expired, or rotating (replaced, still in its grace period)."""
    if key.revoked_at is not None:
        return "revoked"
    if key.expires_at is not None and key.expires_at <= timezone.now():
        return "expired"
    if key.replaced_by_id is not None:
        return "rotating"
    return "active"


class ApiKeyCreateSerializer(serializers.Serializer):
    """A new key: name, permissions, optional rate-limit override and lifetime."""

    name = SafeCharField(max_length=100)
    permissions = serializers.ListField(
        child=serializers.ChoiceField(choices=PERMISSIONS), min_length=1, max_length=len(PERMISSIONS)
    )
    rate_limit_override = serializers.IntegerField(
        min_value=1, max_value=10_000_000, required=False, allow_null=True
    )
    expires_in_days = serializers.IntegerField(min_value=1, max_value=3650, required=False, allow_null=True)
    daily_quota = StrictPositiveNumberField(max_value=1e12, required=False, allow_null=True)
    daily_quota_unit = serializers.ChoiceField(choices=["tokens", "usd"], required=False, default="tokens")

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        days = attrs.pop("expires_in_days", None)
        attrs["expires_at"] = timezone.now() + timedelta(days=days) if days else None
        return attrs


class RotateSerializer(serializers.Serializer):
    """Optional grace period (seconds) for the key being replaced."""

    grace_seconds = serializers.IntegerField(
        min_value=0, max_value=90 * 86400, required=False, allow_null=True
    )


class TokenPairSerializer(serializers.Serializer):
    """Response of /auth/token and /auth/token/refresh (documentation only)."""

    access = serializers.CharField()
    refresh = serializers.CharField()
    token_type = serializers.CharField(default="Bearer")
    expires_in = serializers.IntegerField(help_text="Lifetime of the access token in seconds.")


class WhoAmISerializer(serializers.Serializer):
    """Response of /auth/whoami (documentation only)."""

    kind = serializers.ChoiceField(choices=["api_key", "user", "anonymous"])
    name = serializers.CharField()
    owner = serializers.CharField()
    permissions = serializers.ListField(child=serializers.CharField())
    key_prefix = serializers.CharField(allow_null=True)
    rate_limit_override = serializers.IntegerField(allow_null=True)
    quota = serializers.DictField(
        allow_null=True,
        help_text="The key's daily quota and today's usage (daily_quota, unit, used, reserved, remaining, "
        "day, resets_at), or null without a quota.",
    )


class ApiKeyCreatedSerializer(ApiKeySerializer):
    """A key with its raw secret, returned once on creation or rotation (documentation only)."""

    key = serializers.CharField(help_text="The raw key: shown once, store it now.")

    class Meta(ApiKeySerializer.Meta):
        fields = (*ApiKeySerializer.Meta.fields, "key")
        read_only_fields = fields
