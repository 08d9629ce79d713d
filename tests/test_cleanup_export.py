"""POST /admin/cleanup, GET /admin/export, the cleanup/export commands and the Django admin."""

from __future__ import annotations

import csv
import io
import json
from datetime import timedelta
from typing import Any

import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.core.management import CommandError, call_command
from django.utils import timezone

from archive import vectors
from conversations.events import stream_key
from conversations.models import ConsensusResult, Conversation, Event, Message, Vote
from tests.conftest import requires_redis

pytestmark = pytest.mark.django_db


def _conversation(days_ago: float, question: str = "q?") -> Conversation:
    conversation = Conversation.objects.create(
        created_at=timezone.now() - timedelta(days=days_ago),
        status="completed",
        title=question,
        consensus_result="=SUM(A1)" if days_ago > 100 else "Yes.",
    )
    Message.objects.create(conversation=conversation, role=Message.Role.USER, content=question)
    Message.objects.create(
        conversation=conversation,
        role=Message.Role.AGENT,
        agent_id="agent_0",
        turn=1,
        content="yes, 1,2",
        model="m",
    )
    Vote.objects.create(conversation=conversation, voter="agent_0", choice="A")
    ConsensusResult.objects.create(conversation=conversation, method="majority", confidence=1.0)
    Event.objects.create(conversation=conversation, seq=1, type="conversation_started")
    return conversation


def _streamed(response) -> str:
    return b"".join(response.streaming_content).decode()


def test_cleanup_needs_admin(api_client, client_with):
    assert api_client.post("/admin/cleanup").status_code == 401
    response = client_with("read", "write").post("/admin/cleanup")
    assert response.status_code == 403
    assert response.json()["code"] == "permission_denied"


def test_cleanup_deletes_old_rows_only(client_with):
    old = [_conversation(40), _conversation(31)]
    recent = _conversation(2)
    response = client_with("admin").post("/admin/cleanup?days=30")
    assert response.status_code == 200
    body = response.json()
    assert body["days_threshold"] == 30
    assert body["dry_run"] is False
    assert body["cleanup_results"]["postgresql"] == {
        "conversations": 2,
        "messages": 4,
        "votes": 2,
        "consensus_results": 2,
        "events": 2,
    }
    assert "deleted_streams" in body["cleanup_results"]["redis"]
    assert list(Conversation.objects.values_list("pk", flat=True)) == [recent.pk]
    assert not Message.objects.filter(conversation_id__in=[c.pk for c in old]).exists()
    assert Event.objects.count() == 1


def test_cleanup_dry_run_deletes_nothing(client_with):
    _conversation(40)
    body = client_with("admin").post("/admin/cleanup?days=30&dry_run=true").json()
    assert body["dry_run"] is True
    assert body["cleanup_results"]["postgresql"]["conversations"] == 1
    assert Conversation.objects.count() == 1


@pytest.mark.parametrize("query", ["days=0", "days=abc", "days=-5", "days=99999999", "dry_run=maybe"])
def test_cleanup_bad_params(client_with, query):
    response = client_with("admin").post(f"/admin/cleanup?{query}")
    assert response.status_code == 400
    assert response.json()["code"] == "invalid"


@requires_redis
def test_cleanup_deletes_redis_streams(client_with):
    import redis

    old, recent = _conversation(40), _conversation(1)
    conn = redis.Redis.from_url(str(settings.REDIS_URL))
    for conversation in (old, recent):
        conn.xadd(stream_key(conversation.pk), {"seq": "1"})
    try:
        dry = client_with("admin").post("/admin/cleanup?days=30&dry_run=1").json()
        assert dry["cleanup_results"]["redis"]["deleted_streams"] == 1
        assert conn.exists(stream_key(old.pk))
        body = client_with("admin").post("/admin/cleanup?days=30").json()
        assert body["cleanup_results"]["redis"]["deleted_streams"] == 1
        assert not conn.exists(stream_key(old.pk))
        assert conn.exists(stream_key(recent.pk))
    finally:
        conn.delete(stream_key(old.pk), stream_key(recent.pk))
        conn.close()


def test_cleanup_deletes_qdrant_points(client_with, settings):
    settings.CONFIG = settings.CONFIG.model_copy(
        update={"QDRANT_LOCAL_PATH": ":memory:", "QDRANT_URL": None, "GEMINI_API_KEY": None}
    )
    vectors.reset_client()
    try:
        old, recent = _conversation(40, "old wind"), _conversation(1, "new wind")
        assert vectors.index_conversation(old.pk)
        assert vectors.index_conversation(recent.pk)
        body = client_with("admin").post("/admin/cleanup?days=30").json()
        assert body["cleanup_results"]["qdrant"] == {"enabled": True, "deleted_points": 1}
        assert [cid for cid, _ in vectors.search("wind", 10)] == [str(recent.pk)]
    finally:
        vectors.reset_client()


def test_export_json(client_with):
    _conversation(1, "first?")
    _conversation(3, "second?")
    _conversation(30, "too old?")
    response = client_with("admin").get("/admin/export?format=json&days=7")
    assert response.status_code == 200
    assert response["Content-Type"] == "application/json"
    assert response["Content-Disposition"].startswith('attachment; filename="polyagents-conversations-')
    assert response["Content-Disposition"].endswith('.json"')
    data = json.loads(_streamed(response))
    assert data["days"] == 7
    assert [c["title"] for c in data["conversations"]] == ["second?", "first?"]  # oldest first
    assert [m["role"] for m in data["conversations"][0]["messages"]] == ["user", "agent"]


def test_export_jsonl_and_csv(client_with):
    _conversation(1, "first?")
    _conversation(200, "ancient?")
    client = client_with("admin")
    jsonl = client.get("/admin/export?format=jsonl&days=7")
    assert jsonl["Content-Type"] == "application/x-ndjson"
    lines = _streamed(jsonl).splitlines()
    assert [json.loads(line)["title"] for line in lines] == ["first?"]
    csv_response = client.get("/admin/export?format=csv&days=365")
    assert csv_response["Content-Type"] == "text/csv; charset=utf-8"
    rows = list(csv.DictReader(io.StringIO(_streamed(csv_response))))
    assert len(rows) == 4  # two messages for each conversation
    assert {row["content"] for row in rows} >= {"yes, 1,2", "first?"}
    assert {row["consensus_result"] for row in rows} == {"Yes.", "'=SUM(A1)"}  # formula neutralised


def test_export_empty_json_is_valid(client_with):
    assert json.loads(_streamed(client_with("admin").get("/admin/export"))) == {
        "days": 7,
        "conversations": [],
    }


@pytest.mark.parametrize("query", ["format=xml", "days=0", "days=x", "format="])
def test_export_bad_params(client_with, query):
    response = client_with("admin").get(f"/admin/export?{query}")
    assert response.status_code == 400
    assert response.json()["code"] == "invalid"


def test_export_needs_admin(client_with):
    assert client_with("read").get("/admin/export").status_code == 403


def test_cleanup_command(capsys):
    _conversation(40)
    _conversation(1)
    call_command("cleanup", "--days", "30", "--dry-run")
    assert json.loads(capsys.readouterr().out)["cleanup_results"]["postgresql"]["conversations"] == 1
    assert Conversation.objects.count() == 2
    call_command("cleanup", "--days", "30")
    assert Conversation.objects.count() == 1
    with pytest.raises(CommandError):
        call_command("cleanup", "--days", "0")


def test_export_command(tmp_path, capsys):
    _conversation(1, "exported?")
    target = tmp_path / "out.jsonl"
    call_command("export", "--format", "jsonl", "--days", "7", "--output", str(target))
    assert json.loads(target.read_text())["title"] == "exported?"
    call_command("export", "--format", "csv", "--days", "7")
    assert capsys.readouterr().out.startswith("conversation_id,created_at,status")
    with pytest.raises(CommandError):
        call_command("export", "--days", "0")


def test_django_admin_lists_searches_and_exports(client):
    user = User.objects.create_superuser("root", "root@example.com", "pw-123456789")
    client.force_login(user)
    conversation = _conversation(1, "Is the sky blue?")
    _conversation(2, "Unrelated")
    listing = client.get("/django-admin/conversations/conversation/?q=sky")
    assert listing.status_code == 200
    assert "Is the sky blue?" in listing.content.decode()
    assert "Unrelated" not in listing.content.decode()
    assert client.get(f"/django-admin/conversations/conversation/?q={conversation.pk}").status_code == 200
    assert client.get("/django-admin/conversations/conversation/?status__exact=completed").status_code == 200
    change = client.get(f"/django-admin/conversations/conversation/{conversation.pk}/change/")
    assert change.status_code == 200
    assert "yes, 1,2" in change.content.decode()  # the message inline
    exported = client.post(
        "/django-admin/conversations/conversation/",
        {
            "action": "export_json",
            "_selected_action": [str(conversation.pk)],
        },
    )
    assert exported.status_code == 200
    data = json.loads(exported.content)
    assert data[0]["conversation_id"] == str(conversation.pk)
    assert data[0]["votes"][0]["voter"] == "agent_0"


@pytest.mark.django_db(transaction=True)
async def test_export_streams_asynchronously_under_asgi(make_key):
    from asgiref.sync import sync_to_async
    from django.test import AsyncClient

    await sync_to_async(_conversation)(1, "streamed?")
    _, raw = await sync_to_async(make_key)(["admin"])
    response: Any = await AsyncClient().get(
        "/admin/export?format=jsonl", headers={"Authorization": f"Bearer {raw}"}
    )
    assert response.status_code == 200
    assert response.is_async  # an async iterator: Django does not buffer the export whole
    chunks = [chunk async for chunk in response.streaming_content]
    assert json.loads(b"".join(chunks))["title"] == "streamed?"


def test_periodic_retention_uses_retention_days(settings):
    from archive.retention import retention_apply

    settings.CONFIG = settings.CONFIG.model_copy(update={"RETENTION_DAYS": 10})
    _conversation(11)
    keep = _conversation(9)
    result = retention_apply()
    assert result["days_threshold"] == 10
    assert list(Conversation.objects.values_list("pk", flat=True)) == [keep.pk]
