"""Webhook settings in the admin (secret shown once, rotation), deliveries (redeliver), the
DEFAULT_API_KEYS fields, and the sweep that recreates what a lost hook never queued."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import timedelta

import pytest
from django.conf import settings
from django.contrib import admin
from django.test import Client
from django.urls import path
from django.utils import timezone

from conversations.models import Conversation
from gateway.keys import keys_load_defaults
from gateway.models import ApiKey
from polyagents_site.config import ApiKeySpec, load_config
from webhooks.keys import webhook_key_create
from webhooks.models import Delivery, RunWebhook, WebhookKey
from webhooks.signing import new_secret
from webhooks.tasks import sweep_once

urlpatterns = [path("django-admin/", admin.site.urls)]
pytestmark = [pytest.mark.urls("tests.test_webhooks_admin"), pytest.mark.django_db(transaction=True)]

SECRET_PATTERN = re.compile(r"whsec_[A-Za-z0-9+/]{43}=")
BASE = "/django-admin/webhooks"
KeyMaker = Callable[..., tuple[ApiKey, str]]


def shown_secrets(response: object) -> list[str]:
    return sorted({s for m in response.context["messages"] for s in SECRET_PATTERN.findall(str(m))})  # type: ignore[attr-defined]


def test_add_shows_the_secret_once_and_rotation_keeps_the_old_one(
    admin_client: Client, make_key: KeyMaker
) -> None:
    row, _ = make_key(["read", "write"])
    response = admin_client.post(
        f"{BASE}/webhookkey/add/",
        {"api_key": row.pk, "default_url": "https://hooks.example.com/in"},
        follow=True,
    )
    [secret] = shown_secrets(response)
    hook_key = WebhookKey.objects.get(api_key=row)
    assert hook_key.secret == secret
    page = admin_client.get(f"{BASE}/webhookkey/{hook_key.pk}/change/").content.decode()
    listing = admin_client.get(f"{BASE}/webhookkey/").content.decode()
    assert secret not in page
    assert secret not in listing
    response = admin_client.post(
        f"{BASE}/webhookkey/", {"action": "rotate_secret", "_selected_action": [hook_key.pk]}, follow=True
    )
    [rotated] = shown_secrets(response)
    hook_key.refresh_from_db()
    assert (hook_key.secret, hook_key.previous_secret) == (rotated, secret)
    assert hook_key.previous_secret_until is not None
    assert hook_key.previous_secret_until > timezone.now()


def test_deliveries_are_listed_and_redelivered(admin_client: Client, make_key: KeyMaker) -> None:
    row, _ = make_key(["read", "write"])
    conversation = Conversation.objects.create(api_key=row, owner=f"key:{row.pk}", status="completed")
    run = RunWebhook.objects.create(
        conversation=conversation, exchange=1, api_key=row, url="https://h.example/x"
    )
    delivery = Delivery.objects.create(
        run=run, event="conversation.completed", dedupe_key="d1", url=run.url, body="{}",
        status="failed", attempts=10, last_status=500, last_error="HTTP 500",
    )  # fmt: skip
    listing = admin_client.get(f"{BASE}/delivery/").content.decode()
    assert delivery.pk in listing
    assert "conversation.completed" in listing
    admin_client.post(
        f"{BASE}/delivery/", {"action": "redeliver", "_selected_action": [delivery.pk]}, follow=True
    )
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts, delivery.pk) == ("pending", 0, delivery.pk)
    assert delivery.next_attempt_at is not None


def test_default_api_keys_carry_a_webhook_url_and_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = new_secret()
    spec = ApiKeySpec(
        name="ops", key="pk_env_ops_0123456789abcdef", permissions=["write"],
        webhook_url="https://hooks.example.com/polyagents", webhook_secret=secret,
    )  # fmt: skip
    keys_load_defaults([spec])
    keys_load_defaults([spec])  # idempotent
    hook_key = WebhookKey.objects.get(api_key__name="ops")
    assert (hook_key.default_url, hook_key.secret) == ("https://hooks.example.com/polyagents", secret)
    assert WebhookKey.objects.count() == 1


@pytest.mark.parametrize(
    ("name", "value"),
    [("webhook_secret", "not-a-secret"), ("webhook_url", "ftp://x"), ("webhook_secret", "whsec_short")],
)
def test_bad_default_key_webhook_fields_stop_start_up(name: str, value: str) -> None:
    entry = {"name": "a", "key": "pk_0123456789abcdef0", "permissions": ["read"], name: value}
    with pytest.raises(SystemExit, match=f"DEFAULT_API_KEYS.0.{name}"):
        load_config(DEBUG=True, DEFAULT_API_KEYS=[entry])


def test_webhook_settings_are_validated() -> None:
    with pytest.raises(SystemExit, match="WEBHOOK_MAX_ATTEMPTS"):
        load_config(DEBUG=True, WEBHOOK_MAX_ATTEMPTS=3)
    with pytest.raises(SystemExit, match="WEBHOOK_ALLOWED_HOSTS"):
        load_config(DEBUG=True, WEBHOOK_ALLOWED_HOSTS=["http://x/"])
    assert load_config(DEBUG=True).WEBHOOK_TIMEOUT == 15.0
    assert settings.CONFIG.WEBHOOK_ALLOW_PRIVATE is False


async def test_sweep_queues_the_terminal_event_a_lost_hook_missed(make_key: KeyMaker) -> None:
    from asgiref.sync import sync_to_async

    row, _ = await sync_to_async(make_key)(["read", "write"])
    await sync_to_async(webhook_key_create)(api_key=row)
    ended = timezone.now() - timedelta(minutes=5)
    conversation = await Conversation.objects.acreate(
        api_key=row, owner=f"key:{row.pk}", status="no_consensus", completed_at=ended
    )
    await RunWebhook.objects.acreate(
        conversation=conversation, exchange=1, api_key=row, url="https://h.example/x"
    )
    report = await sweep_once()
    assert report["terminal_created"] == 1
    delivery = await Delivery.objects.aget()
    assert delivery.event == "conversation.no_consensus"
    assert (await sweep_once())["terminal_created"] == 0  # once


def test_a_job_that_fails_otherwise_is_retried_soon() -> None:
    """An attempt that fails for another reason (the database went away) is retried in 5-30 s;
    a failed attempt's own schedule is kept as it is."""
    from datetime import UTC, datetime

    from django.db import OperationalError
    from procrastinate.jobs import Job

    from webhooks.delivery import RetryAt
    from webhooks.tasks import UNEXPECTED_MAX_ATTEMPTS, DeliveryRetry

    strategy = DeliveryRetry(max_attempts=UNEXPECTED_MAX_ATTEMPTS)
    job = Job(id=1, queue="default", lock=None, queueing_lock=None, task_name="webhooks.deliver", attempts=3)
    when = datetime(2030, 1, 1, tzinfo=UTC)
    decision = strategy.get_retry_decision(exception=RetryAt(when), job=job)
    assert decision is not None
    assert decision.retry_at == when
    lost = strategy.get_retry_decision(exception=OperationalError("server closed the connection"), job=job)
    assert lost is not None
    assert lost.retry_at is not None
    assert 4 <= (lost.retry_at - datetime.now(UTC)).total_seconds() <= 31
    done = Job(id=1, queue="default", lock=None, queueing_lock=None, task_name="webhooks.deliver",
               attempts=UNEXPECTED_MAX_ATTEMPTS)  # fmt: skip
    assert strategy.get_retry_decision(exception=OperationalError("gone"), job=done) is None


def test_the_default_retries_span_about_a_day() -> None:
    from webhooks.delivery import backoff

    attempts = settings.CONFIG.WEBHOOK_MAX_ATTEMPTS
    assert attempts >= 8
    spans = [sum(backoff(n) for n in range(1, attempts)) / 3600 for _ in range(500)]
    assert min(spans) >= 20
    assert max(spans) <= 28
