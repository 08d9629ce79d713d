"""What a /stream request asks of webhooks, and the deliveries a run's events create.

`conversations` knows nothing of this app: it sends `run_finished` and `agent_turn`
(conversations/signals.py), which `WebhooksConfig.ready` connects to `on_run_finished` and
`on_agent_turn` here.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from django.db import IntegrityError
from django.utils import timezone
from rest_framework.exceptions import ValidationError

from conversations.models import ConsensusResult, Conversation
from gateway.principal import Principal
from webhooks.delivery import enqueue
from webhooks.models import Delivery, DisabledEndpoint, RunWebhook, WebhookKey
from webhooks.safety import UnsafeURL, resolve

logger = logging.getLogger("polyagents.webhooks")

# The request fields of POST /stream that belong to webhooks (the rest is the /chat body).
REQUEST_FIELDS = ("webhook_url", "webhook_turns")

TERMINAL_EVENTS = {
    Conversation.Status.COMPLETED: "conversation.completed",
    Conversation.Status.NO_CONSENSUS: "conversation.no_consensus",
    Conversation.Status.FAILED: "conversation.failed",
    Conversation.Status.CANCELLED: "conversation.failed",
}
TURN_EVENT = "conversation.agent_turn"


@dataclass(frozen=True)
class Subscription:
    """A checked webhook for one /stream exchange."""

    api_key_id: int
    url: str
    turns: bool


def split_request(data: Any) -> tuple[Any, dict[str, Any]]:
    """The /chat part of a /stream body, and its webhook fields (left to the body when not a dict)."""
    if not isinstance(data, dict):
        return data, {}
    rest = {k: v for k, v in data.items() if k not in REQUEST_FIELDS}
    return rest, {k: data[k] for k in REQUEST_FIELDS if k in data}


def _refuse(field: str, message: str) -> ValidationError:
    return ValidationError({field: [message]})


async def asubscription(principal: Principal, fields: dict[str, Any]) -> Subscription | None:
    """The webhook a /stream request asks for (its own URL, else its key's default), checked.

    Raises a 400 ValidationError naming `webhook_url` (or `webhook_turns`) when it is refused.
    """
    url = fields.get("webhook_url")
    turns = fields.get("webhook_turns", False)
    if not isinstance(turns, bool):
        raise _refuse("webhook_turns", "Must be true or false.")
    if url is not None and not isinstance(url, str):
        raise _refuse("webhook_url", "Must be a URL string.")
    key_id = principal.api_key_id if principal.kind == "api_key" else None
    hook_key = await WebhookKey.objects.filter(api_key_id=key_id).afirst() if key_id is not None else None
    if url is None:
        if hook_key is None or not hook_key.default_url:
            if turns:
                raise _refuse("webhook_turns", "Needs a webhook_url (or a default one for this API key).")
            return None
        url = hook_key.default_url
    if key_id is None or hook_key is None:
        raise _refuse("webhook_url", "Webhooks need an API key with a webhook secret (set in the admin).")
    if await DisabledEndpoint.objects.filter(api_key_id=key_id, url=url).aexists():
        raise _refuse("webhook_url", "This endpoint answered 410 Gone and is disabled for this key.")
    try:
        await resolve(url)
    except UnsafeURL as exc:
        raise _refuse("webhook_url", f"Refused: {exc}.") from None
    return Subscription(api_key_id=key_id, url=url, turns=turns)


async def asubscribe(subscription: Subscription, *, conversation_id: uuid.UUID, exchange: int) -> None:
    """Attach the webhook to an exchange before its run is queued."""
    await RunWebhook.objects.aupdate_or_create(
        conversation_id=conversation_id,
        exchange=exchange,
        defaults={
            "api_key_id": subscription.api_key_id,
            "url": subscription.url,
            "turns": subscription.turns,
        },
    )
    # The run sends `agent_turn` only when its conversation's metadata asks (conversations.services).
    metadata = await Conversation.objects.filter(pk=conversation_id).values_list("metadata", flat=True).aget()
    if bool(metadata.get("notify_turns")) != subscription.turns:
        metadata = {**metadata, "notify_turns": subscription.turns}
        await Conversation.objects.filter(pk=conversation_id).aupdate(metadata=metadata)


def body_of(event: str, when: datetime, data: dict[str, Any]) -> str:
    """The Standard Webhooks body: type, timestamp and data (never the API key)."""
    return orjson.dumps({"type": event, "timestamp": when.isoformat(), "data": data}).decode()


async def _add(run: RunWebhook, event: str, dedupe: str, data: dict[str, Any]) -> Delivery | None:
    """Store one delivery and queue it; None when that event of that run was queued before."""
    now = timezone.now()
    try:
        delivery = await Delivery.objects.acreate(
            run=run, event=event, dedupe_key=dedupe, url=run.url, body=body_of(event, now, data),
            next_attempt_at=now,
        )  # fmt: skip
    except IntegrityError:
        return None
    await enqueue(delivery.pk)
    return delivery


def terminal_data(conversation: Conversation, exchange: int, agreement: float | None) -> dict[str, Any]:
    cost = (conversation.metadata or {}).get("cost") or {}
    return {
        "conversation_id": str(conversation.pk),
        "exchange": exchange,
        "status": conversation.status,
        "consensus_result": conversation.consensus_result or None,
        "confidence": conversation.confidence,
        "agreement": agreement,
        "cost_usd": cost.get("cost_usd", conversation.cost_usd),
        "error": conversation.error or None,
    }


async def adeliver_terminal(
    run: RunWebhook, conversation: Conversation, agreement: float | None
) -> Delivery | None:
    """Queue the terminal event of a run (once), and mark the run finished."""
    event = TERMINAL_EVENTS.get(Conversation.Status(conversation.status))
    if event is None:
        return None
    if agreement is None:
        details = (
            await ConsensusResult.objects.filter(conversation_id=conversation.pk, exchange=run.exchange)
            .values_list("details", flat=True)
            .afirst()
        )
        agreement = (details or {}).get("agreement")
    data = terminal_data(conversation, run.exchange, agreement)
    delivery = await _add(run, event, f"{run.pk}:terminal", data)
    await RunWebhook.objects.filter(pk=run.pk).aupdate(finished_at=timezone.now())
    return delivery


async def on_run_finished(
    sender: Any, conversation: Conversation, exchange: int, agreement: float | None = None, **kwargs: Any
) -> None:
    """A run ended (completed, without consensus, failed or cancelled): report it if it asked."""
    run = await RunWebhook.objects.filter(conversation_id=conversation.pk, exchange=exchange).afirst()
    if run is not None and run.finished_at is None:
        await adeliver_terminal(run, conversation, agreement)


async def on_agent_turn(
    sender: Any, conversation: Conversation, exchange: int, data: dict[str, Any], **kwargs: Any
) -> None:
    """An agent answered a turn: report it when the exchange opted in to per-turn events."""
    run = await RunWebhook.objects.filter(
        conversation_id=conversation.pk, exchange=exchange, turns=True
    ).afirst()
    if run is None:
        return
    fields = ("agent_id", "turn", "content", "model", "position", "confidence", "latency_ms", "abstained")
    payload = {"conversation_id": str(conversation.pk), "exchange": exchange}
    payload.update({name: data.get(name) for name in fields})
    await _add(run, TURN_EVENT, f"{run.pk}:turn:{data.get('turn')}:{data.get('agent_id')}", payload)
