"""The OpenAPI schema's contract, checked fast (tests/test_schema_fuzz.py checks it against the server)."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from gateway.openapi import SAFE_NON_BLANK_PATTERN

pytestmark = pytest.mark.django_db

ERROR_REF = "#/components/schemas/Error"


@pytest.fixture
def schema(api_client: Any) -> dict[str, Any]:
    response = api_client.get("/schema", HTTP_ACCEPT="application/vnd.oai.openapi")
    assert response.status_code == 200
    return yaml.safe_load(response.content)


def operations(schema: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(path, method, op) for path, item in schema["paths"].items() for method, op in item.items()]


def error_ref(response: dict[str, Any]) -> str:
    """The error schema's reference; /v1 (OpenAI-compatible) errors are OpenAI's shape, whose
    403 may also be the gateway's IP block: both count as the documented error."""
    schema = response["content"]["application/json"]["schema"]
    shapes = schema.get("anyOf", [schema])
    if all(s.get("properties", {}).keys() & {"error", "detail"} for s in shapes) and "$ref" not in schema:
        return ERROR_REF
    return str(schema["$ref"])


def test_every_operation_documents_403_and_the_authenticated_ones_401(schema: dict[str, Any]) -> None:
    for path, method, op in operations(schema):
        responses = op["responses"]
        assert error_ref(responses["403"]) == ERROR_REF, (path, method)  # ip_blocked answers every path
        needs_credentials = {} not in op.get("security", [{}])
        if needs_credentials or path.startswith("/auth/token"):
            assert error_ref(responses["401"]) == ERROR_REF, (path, method)


def test_validated_input_documents_400_and_bodies_413(schema: dict[str, Any]) -> None:
    for path, method, op in operations(schema):
        queries = [p for p in op.get("parameters", []) if p["in"] == "query"]
        if "requestBody" in op or queries:
            assert error_ref(op["responses"]["400"]) == ERROR_REF, (path, method)
        if "requestBody" in op:
            assert "413" in op["responses"], (path, method)


def test_the_error_shape(schema: dict[str, Any]) -> None:
    error = schema["components"]["schemas"]["Error"]
    assert set(error["properties"]) == {"detail", "code", "errors"}
    assert sorted(error["required"]) == ["code", "detail"]


def test_view_specific_refusals(schema: dict[str, Any]) -> None:
    paths = schema["paths"]
    assert {"404", "409", "503"} <= set(paths["/chat"]["post"]["responses"])
    assert {"404", "409"} <= set(paths["/stream/{conversation_id}"]["post"]["responses"])
    assert "409" in paths["/auth/keys/{key_id}/rotate"]["post"]["responses"]
    assert "429" not in paths["/metrics"]["get"]["responses"]  # not throttled


def test_request_constraints_match_the_serializers(schema: dict[str, Any]) -> None:
    params = {p["name"]: p["schema"] for p in schema["paths"]["/conversations/recent"]["get"]["parameters"]}
    assert (params["limit"]["minimum"], params["limit"]["maximum"]) == (1, 100)
    cleanup = {p["name"]: p["schema"] for p in schema["paths"]["/admin/cleanup"]["post"]["parameters"]}
    assert cleanup["days"]["minimum"] == 1
    export = {p["name"]: p["schema"] for p in schema["paths"]["/admin/export"]["get"]["parameters"]}
    assert export["format"]["enum"] == ["json", "jsonl", "csv"] or "$ref" in str(export["format"])
    chat = schema["components"]["schemas"]["ChatRequest"]
    assert chat["additionalProperties"] is False
    assert chat["properties"]["num_agents"]["maximum"] == 10
    assert chat["properties"]["message"]["maxLength"] == 8000
    # Non-blank (after stripping) and free of control characters, as SafeCharField checks.
    components = schema["components"]["schemas"]
    assert chat["properties"]["message"]["pattern"] == SAFE_NON_BLANK_PATTERN
    assert components["ApiKeyCreate"]["properties"]["name"]["pattern"] == SAFE_NON_BLANK_PATTERN
    assert components["Refresh"]["properties"]["refresh"]["pattern"] == SAFE_NON_BLANK_PATTERN


def test_auth_token_takes_a_key_or_a_username_and_password(schema: dict[str, Any]) -> None:
    body = schema["paths"]["/auth/token"]["post"]["requestBody"]
    assert body["required"] is True
    token = schema["components"]["schemas"]["TokenRequest"]
    assert [sorted(choice["required"]) for choice in token["oneOf"]] == [
        ["api_key"],
        ["password", "username"],
    ]


def test_links_follow_the_conversation_id(schema: dict[str, Any]) -> None:
    for path, status in (("/chat", "200"), ("/stream/{conversation_id}", "202")):
        link = schema["paths"][path]["post"]["responses"][status]["links"]["GetConversation"]
        assert link == {
            "operationId": "conversations_detail",
            "parameters": {"conversation_id": "$response.body#/conversation_id"},
        }
    assert "x-links" not in str(schema)


def test_a_post_to_an_unknown_path_is_a_json_404(api_client: Any) -> None:
    response = api_client.post("/auth/keys/-1/revoke")
    assert response.status_code == 404
    assert response["Content-Type"] == "application/json"
    assert response.json()["code"] == "not_found"
