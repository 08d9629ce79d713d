"""API docs: the OpenAPI schema, Swagger UI and ReDoc, served without a CDN."""

from __future__ import annotations

import re

import pytest
import yaml
from django.contrib.staticfiles import finders

pytestmark = pytest.mark.django_db

OUR_OPERATIONS = {
    ("/health/detailed", "get"),
    ("/statistics", "get"),
    ("/metrics", "get"),
    ("/conversations/recent", "get"),
    ("/conversations/{conversation_id}", "get"),
    ("/conversations/search", "post"),
    ("/admin/cleanup", "post"),
    ("/admin/export", "get"),
}
WITH_EXAMPLES = OUR_OPERATIONS - {("/metrics", "get"), ("/admin/export", "get")}


@pytest.fixture
def schema(api_client) -> dict:
    response = api_client.get("/schema", HTTP_ACCEPT="application/vnd.oai.openapi")
    assert response.status_code == 200
    return yaml.safe_load(response.content)


def test_schema_is_public_openapi_3(schema):
    assert schema["openapi"].startswith("3.")
    assert schema["info"]["title"] == "PolyAgents API"


def test_schema_lists_our_endpoints_with_bearer_security(schema):
    operations = {(path, method) for path, item in schema["paths"].items() for method in item}
    assert operations >= OUR_OPERATIONS
    assert schema["components"]["securitySchemes"]["BearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key (pk_…) or a JWT access token from POST /auth/token.",
    }
    for path, method in OUR_OPERATIONS:
        assert {"BearerAuth": []} in schema["paths"][path][method]["security"], path


def test_our_operations_carry_examples(schema):
    for path, method in WITH_EXAMPLES:
        operation = schema["paths"][path][method]
        bodies = [operation.get("requestBody", {}), *operation["responses"].values()]
        examples = [
            name
            for body in bodies
            for media in body.get("content", {}).values()
            for name in media.get("examples", {})
        ]
        assert examples, f"{method.upper()} {path} has no example"


def test_search_request_body_is_described(schema):
    body = schema["paths"]["/conversations/search"]["post"]["requestBody"]["content"]["application/json"]
    ref = body["schema"]["$ref"].rsplit("/", 1)[-1]
    fields = schema["components"]["schemas"][ref]["properties"]
    assert fields["query"]["maxLength"] == 500
    assert fields["limit"]["maximum"] == 100


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
def test_ui_pages_load_assets_locally(api_client, path):
    response = api_client.get(path)
    assert response.status_code == 200
    html = response.content.decode()
    assert "cdn.jsdelivr" not in html
    assert not re.search(r"""(src|href)=["']https?://""", html)
    assets = re.findall(r"""/static/(drf_spectacular_sidecar/[^"'\s]+)""", html)
    assert assets
    for asset in assets:
        assert finders.find(asset), asset
