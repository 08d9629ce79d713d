"""GET /conversations/recent and GET /conversations/{id}, scoped to the caller."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.utils import timezone

from conversations.models import ConsensusResult, Conversation, Message, Vote
from gateway.models import ApiKey, generate_key, hash_key

pytestmark = pytest.mark.django_db


def _keyed_client(api_client, permissions: list[str]) -> tuple:
    raw = generate_key()
    row = ApiKey.objects.create(name="k", prefix=raw[:10], key_hash=hash_key(raw), permissions=permissions)
    api_client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    return api_client, f"key:{row.pk}"


def _conversation(owner: str, title: str = "q", minutes_ago: int = 0) -> Conversation:
    conversation = Conversation.objects.create(
        owner=owner,
        title=title,
        status=Conversation.Status.COMPLETED,
        num_agents=2,
        created_at=timezone.now() - timedelta(minutes=minutes_ago),
        consensus_result="Yes.",
    )
    Message.objects.create(conversation=conversation, role=Message.Role.USER, content=title)
    for agent in ("agent_0", "agent_1"):
        Message.objects.create(
            conversation=conversation,
            role=Message.Role.AGENT,
            agent_id=agent,
            turn=1,
            content=f"{agent} says yes",
            model="gemini-2.5-flash",
            latency_ms=12.5,
        )
        Vote.objects.create(conversation=conversation, voter=agent, choice="A", confidence=0.9)
    ConsensusResult.objects.create(
        conversation=conversation, method="majority", reached=True, winner="A", answer="Yes.", confidence=1.0
    )
    return conversation


def test_recent_lists_own_conversations_newest_first(api_client):
    client, owner = _keyed_client(api_client, ["read"])
    old = _conversation(owner, "old", minutes_ago=10)
    new = _conversation(owner, "new", minutes_ago=1)
    _conversation("key:someone-else", "theirs")
    body = client.get("/conversations/recent").json()
    assert [c["conversation_id"] for c in body["conversations"]] == [str(new.pk), str(old.pk)]
    assert body["count"] == 2
    assert body["conversations"][0]["title"] == "new"


def test_recent_limit(api_client):
    client, owner = _keyed_client(api_client, ["read"])
    for i in range(12):
        _conversation(owner, f"c{i}", minutes_ago=i)
    assert client.get("/conversations/recent").json()["count"] == 10
    assert client.get("/conversations/recent?limit=3").json()["count"] == 3


def test_recent_filtered_by_status(api_client):
    client, owner = _keyed_client(api_client, ["read"])
    done = _conversation(owner, "done", minutes_ago=3)
    failed = _conversation(owner, "failed", minutes_ago=2)
    Conversation.objects.filter(pk=failed.pk).update(status=Conversation.Status.FAILED)
    theirs = _conversation("key:someone-else", "theirs, failed")
    Conversation.objects.filter(pk=theirs.pk).update(status=Conversation.Status.FAILED)
    body = client.get("/conversations/recent?status=failed").json()
    assert [c["conversation_id"] for c in body["conversations"]] == [str(failed.pk)]
    assert body["conversations"][0]["status"] == "failed"
    assert [
        c["conversation_id"]
        for c in client.get("/conversations/recent?status=completed").json()["conversations"]
    ] == [str(done.pk)]
    assert client.get("/conversations/recent?status=running").json() == {"conversations": [], "count": 0}
    assert client.get("/conversations/recent").json()["count"] == 2


@pytest.mark.parametrize("status", ["finished", "COMPLETED", "", "completed,failed"])
def test_recent_unknown_status_is_a_400(client_with, status):
    response = client_with("read").get("/conversations/recent", {"status": status})
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == "invalid"
    assert "status" in body["errors"]


@pytest.mark.parametrize("limit", ["0", "101", "abc", "-1", "1.5"])
def test_recent_bad_limit_is_a_400(client_with, limit):
    response = client_with("read").get(f"/conversations/recent?limit={limit}")
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == "invalid"
    assert "limit" in body["errors"]


def test_admin_sees_everyone(api_client):
    client, _ = _keyed_client(api_client, ["admin"])
    _conversation("key:1")
    _conversation("key:2")
    assert client.get("/conversations/recent").json()["count"] == 2


def test_detail_has_messages_votes_and_results(api_client):
    client, owner = _keyed_client(api_client, ["read"])
    conversation = _conversation(owner, "Is water wet?")
    response = client.get(f"/conversations/{conversation.pk}")
    assert response.status_code == 200
    body = response.json()
    assert body["conversation_id"] == str(conversation.pk)
    assert [m["role"] for m in body["messages"]] == ["user", "agent", "agent"]
    assert body["messages"][1]["model"] == "gemini-2.5-flash"
    assert [v["voter"] for v in body["votes"]] == ["agent_0", "agent_1"]
    assert body["consensus_results"][0]["winner"] == "A"
    assert body["consensus_results"][0]["reached"] is True


def test_detail_of_someone_elses_conversation_is_a_404(api_client):
    client, _ = _keyed_client(api_client, ["read"])
    theirs = _conversation("key:someone-else")
    response = client.get(f"/conversations/{theirs.pk}")
    assert response.status_code == 404
    assert response.json()["code"] == "not_found"


@pytest.mark.parametrize("ident", [str(uuid.uuid4()), "not-a-uuid", "1234", "%20"])
def test_detail_unknown_or_malformed_id_is_a_404(client_with, ident):
    response = client_with("read").get(f"/conversations/{ident}")
    assert response.status_code == 404
    assert response.json()["code"] == "not_found"


def test_history_needs_authentication(api_client):
    assert api_client.get("/conversations/recent").status_code == 401
    assert api_client.get(f"/conversations/{uuid.uuid4()}").status_code == 401
