"""GET /statistics and the error records that feed it."""

from __future__ import annotations

from datetime import timedelta

import pytest
from asgiref.sync import sync_to_async
from django.db import connections
from django.utils import timezone

from conversations.models import Conversation, Message
from monitoring.statistics import percentiles
from telemetry.errors import arecord_error, error_rates, fingerprint, prune_buckets, record_error
from telemetry.models import ErrorBucket, ErrorRecord

pytestmark = pytest.mark.django_db


def _conversation(status: str, duration: float | None = None, days_ago: int = 0) -> Conversation:
    return Conversation.objects.create(
        status=status, duration=duration, created_at=timezone.now() - timedelta(days=days_ago)
    )


def _answer(
    conversation: Conversation,
    agent: str,
    model: str,
    latency_ms: float | None,
    status: str = Message.Status.OK,
) -> Message:
    return Message.objects.create(
        conversation=conversation,
        role=Message.Role.AGENT,
        agent_id=agent,
        turn=1,
        model=model,
        latency_ms=latency_ms,
        status=status,
    )


def test_statistics_needs_read(api_client, client_with):
    assert api_client.get("/statistics").status_code == 401
    assert client_with("write").get("/statistics").status_code == 403


def test_statistics_on_an_empty_database(client_with):
    body = client_with("read").get("/statistics").json()
    assert body["conversations"] == {
        "total_conversations": 0,
        "conversations_today": 0,
        "average_duration": None,
        "success_rate": None,
    }
    assert body["agents"] == {"total_messages": 0, "average_response_time": None, "model_distribution": {}}
    assert body["errors"] == {}
    assert isinstance(body["circuit_breakers"], dict)
    assert body["latency"]["agent_response_seconds"] == {"samples": 0, "p50": None, "p95": None, "p99": None}


def test_statistics_aggregates(client_with):
    done = _conversation(Conversation.Status.COMPLETED, duration=2.0)
    _conversation(Conversation.Status.NO_CONSENSUS, duration=4.0)
    _conversation(Conversation.Status.FAILED, duration=9.0)
    _conversation(Conversation.Status.COMPLETED, duration=6.0, days_ago=3)
    _conversation(Conversation.Status.RUNNING)
    for i, latency in enumerate([100.0, 200.0, 300.0, 400.0]):
        _answer(done, f"agent_{i}", "gemini-2.5-flash" if i < 3 else "gemini-2.5-pro", latency)
    _answer(done, "agent_9", "gemini-2.5-pro", None, status=Message.Status.FAILED)
    record_error("agent_call", "timeout after 30 s", agent_id="agent_9")

    body = client_with("read").get("/statistics").json()
    conversations = body["conversations"]
    assert conversations["total_conversations"] == 5
    assert conversations["conversations_today"] == 4
    assert conversations["average_duration"] == 4.0  # (2 + 4 + 6) / 3 successful runs
    assert conversations["success_rate"] == 0.75  # 3 of 4 finished (the running one is not counted)
    agents = body["agents"]
    assert agents["total_messages"] == 5
    assert agents["average_response_time"] == 0.25
    assert agents["model_distribution"] == {"gemini-2.5-flash": 0.6, "gemini-2.5-pro": 0.4}
    assert body["errors"] == {"agent_call": {"total_24h": 1, "rate_1h": round(1 / 60, 4)}}
    latency = body["latency"]["agent_response_seconds"]
    # percentile_cont over 100, 200, 300, 400 ms
    assert latency == {"samples": 4, "p50": 0.25, "p95": 0.385, "p99": 0.397}
    assert body["latency"]["conversation_duration_seconds"]["p50"] == 4.0


def test_percentiles_match_linear_interpolation():
    conversation = _conversation(Conversation.Status.COMPLETED)
    values = [float(v) for v in range(1, 102)]  # 1..101
    for i, v in enumerate(values):
        _answer(conversation, f"a{i}", "m", v)
    result = percentiles(Message.objects.all(), "latency_ms")
    assert result == {"samples": 101, "p50": 51.0, "p95": 96.0, "p99": 100.0}


def test_record_error_groups_by_fingerprint():
    record_error("agent_call", "agent_1 timed out after 30 s")
    record_error("agent_call", "agent_2 timed out after 45 s")
    record_error("agent_call", "quota exhausted")
    record_error("chat_conversation", "quota exhausted")
    assert fingerprint("agent_call", "agent_1 timed out after 30 s") == fingerprint(
        "agent_call", "agent_7 timed out after 5 s"
    )
    timeouts = ErrorRecord.objects.get(kind="agent_call", message__contains="timed out")
    assert timeouts.count == 2
    assert timeouts.message == "agent_2 timed out after 45 s"  # the latest occurrence
    assert timeouts.first_seen <= timeouts.last_seen
    assert ErrorRecord.objects.count() == 3
    assert error_rates()["agent_call"]["total_24h"] == 3


@pytest.mark.django_db(transaction=True)
async def test_arecord_error_counts_too():
    await arecord_error("chat_conversation", "boom", conversation_id="x")
    assert await ErrorRecord.objects.filter(kind="chat_conversation").acount() == 1
    await sync_to_async(connections.close_all)()  # the worker thread's connection, before teardown


def test_error_windows_of_24h_and_1h():
    now = timezone.now().replace(second=0, microsecond=0)
    ErrorBucket.objects.create(kind="agent_call", minute=now - timedelta(minutes=5), count=6)
    ErrorBucket.objects.create(kind="agent_call", minute=now - timedelta(hours=3), count=10)
    ErrorBucket.objects.create(kind="agent_call", minute=now - timedelta(hours=30), count=100)
    rates = error_rates(now)
    assert rates == {"agent_call": {"total_24h": 16, "rate_1h": 0.1}}
    assert prune_buckets(now) == 0
    assert prune_buckets(now + timedelta(hours=20)) == 1
