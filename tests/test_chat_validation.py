"""Hostile input to POST /chat: every bad body gets a 400 JSON error naming the field, and writes nothing."""

from __future__ import annotations

import json

import pytest

from conversations.models import Conversation, Message

BIG = "x" * 8001

HOSTILE_BODIES = [
    pytest.param({}, "message", id="missing-message"),
    pytest.param({"message": ""}, "message", id="empty-message"),
    pytest.param({"message": "   "}, "message", id="blank-message"),
    pytest.param({"message": BIG}, "message", id="oversized-message"),
    pytest.param({"message": 42}, "message", id="message-not-a-string"),
    pytest.param({"message": ["a", "b"]}, "message", id="message-a-list"),
    pytest.param({"message": {"$gt": ""}}, "message", id="message-an-object"),
    pytest.param({"message": "hi\x00there"}, "message", id="nul-byte"),
    pytest.param({"message": "bell\x07"}, "message", id="control-character"),
    pytest.param({"message": "esc\x1b[31m"}, "message", id="ansi-escape"),
    pytest.param({"message": "ok", "conversation_id": "not-a-uuid"}, "conversation_id", id="bad-uuid"),
    pytest.param({"message": "ok", "conversation_id": "1' OR '1'='1"}, "conversation_id", id="sql-in-uuid"),
    pytest.param({"message": "ok", "conversation_id": 12}, "conversation_id", id="uuid-a-number"),
    pytest.param({"message": "ok", "num_agents": 0}, "num_agents", id="zero-agents"),
    pytest.param({"message": "ok", "num_agents": -3}, "num_agents", id="negative-agents"),
    pytest.param({"message": "ok", "num_agents": 10_000}, "num_agents", id="too-many-agents"),
    pytest.param({"message": "ok", "num_agents": "three"}, "num_agents", id="agents-a-word"),
    pytest.param({"message": "ok", "num_agents": 2.5}, "num_agents", id="fractional-agents"),
    pytest.param({"message": "ok", "num_agents": 10**30}, "num_agents", id="huge-integer"),
    pytest.param({"message": "ok", "turns": 0}, "turns", id="zero-turns"),
    pytest.param({"message": "ok", "turns": 999}, "turns", id="too-many-turns"),
    pytest.param({"message": "ok", "turns": [2]}, "turns", id="turns-a-list"),
    pytest.param({"message": "ok", "strategy": "dictator"}, "strategy", id="unknown-strategy"),
    pytest.param({"message": "ok", "admin": True}, "admin", id="unknown-field"),
]


@pytest.mark.django_db
@pytest.mark.parametrize(("body", "field"), HOSTILE_BODIES)
def test_hostile_chat_bodies_get_a_400_naming_the_field(client_with, body, field):
    response = client_with("read", "write").post("/chat", body, format="json")
    assert response.status_code == 400, response.content
    payload = response.json()
    assert payload["code"] in ("invalid", "validation_error", "invalid_input")
    assert field in payload["errors"]
    assert Conversation.objects.count() == 0
    assert Message.objects.count() == 0


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("raw", "content_type"),
    [
        pytest.param(b"{not json", "application/json", id="malformed-json"),
        pytest.param(b"[1, 2, 3]", "application/json", id="json-array"),
        pytest.param(b'"just a string"', "application/json", id="json-string"),
        pytest.param(b"message=hi", "application/x-www-form-urlencoded", id="form-encoded"),
        pytest.param(b"\xff\xfe\x00", "application/json", id="binary-garbage"),
    ],
)
def test_bodies_that_are_not_a_json_object_are_refused(client_with, raw, content_type):
    response = client_with("read", "write").generic("POST", "/chat", raw, content_type=content_type)
    assert 400 <= response.status_code < 500, response.content
    assert response["Content-Type"].startswith("application/json")
    assert Conversation.objects.count() == 0


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    "payload",
    [
        "'; DROP TABLE conversations_conversation; --",
        "<script>alert('x')</script><img src=x onerror=alert(1)>",
        "Robert'); DELETE FROM gateway_apikey WHERE ('1'='1",
    ],
)
def test_sql_and_html_payloads_are_stored_inert_and_returned_escaped(client_with, payload):
    client = client_with("read", "write")
    response = client.post("/chat", {"message": payload, "num_agents": 1, "turns": 1}, format="json")
    assert response.status_code == 200, response.content
    stored = Message.objects.get(role="user")
    assert stored.content == payload  # stored verbatim, as data
    assert Conversation.objects.count() == 1  # and the tables are all still there
    # JSON never carries raw markup: '<' is escaped when the body is rendered for HTML contexts.
    assert response["Content-Type"].startswith("application/json")
    assert json.loads(response.content)["conversation_id"]


@pytest.mark.django_db
def test_an_oversized_body_is_a_413_before_it_is_parsed(client_with):
    body = b'{"message": "' + b"a" * (1024 * 1024 + 10) + b'"}'
    response = client_with("read", "write").generic("POST", "/chat", body, content_type="application/json")
    assert response.status_code == 413
    assert response.json()["code"] == "payload_too_large"
    assert Conversation.objects.count() == 0


@pytest.mark.django_db
def test_deeply_nested_json_is_a_400_not_a_500(client_with):
    body = ("[" * 100_000 + "]" * 100_000).encode()
    response = client_with("read", "write").generic("POST", "/chat", body, content_type="application/json")
    assert response.status_code == 400
