"""Background runs: the stale sweep, the retry strategy, and a worker killed mid-conversation."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.utils import timezone

from conversations.models import Conversation, Event, Message
from conversations.services import conversation_start
from gateway.models import ApiKey
from gateway.principal import Principal
from streaming.jobs import (
    SWEEP_MAX_REQUEUES,
    enqueue_run,
    run_in_process,
    sweep_stale_conversations,
)
from streaming.tasks import STALLED_MAX_ATTEMPTS as RUN_ATTEMPTS_LIMIT
from tests.conftest import requires_postgres, requires_redis
from tests.test_stream_live import live_env, start_worker

pytestmark = pytest.mark.django_db(transaction=True)

KeyMaker = Callable[..., tuple[ApiKey, str]]


async def stale_conversation(seconds_ago: float = 3600, status: str = "running") -> Conversation:
    return await Conversation.objects.acreate(
        owner="key:1",
        status=status,
        exchanges=1,
        num_agents=2,
        turns_requested=1,
        heartbeat_at=timezone.now() - timedelta(seconds=seconds_ago),
    )


async def test_sweep_fails_a_running_conversation_with_a_dead_heartbeat() -> None:
    stale = await stale_conversation()
    alive = await stale_conversation(seconds_ago=1)
    report = await sweep_stale_conversations(older_than=60, requeue=False)
    assert report.failed == [str(stale.pk)]
    await stale.arefresh_from_db()
    await alive.arefresh_from_db()
    assert stale.status == "failed"
    assert "no heartbeat for 60s" in stale.error
    assert alive.status == "running"
    event = await Event.objects.aget(conversation=stale)
    assert (event.type, event.seq, event.data["status"]) == ("conversation_failed", 1, "failed")
    assert "no heartbeat" in event.data["reason"]


async def test_sweep_leaves_finished_and_pending_conversations_alone_without_requeue() -> None:
    finished = await stale_conversation(status="completed")
    pending = await stale_conversation(status="pending")
    report = await sweep_stale_conversations(older_than=60, requeue=False)
    assert report.failed == report.requeued == []
    await finished.arefresh_from_db()
    await pending.arefresh_from_db()
    assert (finished.status, pending.status) == ("completed", "pending")


async def test_in_process_run_sweeps_runs_a_dead_process_left_behind(make_key: KeyMaker) -> None:
    stale = await stale_conversation(seconds_ago=settings.CONVERSATION_STALE_SECONDS + 60)
    row, _ = await sync_to_async(make_key)(["read", "write"])
    principal = Principal(kind="api_key", permissions=frozenset({"read", "write"}), api_key_id=row.pk)
    conversation, exchange = await conversation_start(
        principal=principal, message="Red or blue?", num_agents=2, turns=1
    )
    await run_in_process(conversation.pk, exchange)
    await stale.arefresh_from_db()
    await conversation.arefresh_from_db()
    assert stale.status == "failed"
    assert conversation.status in ("completed", "no_consensus")


@requires_postgres
async def test_sweep_requeues_a_bounded_number_of_times_then_fails() -> None:
    from procrastinate.contrib.django.models import ProcrastinateJob

    from streaming.tasks import worker_app

    stale = await stale_conversation()
    for attempt in range(1, SWEEP_MAX_REQUEUES + 1):
        report = await sweep_stale_conversations(older_than=60, requeue=True)
        assert report.requeued == [str(stale.pk)]
        await stale.arefresh_from_db()
        assert stale.metadata["sweep_requeues"] == attempt
        jobs = ProcrastinateJob.objects.filter(  # type: ignore[misc]
            task_name="conversations.run_conversation", status="todo"
        )
        assert await jobs.acount() == 1  # the queueing lock keeps a single queued run
        job = await jobs.afirst()
        assert job is not None
        assert job.args == {"conversation_id": str(stale.pk), "exchange": 1}
        # The run never happens (no worker): make the heartbeat old again.
        await Conversation.objects.filter(pk=stale.pk).aupdate(
            heartbeat_at=timezone.now() - timedelta(seconds=3600)
        )
        async with worker_app().open_async() as app:
            assert await app.job_manager.cancel_job_by_id_async(job.pk)
    report = await sweep_stale_conversations(older_than=60, requeue=True)
    assert report.failed == [str(stale.pk)]
    await stale.arefresh_from_db()
    assert stale.status == "failed"
    assert f"after {SWEEP_MAX_REQUEUES} re-enqueue(s)" in stale.error


def test_retry_strategy_is_bounded_and_jittered() -> None:
    from procrastinate.jobs import Job

    from streaming.tasks import RUN_MAX_ATTEMPTS, run_conversation

    strategy = run_conversation.retry_strategy
    assert strategy is not None
    waits = set()
    for attempts in range(RUN_MAX_ATTEMPTS):
        job = Job(id=1, queue="default", lock=None, queueing_lock=None, task_name="t", attempts=attempts)
        for _ in range(20):
            decision = strategy.get_retry_decision(exception=RuntimeError("boom"), job=job)
            assert decision is not None
            assert decision.retry_at is not None
            wait = (decision.retry_at - timezone.now()).total_seconds()
            assert 0 < wait <= 31
            waits.add(round(wait))
    assert len(waits) > 3  # jitter: not one fixed schedule
    job = Job(id=1, queue="default", lock=None, queueing_lock=None, task_name="t", attempts=RUN_MAX_ATTEMPTS)
    assert strategy.get_retry_decision(exception=RuntimeError("boom"), job=job) is None


async def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await sync_to_async(predicate)():
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@requires_redis
@requires_postgres
@pytest.mark.slow
async def test_killed_worker_the_run_resumes_on_another_without_duplicates(
    make_key: KeyMaker, tmp_path: Path
) -> None:
    from streaming.tasks import retry_stalled_jobs, worker_app

    row, _ = await sync_to_async(make_key)(["read", "write"])
    principal = Principal(kind="api_key", permissions=frozenset({"read", "write"}), api_key_id=row.pk)
    conversation, exchange = await conversation_start(
        principal=principal,
        message="Is a hot dog a sandwich?",
        conversation_id=uuid.uuid4(),
        num_agents=3,
        turns=4,
        create_with_id=True,
    )
    await enqueue_run(conversation.pk, exchange)
    # Slow agents, and a panel that does not stop early, so the kill lands mid-conversation.
    env = live_env(SIMULATED_LATENCY="0.4")
    first = start_worker(env, tmp_path, "first")
    try:
        agent_messages = Message.objects.filter(conversation=conversation, role="agent")
        await wait_until(lambda: agent_messages.count() >= 3, 60, "turn 1 to be stored")
        first.kill(signal.SIGKILL)
    finally:
        first.kill()
    await conversation.arefresh_from_db()
    assert conversation.status == "running"
    stored_before = await agent_messages.acount()
    await asyncio.sleep(1.5)  # the dead worker's last heartbeat is now older than 1 s
    async with worker_app().open_async() as app:
        assert await retry_stalled_jobs(app.job_manager, seconds_since_heartbeat=1) == 1
    second = start_worker(live_env(SIMULATED_LATENCY="0.05"), tmp_path, "second")
    try:
        await wait_until(
            lambda: Conversation.objects.get(pk=conversation.pk).is_terminal, 90, "the resumed run to finish"
        )
    finally:
        second.kill()
    await conversation.arefresh_from_db()
    assert conversation.status in ("completed", "no_consensus"), second.output()
    events = [e async for e in Event.objects.filter(conversation=conversation).values_list("data", flat=True)]
    starts = [e for e in events if e["type"] == "conversation_started"]
    assert len(starts) == 2
    assert starts[1]["resumed"] is True
    answers = Counter(
        (e["turn"], e["agent_id"]) for e in events if e["type"] in ("agent_response", "agent_error")
    )
    assert answers
    assert max(answers.values()) == 1  # no turn of any agent answered twice
    messages = [m async for m in agent_messages.values_list("turn", "agent_id")]
    assert len(messages) == len(set(messages)) == len(answers)
    assert len(messages) >= stored_before
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))


async def test_periodic_retention_deletes_conversations_older_than_retention_days() -> None:
    from archive.tasks import retention

    days = settings.CONFIG.RETENTION_DAYS
    old = await Conversation.objects.acreate(
        owner="key:1", status="completed", created_at=timezone.now() - timedelta(days=days + 1)
    )
    recent = await Conversation.objects.acreate(owner="key:1", status="completed")
    result = await retention.func(timestamp=int(time.time()))
    assert result["days_threshold"] == days
    assert not await Conversation.objects.filter(pk=old.pk).aexists()
    assert await Conversation.objects.filter(pk=recent.pk).aexists()


@requires_postgres
@pytest.mark.parametrize(("attempts", "expected"), [(0, "todo"), (RUN_ATTEMPTS_LIMIT - 1, "failed")])
async def test_stalled_jobs_are_retried_until_the_attempt_limit(attempts: int, expected: str) -> None:
    from streaming.tasks import retry_stalled_jobs, run_conversation, worker_app

    async with worker_app().open_async() as app:
        manager = app.job_manager
        queue = f"test-{uuid.uuid4().hex[:8]}"  # only this test's job, whatever else is queued
        job_id = await run_conversation.configure(queue=queue).defer_async(
            conversation_id=str(uuid.uuid4()), exchange=1
        )
        worker_id = await manager.register_worker()
        job = await manager.fetch_job(queues=[queue], worker_id=worker_id)
        assert job is not None
        assert job.id == job_id
        # The worker died an hour ago, after `attempts` earlier tries of this job.
        await app.connector.execute_query_async(
            "UPDATE procrastinate_workers SET last_heartbeat = now() - interval '1 hour' WHERE id = %(id)s",
            id=worker_id,
        )
        await app.connector.execute_query_async(
            "UPDATE procrastinate_jobs SET attempts = %(n)s WHERE id = %(id)s", n=attempts, id=job_id
        )
        await retry_stalled_jobs(manager, seconds_since_heartbeat=30)
        row = await app.connector.execute_query_one_async(
            "SELECT status FROM procrastinate_jobs WHERE id = %(id)s", id=job_id
        )
        await manager.cancel_job_by_id_async(job_id)  # leave nothing for other tests' workers
        await manager.unregister_worker(worker_id)
    assert row["status"] == expected
