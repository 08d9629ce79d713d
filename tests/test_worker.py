"""Background runs: the stale sweep, the retry strategy, and a worker killed mid-conversation."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.utils import timezone
from procrastinate.jobs import Status

from conversations.models import Conversation, Event, Message
from conversations.services import conversation_start
from gateway.models import ApiKey
from gateway.principal import Principal
from streaming.jobs import (
    SWEEP_MAX_REQUEUES,
    SweepReport,
    enqueue_run,
    job_lock,
    sweep_stale_conversations,
    wait_for_background_runs,
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


@pytest.mark.skipif(settings.USING_POSTGRES, reason="in-process runs are the embedded defaults' path")
async def test_sweep_resumes_an_in_process_run_a_dead_process_left_behind(make_key: KeyMaker) -> None:
    row, _ = await sync_to_async(make_key)(["read", "write"])
    principal = Principal(kind="api_key", permissions=frozenset({"read", "write"}), api_key_id=row.pk)
    conversation, _exchange = await conversation_start(
        principal=principal, message="Red or blue?", num_agents=2, turns=2
    )
    # The web process died in the middle of the run: "running", and nothing beats the heartbeat.
    await Conversation.objects.filter(pk=conversation.pk).aupdate(
        status="running", heartbeat_at=timezone.now()
    )
    fresh = await sweep_stale_conversations()
    assert fresh.requeued == fresh.failed == []  # a live heartbeat is left alone
    later = timezone.now() + timedelta(seconds=settings.CONVERSATION_STALE_SECONDS + 1)
    report = await sweep_stale_conversations(now=later)
    assert report.requeued == [str(conversation.pk)]
    await wait_for_background_runs(timeout=60)
    await conversation.arefresh_from_db()
    assert conversation.status in ("completed", "no_consensus")
    assert conversation.metadata["sweep_requeues"] == 1


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


def test_retry_strategy_backs_off_long_enough_to_span_a_restart_with_jitter() -> None:
    from procrastinate.jobs import Job

    from streaming.jobs import RUN_MAX_ATTEMPTS
    from streaming.tasks import run_conversation

    strategy = run_conversation.retry_strategy
    assert strategy is not None
    waits: list[set[float]] = []
    for attempts in range(RUN_MAX_ATTEMPTS - 1):
        job = Job(id=1, queue="default", lock=None, queueing_lock=None, task_name="t", attempts=attempts)
        seen = set()
        for _ in range(20):
            decision = strategy.get_retry_decision(exception=RuntimeError("boom"), job=job)
            assert decision is not None
            assert decision.retry_at is not None
            seen.add((decision.retry_at - timezone.now()).total_seconds())
        step = min(60, 5 * 2**attempts)
        assert step / 2 - 1 <= min(seen)
        assert max(seen) <= step
        assert len({round(w, 1) for w in seen}) > 3  # jitter: not one fixed schedule
        waits.append(seen)
    # Even the shortest schedule keeps retrying for over a minute: longer than a restart.
    assert sum(min(seen) for seen in waits) > 60
    job = Job(id=1, queue="default", lock=None, queueing_lock=None, task_name="t", attempts=RUN_MAX_ATTEMPTS)
    assert strategy.get_retry_decision(exception=RuntimeError("boom"), job=job) is None


async def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await sync_to_async(predicate)():
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


async def assert_run_complete_without_duplicates(conversation: Conversation, starts: int) -> None:
    """Terminal, `starts` starts of the run, no turn of any agent answered twice, seq contiguous."""
    await conversation.arefresh_from_db()
    assert conversation.status in ("completed", "no_consensus"), conversation.error
    events = [
        e
        async for e in Event.objects.filter(conversation=conversation)
        .order_by("seq")
        .values_list("data", flat=True)
    ]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    started = [e for e in events if e["type"] == "conversation_started"]
    assert len(started) == starts
    assert all(e["resumed"] for e in started[1:])
    answers = Counter(
        (e["turn"], e["agent_id"]) for e in events if e["type"] in ("agent_response", "agent_error")
    )
    assert answers
    assert max(answers.values()) == 1
    messages = [
        m
        async for m in Message.objects.filter(conversation=conversation, role="agent").values_list(
            "turn", "agent_id"
        )
    ]
    # Every stored answer was sent exactly once (a resumed run announces the ones a dead run
    # stored without their event).
    assert len(messages) == len(set(messages)) == len(answers)
    assert [e["type"] for e in events].count("conversation_completed") == 1


async def run_jobs(state: dict[str, str]) -> list[tuple[int, str]]:
    """The (id, status) of the jobs of a conversation, oldest first."""
    from procrastinate.contrib.django.models import ProcrastinateJob

    rows = ProcrastinateJob.objects.filter(lock=state["lock"]).order_by("id")  # type: ignore[misc]
    return [(row.id, row.status) async for row in rows]


def after_stale() -> datetime:
    """The injected clock: later than both the conversation's and the worker's stale thresholds."""
    return timezone.now() + timedelta(
        seconds=max(settings.CONVERSATION_STALE_SECONDS, settings.WORKER_STALLED_SECONDS) + 1
    )


async def recover(order: str) -> list[SweepReport | int]:
    """Fire both recovery paths, in the given order, as the periodic tasks would."""
    from streaming.tasks import retry_stalled_jobs, worker_app

    results: list[SweepReport | int] = []
    async with worker_app().open_async() as app:
        for path in order.split(","):
            if path == "stalled":
                results.append(await retry_stalled_jobs(app.job_manager, seconds_since_heartbeat=0))
            else:
                results.append(await sweep_stale_conversations(now=after_stale()))
    return results


@requires_redis
@requires_postgres
@pytest.mark.slow
@pytest.mark.parametrize("order", ["stalled,sweep", "sweep,stalled"])
async def test_killed_worker_the_run_resumes_once_whatever_order_the_recovery_paths_fire(
    make_key: KeyMaker, tmp_path: Path, order: str
) -> None:
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
    state = {"lock": job_lock(conversation.pk)}
    # Slow agents, and a panel that does not stop early, so the kill lands mid-conversation.
    first = start_worker(live_env(SIMULATED_LATENCY="0.4"), tmp_path, "first")
    try:
        agent_messages = Message.objects.filter(conversation=conversation, role="agent")
        await wait_until(lambda: agent_messages.count() >= 3, 60, "turn 1 to be stored")
        first.kill(signal.SIGKILL)
    finally:
        first.kill()
    await conversation.arefresh_from_db()
    assert conversation.status == "running"
    [(job_id, status)] = await run_jobs(state)
    assert status == "doing"  # the dead worker's job, holding the conversation's lock
    reports = await recover(order)
    sweep_report = next(r for r in reports if isinstance(r, SweepReport))
    assert sweep_report.resumed == [str(conversation.pk)]
    assert sweep_report.requeued == sweep_report.failed == []
    # One owner: the same job is back in the queue, nothing else waits behind its lock.
    assert await run_jobs(state) == [(job_id, "todo")]
    again = await recover(order)
    assert await run_jobs(state) == [(job_id, "todo")]
    assert all(r.resumed == r.requeued == [] for r in again if isinstance(r, SweepReport))
    second = start_worker(live_env(SIMULATED_LATENCY="0.05"), tmp_path, "second")
    try:
        await wait_until(
            lambda: Conversation.objects.get(pk=conversation.pk).is_terminal, 90, "the resumed run to finish"
        )
    finally:
        second.kill()
    await assert_run_complete_without_duplicates(conversation, starts=2)
    assert await run_jobs(state) == []  # succeeded, deleted


async def dead_worker_job(conversation: Conversation, queue: str, **configure: Any) -> tuple[int, int]:
    """A run job taken by a worker that then died (registered, never beats again): (job id, worker id)."""
    from streaming.tasks import run_conversation, worker_app

    lock = job_lock(conversation.pk)
    async with worker_app().open_async() as app:
        job_id = await run_conversation.configure(
            queue=queue, lock=lock, queueing_lock=lock, **configure
        ).defer_async(conversation_id=str(conversation.pk), exchange=conversation.exchanges)
        worker_id = await app.job_manager.register_worker()
        job = await app.job_manager.fetch_job(queues=[queue], worker_id=worker_id)
        assert job is not None
        assert job.id == job_id
        await app.connector.execute_query_async(
            "UPDATE procrastinate_workers SET last_heartbeat = now() - interval '1 hour' WHERE id = %(id)s",
            id=worker_id,
        )
    await Conversation.objects.filter(pk=conversation.pk).aupdate(
        status="running", heartbeat_at=timezone.now()
    )
    return job_id, worker_id


async def started_conversation(make_key: KeyMaker) -> Conversation:
    row, _ = await sync_to_async(make_key)(["read", "write"])
    principal = Principal(kind="api_key", permissions=frozenset({"read", "write"}), api_key_id=row.pk)
    conversation, _exchange = await conversation_start(
        principal=principal, message="Tea or coffee?", num_agents=2, turns=2
    )
    return conversation


@requires_postgres
@pytest.mark.parametrize("order", ["stalled,sweep", "sweep,stalled"])
async def test_a_dead_job_and_a_queued_one_with_the_same_lock_never_block_each_other(
    make_key: KeyMaker, order: str
) -> None:
    """The stuck state of issue 8 (one `doing` dead job, one `todo` job, same lock) is undone."""
    from streaming.tasks import run_worker_until_idle

    conversation = await started_conversation(make_key)
    queue = f"test-{uuid.uuid4().hex[:8]}"
    dead_id, _ = await dead_worker_job(conversation, queue)
    await enqueue_run(conversation.pk, conversation.exchanges)  # the old sweep's re-enqueue
    state = {"lock": job_lock(conversation.pk)}
    jobs = await run_jobs(state)
    assert [status for _, status in jobs] == ["doing", "todo"]
    assert jobs[0][0] == dead_id
    queued = jobs[1][0]
    reports = await recover(order)
    sweep_report = next(r for r in reports if isinstance(r, SweepReport))
    assert sweep_report.queued == [str(conversation.pk)]
    assert await run_jobs(state) == [(dead_id, "failed"), (queued, "todo")]
    await run_worker_until_idle(queues=["default"])
    await assert_run_complete_without_duplicates(conversation, starts=1)


@requires_postgres
async def test_sweep_leaves_runs_alone_while_their_worker_or_their_heartbeat_lives(
    make_key: KeyMaker,
) -> None:
    from streaming.tasks import worker_app

    conversation = await started_conversation(make_key)
    queue = f"test-{uuid.uuid4().hex[:8]}"
    job_id, worker_id = await dead_worker_job(conversation, queue)
    state = {"lock": job_lock(conversation.pk)}
    # The worker is dead but the run's heartbeat is fresh: a heartbeat proves life.
    report = await sweep_stale_conversations()
    assert report.resumed == report.requeued == report.failed == []
    # The run is slow and its heartbeat old, but its worker beats: left to its worker.
    async with worker_app().open_async() as app:
        await app.job_manager.update_heartbeat(worker_id)
        await Conversation.objects.filter(pk=conversation.pk).aupdate(
            heartbeat_at=timezone.now() - timedelta(seconds=settings.CONVERSATION_STALE_SECONDS + 1)
        )
        report = await sweep_stale_conversations()
        assert report.alive == [str(conversation.pk)]
        assert await run_jobs(state) == [(job_id, "doing")]
        await app.job_manager.finish_job_by_id_async(job_id, status=Status.ABORTED, delete_job=True)
        await app.job_manager.unregister_worker(worker_id)


@requires_postgres
async def test_a_run_whose_worker_keeps_dying_ends_failed_with_its_reason(make_key: KeyMaker) -> None:
    from streaming.jobs import RUN_MAX_ATTEMPTS
    from streaming.tasks import worker_app

    conversation = await started_conversation(make_key)
    queue = f"test-{uuid.uuid4().hex[:8]}"
    job_id, _ = await dead_worker_job(conversation, queue)

    async with worker_app().open_async() as app:
        await app.connector.execute_query_async(
            "UPDATE procrastinate_jobs SET attempts = %(n)s WHERE id = %(id)s",
            n=RUN_MAX_ATTEMPTS - 1,
            id=job_id,
        )
    report = await sweep_stale_conversations(now=after_stale())
    assert report.failed == [str(conversation.pk)]
    await conversation.arefresh_from_db()
    assert conversation.status == "failed"
    assert f"{RUN_MAX_ATTEMPTS} attempt(s)" in conversation.error
    assert await run_jobs({"lock": job_lock(conversation.pk)}) == [(job_id, "failed")]
    last = await Event.objects.filter(conversation=conversation).order_by("-seq").afirst()
    assert last is not None
    assert last.type == "conversation_failed"


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
    from archive.tasks import retention
    from streaming.tasks import retry_stalled_jobs, worker_app

    async with worker_app().open_async() as app:
        manager = app.job_manager
        queue = f"test-{uuid.uuid4().hex[:8]}"  # only this test's job, whatever else is queued
        job_id = await retention.configure(queue=queue, queueing_lock=None).defer_async(timestamp=0)
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


@requires_postgres
async def test_jobs_whose_status_a_lost_worker_could_not_save_are_queued_again_at_once(
    make_key: KeyMaker,
) -> None:
    """What `manage.py worker` does before a new worker fetches: no heartbeat has to go stale."""
    from streaming.tasks import worker_app
    from streaming.worker import release

    conversation = await started_conversation(make_key)
    queue = f"test-{uuid.uuid4().hex[:8]}"
    job_id, worker_id = await dead_worker_job(conversation, queue)
    async with worker_app().open_async() as app:
        # Its heartbeat is fresh: only this process knows the worker is gone.
        await app.job_manager.update_heartbeat(worker_id)
        assert (await sweep_stale_conversations()).resumed == []
        unsaved = {job_id, job_id + 1000}  # the other one is not `doing`: left alone
        await release(app.job_manager, unsaved)
        assert unsaved == set()
        [job] = await app.job_manager.list_jobs_async(id=job_id)
        assert (job.status, job.attempts) == ("todo", 1)
        await release(app.job_manager, {job_id})  # queued already: not touched again
        [job] = await app.job_manager.list_jobs_async(id=job_id)
        assert (job.status, job.attempts) == ("todo", 1)
        await app.job_manager.cancel_job_by_id_async(job_id)
        await app.job_manager.unregister_worker(worker_id)
