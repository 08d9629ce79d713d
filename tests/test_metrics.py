"""GET /metrics: Prometheus text, request counts by route pattern."""

from __future__ import annotations

import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.django_db


def _samples(text: str, name: str) -> list:
    return [s for family in text_string_to_metric_families(text) for s in family.samples if s.name == name]


def test_metrics_need_read_unless_public(api_client, settings):
    assert api_client.get("/metrics").status_code == 401
    settings.CONFIG = settings.CONFIG.model_copy(update={"HEALTH_CHECK_PUBLIC": True})
    assert api_client.get("/metrics").status_code == 200


def test_metrics_exposition_format_with_route_patterns(client_with):
    client = client_with("read")
    client.get(f"/conversations/{uuid.uuid4()}")
    client.get(f"/conversations/{uuid.uuid4()}")
    client.get("/no/such/path")
    response = client.get("/metrics", HTTP_ACCEPT="text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    text = response.content.decode()
    requests = _samples(text, "polyagents_http_requests_total")
    detail = [
        s
        for s in requests
        if s.labels["route"] == "/conversations/<str:conversation_id>"
        and s.labels["status"] == "404"
        and s.labels["method"] == "GET"
    ]
    assert detail
    assert detail[0].value >= 2
    assert not [s for s in requests if "no/such" in s.labels["route"]]  # raw paths never become labels
    assert _samples(text, "polyagents_http_request_duration_seconds_count")
    for family in ("polyagents_llm_calls", "polyagents_open_websockets", "polyagents_rate_limit_rejections"):
        assert f"# HELP {family}" in text


def test_metrics_refuse_a_write_only_key_with_json(client_with):
    response = client_with("write").get("/metrics", HTTP_ACCEPT="text/plain")
    assert response.status_code == 403
    assert response.json()["code"] == "permission_denied"


def test_route_label_of_an_unresolved_request():
    from django.test import RequestFactory

    from monitoring.middleware import UNMATCHED, route_of

    assert route_of(RequestFactory().get("/anything/at/all")) == UNMATCHED


def test_metrics_are_not_rate_limited(client_with, settings):
    settings.CONFIG = settings.CONFIG.model_copy(update={"RATE_LIMIT_BURST": 2, "RATE_LIMIT_REQUESTS": 2})
    client = client_with("read")
    assert [client.get("/metrics").status_code for _ in range(5)] == [200] * 5
    assert 429 in [client.get("/statistics").status_code for _ in range(5)]  # the limit is in force
