"""Schemathesis against our own OpenAPI schema, in process (WSGI): no input may cause a 500.

Bounded: 20 examples per operation, coverage phase off. POST /stream/{id} is left out:
each accepted example would start a background panel run that outlives the request
(streaming has its own tests). POST /chat stays in: it runs the simulated panel inline.
The database is transactional (rows really commit): on PostgreSQL the event log writes
from worker threads with their own connections, which would not see a test transaction.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from django.core.signals import request_finished, request_started
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig

from gateway.models import ApiKey, generate_key, hash_key

EXCLUDED_PATHS = ["/stream/{conversation_id}"]


def admin_header() -> dict[str, str]:
    """A fresh admin key for each example: a fuzzed call may revoke or rotate the previous one."""
    raw = generate_key()
    ApiKey.objects.create(name="fuzz", prefix=raw[:10], key_hash=hash_key(raw), permissions=["admin"])
    return {"Authorization": f"Bearer {raw}"}


@pytest.fixture
def api_schema(transactional_db: None, settings) -> Iterator[schemathesis.BaseSchema]:
    settings.CONFIG = settings.CONFIG.model_copy(update={"RATE_LIMITING_ENABLED": False})
    # As Django's test client does: a request must not close the test's connection
    # (with CONN_MAX_AGE=0 it would, and the test transaction with it).
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    # The coverage phase (every boundary case of every parameter) alone takes minutes on a
    # shared machine; the examples and fuzzing phases keep the run bounded.
    config = SchemathesisConfig.from_dict({"phases": {"coverage": {"enabled": False}}})
    try:
        yield schemathesis.openapi.from_wsgi("/schema?format=json", get_wsgi_application(), config=config)
    finally:
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)


schema = schemathesis.pytest.from_fixture("api_schema").exclude(path=EXCLUDED_PATHS)


@schema.parametrize()
@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
    ],
)
def test_no_input_causes_a_server_error(case):
    case.call_and_validate(headers=admin_header(), checks=[not_a_server_error])
