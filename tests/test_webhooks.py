"""Webhooks of /stream runs: signed Standard Webhooks deliveries to a real local receiver,
verified with the `standardwebhooks` library; retries, 410, Retry-After, SSRF refusals."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.test import AsyncClient
from django.utils import timezone

from conversations.models import Conversation
from gateway.models import ApiKey
from streaming.jobs import wait_for_background_runs
from tests.webhook_receiver import Reply, receiving
from webhooks.delivery import attempt, wait_for_in_process
from webhooks.keys import webhook_key_create, webhook_key_rotate
from webhooks.models import Delivery, DisabledEndpoint, RunWebhook, WebhookKey
from webhooks.services import on_run_finished

pytestmark = pytest.mark.django_db(transaction=True)

KeyMaker = Callable[..., tuple[ApiKey, str]]


@pytest.fixture(autouse=True)
def _local_receivers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The receiver listens on 127.0.0.1 over http: allowed here, refused by default."""
    monkeypatch.setattr(settings.CONFIG, "WEBHOOK_ALLOW_PRIVATE", True)
    monkeypatch.setattr(settings.CONFIG, "WEBHOOK_ALLOWED_HOSTS", ["127.0.0.1"])
    monkeypatch.setattr(settings.CONFIG, "WEBHOOK_RETRY_WAIT", 0.05)


async def keyed(make_key: KeyMaker, permissions: list[str] | None = None) -> tuple[ApiKey, str, WebhookKey]:
    row, raw = await sync_to_async(make_key)(permissions or ["read", "write"])
    hook_key = await sync_to_async(webhook_key_create)(api_key=row)
    return row, raw, hook_key


async def post_stream(raw: str, body: dict[str, Any], conversation_id: uuid.UUID | None = None) -> Any:
    return await AsyncClient().post(
        f"/stream/{conversation_id or uuid.uuid4()}",
        body,
        content_type="application/json",
        headers={"Authorization": f"Bearer {raw}"},
    )


async def drain(until: Callable[[], Any], timeout: float = 30.0) -> None:
    """Run the background work (runs, then deliveries and their retries) until `until()` holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if settings.USING_POSTGRES:
            from streaming.tasks import run_worker_until_idle

            await run_worker_until_idle()
        else:
            await wait_for_background_runs(timeout=5)
            await wait_for_in_process(timeout=0.2)
        if await until():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the deliveries did not settle in time")


def settled(count: int = 1) -> Callable[[], Any]:
    async def check() -> bool:
        statuses = [s async for s in Delivery.objects.values_list("status", flat=True)]  # one query
        return len(statuses) >= count and Delivery.Status.PENDING not in statuses

    return check


async def finished_run(row: ApiKey, url: str, status: str = "completed") -> Conversation:
    """A finished /stream exchange with a webhook, its end announced through the hook."""
    conversation = await Conversation.objects.acreate(
        api_key=row, owner=f"key:{row.pk}", status=status, exchanges=1, consensus_result="42",
        confidence=0.8, completed_at=timezone.now(), metadata={"cost": {"cost_usd": 0.0012}},
    )  # fmt: skip
    await RunWebhook.objects.acreate(conversation=conversation, exchange=1, api_key=row, url=url)
    await on_run_finished(sender=Conversation, conversation=conversation, exchange=1, agreement=0.9)
    return conversation


async def test_stream_run_delivers_a_signed_completed_event(make_key: KeyMaker) -> None:
    row, raw, hook_key = await keyed(make_key)
    with receiving([hook_key.secret]) as receiver:
        response = await post_stream(raw, {"message": "Is water wet?", "num_agents": 2, "turns": 1,
                                           "webhook_url": receiver.url})  # fmt: skip
        assert response.status_code == 202, response.content
        await drain(settled())
    delivery = await Delivery.objects.aget()
    assert receiver.unverified == []
    assert len(receiver.received) == 1, (
        delivery.status,
        delivery.last_error,
        delivery.attempts,
        delivery.next_attempt_at,
        timezone.now(),
    )
    [got] = receiver.received
    assert got.verified_by == [hook_key.secret]
    body = got.json
    conversation = await Conversation.objects.aget(pk=response.json()["conversation_id"])
    assert body["type"] == f"conversation.{conversation.status}"
    assert set(body) == {"type", "timestamp", "data"}
    data = body["data"]
    assert data["conversation_id"] == str(conversation.pk)
    assert data["exchange"] == 1
    assert data["status"] == conversation.status
    assert data["confidence"] == conversation.confidence
    assert 0.0 <= data["agreement"] <= 1.0
    assert data["cost_usd"] == pytest.approx(conversation.cost_usd)
    assert raw not in got.body.decode()  # no API key
    assert row.prefix not in got.body.decode()
    delivery = await Delivery.objects.aget()
    assert got.headers["webhook-id"] == delivery.pk
    assert (delivery.status, delivery.attempts, delivery.last_status) == ("delivered", 1, 204)


async def test_turn_events_are_sent_when_asked(make_key: KeyMaker) -> None:
    _, raw, hook_key = await keyed(make_key)
    with receiving([hook_key.secret]) as receiver:
        response = await post_stream(raw, {"message": "Is water wet?", "num_agents": 2, "turns": 1,
                                           "webhook_url": receiver.url, "webhook_turns": True})  # fmt: skip
        assert response.status_code == 202, response.content
        await drain(settled(3))
    turns = [r.json["data"] for r in receiver.received if r.json["type"] == "conversation.agent_turn"]
    assert len(turns) == 2
    assert len(receiver.received) == 3
    assert len({t["agent_id"] for t in turns}) == 2
    assert all(t["turn"] == 1 for t in turns)
    assert all(t["content"] for t in turns)
    terminal = [r.json["type"] for r in receiver.received if r.json["type"] != "conversation.agent_turn"]
    assert terminal in (["conversation.completed"], ["conversation.no_consensus"])
    assert receiver.unverified == []


async def test_a_500_is_retried_then_accepted_with_the_same_id(make_key: KeyMaker) -> None:
    row, _, hook_key = await keyed(make_key)
    with receiving([hook_key.secret]) as receiver:
        receiver.script = [Reply(500), Reply(502), Reply(200)]
        await finished_run(row, receiver.url)
        await drain(settled())
    assert [r.headers["webhook-id"] for r in receiver.received] == [
        receiver.received[0].headers["webhook-id"]
    ] * 3
    assert len({r.headers["webhook-timestamp"] for r in receiver.received}) >= 1
    assert receiver.unverified == []
    delivery = await Delivery.objects.aget()
    assert (delivery.status, delivery.attempts, delivery.last_status) == ("delivered", 3, 200)
    assert delivery.next_attempt_at is None
    assert delivery.delivered_at is not None


async def test_a_3xx_is_not_followed(make_key: KeyMaker) -> None:
    row, _, hook_key = await keyed(make_key)
    with receiving([hook_key.secret]) as receiver:
        receiver.script = [Reply(307, {"location": "http://169.254.169.254/"}), Reply(204)]
        await finished_run(row, receiver.url)
        await drain(settled())
    assert len(receiver.received) == 2  # retried at the same URL, never sent to the location
    delivery = await Delivery.objects.aget()
    assert (delivery.status, delivery.attempts) == ("delivered", 2)


async def test_410_disables_the_endpoint(make_key: KeyMaker) -> None:
    row, raw, hook_key = await keyed(make_key)
    with receiving([hook_key.secret]) as receiver:
        receiver.script = [Reply(410)]
        await finished_run(row, receiver.url)
        await drain(settled())
        assert len(receiver.received) == 1
        delivery = await Delivery.objects.aget()
        assert (delivery.status, delivery.last_status) == ("disabled", 410)
        assert await DisabledEndpoint.objects.filter(api_key=row, url=receiver.url).aexists()
        # A later run's delivery to it is not sent, and a request naming it is refused.
        await finished_run(row, receiver.url)
        await drain(settled(2))
        assert len(receiver.received) == 1
        response = await post_stream(raw, {"message": "hi", "webhook_url": receiver.url})
    assert response.status_code == 400
    assert "webhook_url" in response.json()["errors"]


async def test_429_waits_for_retry_after(make_key: KeyMaker) -> None:
    row, _, hook_key = await keyed(make_key)
    with receiving([hook_key.secret]) as receiver:
        receiver.script = [Reply(429, {"retry-after": "2"}), Reply(503, {"retry-after": "1"}), Reply(200)]
        await finished_run(row, receiver.url)
        await drain(settled())
    first, second, third = receiver.received
    assert second.at - first.at >= 1.9  # backoff alone would be about 0.05 s
    assert third.at - second.at >= 0.9
    assert receiver.unverified == []


async def test_rotation_sends_both_signatures(make_key: KeyMaker) -> None:
    row, _, hook_key = await keyed(make_key)
    old = hook_key.secret
    new = await sync_to_async(webhook_key_rotate)(hook_key=hook_key)
    assert new != old
    assert new.startswith("whsec_")
    with receiving([old, new]) as receiver:
        await finished_run(row, receiver.url)
        await drain(settled())
    [got] = receiver.received
    assert receiver.unverified == []
    assert got.verified_by == [old, new]
    assert len(got.headers["webhook-signature"].split(" ")) == 2
    # After the grace period only the new secret signs.
    await WebhookKey.objects.filter(pk=hook_key.pk).aupdate(previous_secret_until=timezone.now())
    with receiving([new]) as receiver:
        await finished_run(row, receiver.url)
        await drain(settled(2))
    assert len(receiver.received[0].headers["webhook-signature"].split(" ")) == 1
    assert receiver.unverified == []


@pytest.mark.parametrize(
    ("url", "allow_private", "reason"),
    [
        ("https://169.254.169.254/latest/meta-data/", True, "link-local"),
        ("https://[::ffff:169.254.169.254]/", True, "link-local"),
        ("https://[fe80::1]/", True, "link-local"),
        ("http://127.0.0.1:9/hook", False, "loopback"),
        ("https://10.1.2.3/hook", False, "private"),
        ("https://localhost/hook", False, "loopback"),
        ("http://example.com/hook", False, "https"),
        ("ftp://example.com/hook", False, "http(s)"),
        ("https://user:pw@example.com/hook", False, "credentials"),
    ],
)
async def test_unsafe_urls_are_refused_with_a_400_naming_the_field(
    make_key: KeyMaker, monkeypatch: pytest.MonkeyPatch, url: str, allow_private: bool, reason: str
) -> None:
    monkeypatch.setattr(settings.CONFIG, "WEBHOOK_ALLOW_PRIVATE", allow_private)
    monkeypatch.setattr(settings.CONFIG, "WEBHOOK_ALLOWED_HOSTS", ["127.0.0.1"])
    _, raw, _ = await keyed(make_key)
    conversation_id = uuid.uuid4()
    response = await post_stream(raw, {"message": "hi", "webhook_url": url}, conversation_id)
    assert response.status_code == 400, response.content
    details = response.json()["errors"]
    assert list(details) == ["webhook_url"]
    assert reason in details["webhook_url"][0]
    assert not await Conversation.objects.filter(pk=conversation_id).aexists()  # nothing written


async def test_a_key_without_a_webhook_secret_is_refused(make_key: KeyMaker) -> None:
    _, raw = await sync_to_async(make_key)(["read", "write"])
    response = await post_stream(raw, {"message": "hi", "webhook_url": "https://example.com/hook"})
    assert response.status_code == 400
    assert "webhook_url" in response.json()["errors"]


async def test_the_address_is_checked_again_at_delivery_time(
    make_key: KeyMaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    row, _, hook_key = await keyed(make_key)
    with receiving([hook_key.secret]) as receiver:
        await finished_run(row, receiver.url)
        monkeypatch.setattr(settings.CONFIG, "WEBHOOK_ALLOW_PRIVATE", False)
        await drain(settled())
    assert receiver.received == []
    delivery = await Delivery.objects.aget()
    assert delivery.status == "failed"
    assert "loopback" in delivery.last_error


async def test_the_key_default_url_is_used(make_key: KeyMaker) -> None:
    _, raw, hook_key = await keyed(make_key)
    with receiving([hook_key.secret]) as receiver:
        hook_key.default_url = receiver.url
        await hook_key.asave()
        response = await post_stream(raw, {"message": "Is water wet?", "num_agents": 2, "turns": 1})
        assert response.status_code == 202
        await drain(settled())
    assert [r.json["data"]["conversation_id"] for r in receiver.received] == [
        response.json()["conversation_id"]
    ]


async def test_attempts_give_up_after_the_maximum(
    make_key: KeyMaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(settings.CONFIG, "WEBHOOK_MAX_ATTEMPTS", 3)
    row, _, hook_key = await keyed(make_key)
    with receiving([hook_key.secret]) as receiver:
        receiver.default = Reply(500)
        await finished_run(row, receiver.url)
        await drain(settled())
    delivery = await Delivery.objects.aget()
    assert (delivery.status, delivery.attempts, len(receiver.received)) == ("failed", 3, 3)


async def test_a_delivered_event_is_not_sent_again(make_key: KeyMaker) -> None:
    row, _, hook_key = await keyed(make_key)
    with receiving([hook_key.secret]) as receiver:
        conversation = await finished_run(row, receiver.url)
        await drain(settled())
        await on_run_finished(sender=Conversation, conversation=conversation, exchange=1)  # a repeated hook
        delivery = await Delivery.objects.aget()
        assert await attempt(delivery.pk) is None
    assert len(receiver.received) == 1
