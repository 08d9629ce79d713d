"""The Django admin: keys shown once, revoke and rotate actions, read-only events, lifting blocks."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import timedelta

import pytest
from django.contrib import admin
from django.test import Client
from django.urls import path
from django.utils import timezone

from gateway.auth import authenticate_bearer
from gateway.models import ApiKey, BlockedIP, SecurityEvent, hash_key

urlpatterns = [path("django-admin/", admin.site.urls)]
pytestmark = [pytest.mark.urls("tests.test_admin"), pytest.mark.django_db]

KEY_PATTERN = re.compile(r"pk_[A-Za-z0-9_-]{43}")
BASE = "/django-admin/gateway"


def shown_keys(response: object) -> list[str]:
    """Distinct raw keys in the messages of a response."""
    return sorted({m for msg in response.context["messages"] for m in KEY_PATTERN.findall(str(msg))})  # type: ignore[attr-defined]


class TestApiKeyAdmin:
    def test_add_shows_the_key_once(self, admin_client: Client) -> None:
        response = admin_client.post(
            f"{BASE}/apikey/add/",
            {
                "name": "svc",
                "permissions": ["read", "write"],
                "rate_limit_override": "50",
                "expires_at_0": "",
                "expires_at_1": "",
            },
            follow=True,
        )
        assert response.status_code == 200
        keys = shown_keys(response)
        assert len(keys) == 1
        row = ApiKey.objects.get(name="svc")
        assert row.key_hash == hash_key(keys[0])
        assert row.prefix == keys[0][:10]
        assert row.permissions == ["read", "write"]
        assert row.rate_limit_override == 50
        assert authenticate_bearer(keys[0]).api_key_id == row.pk
        # Never again: not on the change page, not in the list.
        change = admin_client.get(f"{BASE}/apikey/{row.pk}/change/")
        listing = admin_client.get(f"{BASE}/apikey/")
        assert keys[0] not in change.content.decode()
        assert keys[0] not in listing.content.decode()
        assert row.key_hash not in change.content.decode()
        assert SecurityEvent.objects.filter(kind="key_created", api_key=row).exists()

    def test_add_refuses_no_permissions(self, admin_client: Client) -> None:
        response = admin_client.post(
            f"{BASE}/apikey/add/", {"name": "svc", "expires_at_0": "", "expires_at_1": ""}
        )
        assert response.status_code == 200  # the form again, with its error
        assert not ApiKey.objects.exists()

    def test_list_shows_status_and_prefix(
        self, admin_client: Client, make_key: Callable[..., tuple[ApiKey, str]]
    ) -> None:
        active, _ = make_key(["read"], name="alive")
        make_key(["read"], name="gone", revoked_at=timezone.now())
        page = admin_client.get(f"{BASE}/apikey/").content.decode()
        assert active.prefix in page
        assert "revoked" in page
        assert "active" in page

    def test_change_form_cannot_edit_the_hash(
        self, admin_client: Client, make_key: Callable[..., tuple[ApiKey, str]]
    ) -> None:
        row, _ = make_key(["read"])
        page = admin_client.get(f"{BASE}/apikey/{row.pk}/change/").content.decode()
        assert 'name="key_hash"' not in page
        assert 'name="prefix"' not in page

    def test_revoke_action(self, admin_client: Client, make_key: Callable[..., tuple[ApiKey, str]]) -> None:
        row, _ = make_key(["read"])
        response = admin_client.post(
            f"{BASE}/apikey/", {"action": "revoke_keys", "_selected_action": [row.pk]}, follow=True
        )
        assert response.status_code == 200
        row.refresh_from_db()
        assert row.revoked_at is not None
        assert SecurityEvent.objects.filter(kind="key_revoked", api_key=row).exists()

    def test_rotate_action_shows_new_key_once(
        self, admin_client: Client, make_key: Callable[..., tuple[ApiKey, str]]
    ) -> None:
        row, old_raw = make_key(["read", "write"])
        response = admin_client.post(
            f"{BASE}/apikey/", {"action": "rotate_keys", "_selected_action": [row.pk]}, follow=True
        )
        keys = shown_keys(response)
        assert len(keys) == 1
        new = ApiKey.objects.get(key_hash=hash_key(keys[0]))
        row.refresh_from_db()
        assert row.replaced_by == new
        assert new.permissions == ["read", "write"]
        assert authenticate_bearer(old_raw).api_key_id == row.pk  # grace period
        assert authenticate_bearer(keys[0]).api_key_id == new.pk


class TestSecurityEventAdmin:
    def test_read_only_with_filters_and_ip_search(self, admin_client: Client) -> None:
        SecurityEvent.objects.create(kind="auth_failed", ip="10.1.2.3", path="/chat")
        SecurityEvent.objects.create(kind="rate_limited", ip="10.9.9.9", path="/chat")
        assert admin_client.get(f"{BASE}/securityevent/add/").status_code == 403
        event = SecurityEvent.objects.first()
        assert event is not None
        change = admin_client.post(f"{BASE}/securityevent/{event.pk}/change/", {"kind": "ip_blocked"})
        assert change.status_code == 403
        searched = admin_client.get(f"{BASE}/securityevent/", {"q": "10.1.2.3"}).content.decode()
        assert "10.1.2.3" in searched
        assert "10.9.9.9" not in searched
        filtered = admin_client.get(
            f"{BASE}/securityevent/", {"kind__exact": "rate_limited"}
        ).content.decode()
        assert "10.9.9.9" in filtered
        assert "10.1.2.3" not in filtered


class TestBlockedIPAdmin:
    def test_lift_block_action(self, admin_client: Client) -> None:
        block = BlockedIP.block_for("10.4.4.4", 3600, "too many failures")
        BlockedIP.block_for("10.5.5.5", 3600, "too many failures")
        listing = admin_client.get(f"{BASE}/blockedip/", {"q": "10.4.4.4"}).content.decode()
        assert "10.4.4.4" in listing
        assert "10.5.5.5" not in listing
        admin_client.post(
            f"{BASE}/blockedip/", {"action": "lift_blocks", "_selected_action": [block.pk]}, follow=True
        )
        assert list(BlockedIP.objects.values_list("ip", flat=True)) == ["10.5.5.5"]
        event = SecurityEvent.objects.get(kind="ip_unblocked")
        assert event.ip == "10.4.4.4"

    def test_delete_also_records_the_unblock(self, admin_client: Client) -> None:
        block = BlockedIP.objects.create(ip="10.6.6.6", expires_at=timezone.now() + timedelta(hours=1))
        admin_client.post(f"{BASE}/blockedip/{block.pk}/delete/", {"post": "yes"})
        assert not BlockedIP.objects.exists()
        assert SecurityEvent.objects.filter(kind="ip_unblocked", ip="10.6.6.6").exists()
