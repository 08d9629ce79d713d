"""/v1 in process: its guards (keys, JWT, permissions, IP blocks, CORS), every parameter's
acceptance or refusal, OpenAI's error shape, a completion stored like any conversation, a stream."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.test import AsyncClient
from rest_framework.test import APIClient

from conversations.models import Conversation
from gateway.blocking import block_ip
from panels.specs import PanelSpec

QUESTION = "Should cities ban cars?"
ASK = {"model": "default", "messages": [{"role": "user", "content": QUESTION}]}


def error_of(response: Any) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return dict(body["error"])


@pytest.fixture
def writer(client_with: Any) -> APIClient:
    return client_with("read", "write")


@pytest.mark.django_db
def test_unauthenticated_and_forbidden_requests_get_openai_errors(client_with: Any) -> None:
    anonymous = APIClient().post("/v1/chat/completions", ASK, format="json")
    assert anonymous.status_code == 401
    assert error_of(anonymous)["code"] == "invalid_api_key"
    bad = APIClient(HTTP_AUTHORIZATION="Bearer pk_" + "x" * 43).get("/v1/models")
    assert bad.status_code == 401
    assert error_of(bad)["code"] == "invalid_api_key"
    reader = client_with("read").post("/v1/chat/completions", ASK, format="json")
    assert reader.status_code == 403
    assert error_of(reader)["type"] == "permission_error"
    assert Conversation.objects.count() == 0


@pytest.mark.django_db
def test_a_jwt_works_as_a_key_does(make_key: Any) -> None:
    _, raw = make_key(["read"])
    access = APIClient().post("/auth/token", {"api_key": raw}, format="json").json()["access"]
    response = APIClient(HTTP_AUTHORIZATION=f"Bearer {access}").get("/v1/models")
    assert response.status_code == 200
    assert response.json()["object"] == "list"


@pytest.mark.django_db
def test_a_blocked_ip_is_refused(writer: APIClient) -> None:
    block_ip("198.51.100.7", seconds=60, reason="test")
    response = writer.post("/v1/chat/completions", ASK, format="json", REMOTE_ADDR="198.51.100.7")
    assert response.status_code == 403


@pytest.mark.django_db
def test_cors_preflight_allows_a_configured_origin(settings: Any) -> None:
    settings.CORS_ALLOWED_ORIGINS = ["https://app.example.com"]
    response = APIClient().options(
        "/v1/chat/completions",
        HTTP_ORIGIN="https://app.example.com",
        HTTP_ACCESS_CONTROL_REQUEST_METHOD="POST",
    )
    assert response["Access-Control-Allow-Origin"] == "https://app.example.com"
    other = APIClient().options(
        "/v1/chat/completions", HTTP_ORIGIN="https://evil.example", HTTP_ACCESS_CONTROL_REQUEST_METHOD="POST"
    )
    assert "Access-Control-Allow-Origin" not in other


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 2}, "n"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"seed": 7}, "seed"),
        ({"stop": "\n"}, "stop"),
        ({"metadata": {"a": "b"}}, "metadata"),
        ({"top_p": 0.5}, "top_p"),
        ({"surprise": 1}, "surprise"),
        ({"temperature": 3}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": -1}, "max_completion_tokens"),
        ({"stream": "yes"}, "stream"),
        ({"stream": True, "stream_options": {"include_usage": True, "x": 1}}, "stream_options"),
        ({"user": 5}, "user"),
        ({"model": 5}, "model"),
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": "   "}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": "bell\x07"}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": "x" * 8001}]}, "messages[0].content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages[0].content[0]",
        ),
        ({"messages": [{"role": "user", "content": "hi", "tool_calls": []}]}, "messages[0].tool_calls"),
    ],
)
def test_refused_parameters_are_named(writer: APIClient, extra: dict[str, Any], param: str) -> None:
    response = writer.post("/v1/chat/completions", {**ASK, **extra}, format="json")
    assert response.status_code == 400, response.content
    error = error_of(response)
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert Conversation.objects.count() == 0


@pytest.mark.django_db
def test_malformed_json_is_an_openai_400(writer: APIClient) -> None:
    response = writer.post("/v1/chat/completions", "{not json", content_type="application/json")
    assert response.status_code == 400
    assert error_of(response)["type"] == "invalid_request_error"


@pytest.mark.django_db
def test_an_unknown_model_is_model_not_found(writer: APIClient) -> None:
    for response in (
        writer.post("/v1/chat/completions", {**ASK, "model": "gpt-4o"}, format="json"),
        writer.get("/v1/models/gpt-4o"),
    ):
        assert response.status_code == 404
        assert error_of(response)["code"] == "model_not_found"


@pytest.mark.django_db
def test_a_budget_too_small_is_refused_before_it_starts(writer: APIClient) -> None:
    response = writer.post("/v1/chat/completions", {**ASK, "max_tokens": 1}, format="json")
    assert response.status_code == 422
    assert error_of(response)["code"] == "budget_too_small"
    assert Conversation.objects.count() == 0


@pytest.mark.django_db(transaction=True)
def test_a_completion_is_stored_and_shown_like_any_conversation(writer: APIClient, settings: Any) -> None:
    settings.CONFIG = settings.CONFIG.model_copy(
        update={
            "PANELS": {"duo": PanelSpec.model_validate({"agents": [{"model": "sim-a"}, {"model": "sim-b"}]})}
        }
    )
    body = {
        "model": "duo",
        "messages": [
            {"role": "system", "content": "Answer as a town planner."},
            {"role": "user", "content": "What about bikes?"},
            {"role": "assistant", "content": "Bikes are fine."},
            {"role": "user", "content": [{"type": "text", "text": QUESTION}]},
        ],
        "temperature": 0.1,
        "user": "alice",
        "n": 1,
        "logprobs": False,
        "response_format": {"type": "text"},
    }
    response = writer.post("/v1/chat/completions", body, format="json")
    assert response.status_code == 200, response.content
    reply = response.json()
    assert reply["object"] == "chat.completion"
    conversation = Conversation.objects.get(pk=reply["polyagents"]["conversation_id"])
    assert reply["choices"][0]["message"]["content"] == (
        conversation.consensus_result or reply["choices"][0]["message"]["content"]
    )
    assert reply["usage"]["total_tokens"] == conversation.prompt_tokens + conversation.completion_tokens
    assert conversation.title == QUESTION
    assert conversation.metadata["user"] == "alice"
    assert conversation.metadata["panel"] == "duo"
    agents = conversation.metadata["agents"]
    assert [a["model"] for a in agents] == ["sim-a", "sim-b"]
    assert {a["temperature"] for a in agents} == {0.1}
    assert all("Answer as a town planner." in a["instruction"] for a in agents)
    assert all("assistant: Bikes are fine." in a["instruction"] for a in agents)
    recent = writer.get("/conversations/recent").json()["conversations"]
    assert [c["conversation_id"] for c in recent] == [str(conversation.pk)]
    assert writer.get(f"/conversations/{conversation.pk}").status_code == 200


@pytest.mark.django_db(transaction=True)
async def test_a_stream_ends_with_the_stored_answer_and_done(make_key: Any) -> None:
    from asgiref.sync import sync_to_async

    _, raw = await sync_to_async(make_key)(["read", "write"])
    response = await AsyncClient().post(
        "/v1/chat/completions",
        {**ASK, "stream": True, "stream_options": {"include_usage": True}},
        content_type="application/json",
        headers={"Authorization": f"Bearer {raw}"},
    )
    assert response.status_code == 200
    assert response["Content-Type"] == "text/event-stream"
    text = "".join([part.decode() async for part in response.streaming_content])  # type: ignore[attr-defined]
    events = [line.removeprefix("data: ") for line in text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"] == []
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    conversation = await Conversation.objects.aget(pk=chunks[-2]["polyagents"]["conversation_id"])
    assert content == conversation.consensus_result
    assert chunks[-1]["usage"]["prompt_tokens"] == conversation.prompt_tokens
