"""Schemathesis against our own OpenAPI schema, in process (WSGI), with every check.

This is `schemathesis run /schema --checks all` (examples, coverage, fuzzing and stateful
phases) run by schemathesis' own engine against the Django WSGI app: a response whose
status code, content type, headers or body the schema does not document is a failure, as
is a 500, a schema-valid request the server refuses or an invalid one it accepts.

Every request carries a real admin key, a fresh one each time: a fuzzed call may revoke or
rotate the previous one. The LLM side is the offline simulator with zero latency. The
database is transactional (rows really commit): on PostgreSQL the event log writes from
worker threads with their own connections, which would not see a test transaction.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from django.conf import settings
from django.core.signals import request_finished, request_started
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections, connection
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import events, from_schema

import streaming.views
from gateway.models import ApiKey, generate_key, hash_key
from streaming.jobs import enqueue_run, wait_for_background_runs

# Examples per operation and phase: bounded so the run takes about a minute of CPU (measured
# ~65 s for the whole test; several times that in wall time on a machine shared with other jobs).
MAX_EXAMPLES = 10


def fresh_admin_key() -> str:
    raw = generate_key()
    ApiKey.objects.create(name="fuzz", prefix=raw[:10], key_hash=hash_key(raw), permissions=["admin"])
    return raw


class FreshAdminKey:
    """Schemathesis auth provider: a new admin key for every generated request."""

    def get(self, case: Any, ctx: Any) -> str:
        return fresh_admin_key()

    def set(self, case: Any, data: str, ctx: Any) -> None:
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}


def queued_jobs_watermark() -> int:
    """The last procrastinate job id (PostgreSQL), so the jobs this test queues can be removed."""
    if not settings.USING_POSTGRES:
        return 0
    with connection.cursor() as cursor:
        cursor.execute("SELECT coalesce(max(id), 0) FROM procrastinate_jobs")
        return int(cursor.fetchone()[0])


def drop_queued_jobs(after: int) -> None:
    """Remove the runs POST /stream queued: the table is not Django's, so the flush keeps them."""
    if settings.USING_POSTGRES:
        with connection.cursor() as cursor:
            cursor.execute("DELETE FROM procrastinate_jobs WHERE id > %s", [after])


@pytest.fixture
def wsgi_schema(transactional_db: None, settings: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    settings.CONFIG = settings.CONFIG.model_copy(
        update={
            # Thousands of requests from one IP, many of them deliberately unauthenticated:
            # neither the rate limit nor the IP block may end the run early.
            "RATE_LIMITING_ENABLED": False,
            "IP_BLOCK_THRESHOLD": 10**9,
            "SIMULATED_LATENCY": 0.0,
            "SIMULATED_FAILURE_RATE": 0.0,
        }
    )

    # Under WSGI each request runs its own short-lived event loop: on SQLite, where a run is
    # an in-process task, let POST /stream finish the run it started before its loop ends.
    async def enqueue_and_wait(conversation_id: Any, exchange: int) -> str:
        how = await enqueue_run(conversation_id, exchange)
        await wait_for_background_runs()
        return how

    monkeypatch.setattr(streaming.views, "enqueue_run", enqueue_and_wait)
    config = SchemathesisConfig.from_dict(
        {
            "seed": 1,
            "cache": {"enabled": False},  # every run starts from the schema alone, writes nothing
            "workers": 1,
            "request-timeout": 60,
            "generation": {"max-examples": MAX_EXAMPLES},
            # Valid data may still be refused for the server's state, as documented: 404/409 by
            # default, and 422 budget_too_small (a budget the first round is estimated to pass).
            "checks": {
                "positive_data_acceptance": {
                    "expected-statuses": ["2xx", "3xx", "401", "403", "404", "409", "422", "429", "5xx"]
                }
            },
            "phases": {
                "examples": {"enabled": True},
                "coverage": {"enabled": True},
                "fuzzing": {"enabled": True},
                "stateful": {"enabled": True, "max-steps": 20},
            },
        }
    )
    # As Django's test client does: a request must not close the test's connection
    # (with CONN_MAX_AGE=0 it would, and the test transaction with it).
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    last_job = queued_jobs_watermark()
    try:
        schema = schemathesis.openapi.from_wsgi("/schema?format=json", get_wsgi_application(), config=config)
        schema.auth(refresh_interval=None)(FreshAdminKey)
        # schemathesis 4.32 passes requests-only options (max_redirects…) to the in-process
        # client when it probes an operation without credentials; drop them.
        send = schema.transport.send

        def send_in_process(case: Any, *, session: Any = None, **kwargs: Any) -> Any:
            for name in ("max_redirects", "verify", "cert", "proxies"):
                kwargs.pop(name, None)
            return send(case, session=session, **kwargs)

        monkeypatch.setattr(schema.transport, "send", send_in_process)
        yield schema
    finally:
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)
        drop_queued_jobs(after=last_job)


def describe(recorder: Any) -> list[str]:
    found = []
    for case_id, checks in recorder.checks.items():
        for check in checks:
            if check.failure_info is not None:
                case = recorder.cases[case_id].value
                failure = check.failure_info.failure
                found.append(
                    f"{case.operation.label} [{check.name}] {failure.title}: {failure.message}\n"
                    f"    {check.failure_info.code_sample}"
                )
    return found


@pytest.mark.slow
@pytest.mark.timeout(300)  # every operation, valid bodies running whole conversations; a shared machine
def test_the_server_does_exactly_what_its_schema_says(wsgi_schema: Any) -> None:
    failures: list[str] = []
    errors: list[str] = []
    finished = None
    started: dict[str, float] = {}
    for event in from_schema(wsgi_schema).execute():
        if isinstance(event, events.PhaseStarted):
            started[event.phase.name] = event.timestamp
        elif isinstance(event, events.PhaseFinished):
            elapsed = event.timestamp - started[event.phase.name]
            print(f"phase {event.phase.name}: {event.status} in {elapsed:.1f} s")
        elif isinstance(event, events.ScenarioFinished | events.FuzzScenarioFinished):
            failures.extend(describe(event.recorder))
        elif isinstance(event, events.NonFatalError):
            errors.append(f"{event.label}: {event.info.format()}")
        elif isinstance(event, events.FatalError):
            raise event.exception
        elif isinstance(event, events.EngineFinished):
            finished = event
    assert finished is not None
    unique = sorted(set(failures))
    assert not errors, "\n".join(errors)
    assert not unique, f"{len(unique)} schema conformance failures:\n" + "\n".join(unique)
