"""A webhook delivery survives a `manage.py procrastinate worker` killed in the middle of it:
the stalled job is put back, and the receiver gets the same webhook-id again."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from asgiref.sync import sync_to_async

from gateway.models import ApiKey
from streaming.tasks import retry_stalled_jobs, run_worker_until_idle, worker_app
from tests.conftest import requires_postgres
from tests.test_stream_live import live_env, start_worker
from tests.test_webhooks import finished_run, settled
from tests.webhook_receiver import Reply, receiving
from webhooks.keys import webhook_key_create
from webhooks.models import Delivery

pytestmark = [pytest.mark.django_db(transaction=True), requires_postgres]


async def test_a_worker_killed_mid_delivery_delivers_again_with_the_same_id(
    make_key: Callable[..., tuple[ApiKey, str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from django.conf import settings

    monkeypatch.setattr(settings.CONFIG, "WEBHOOK_ALLOW_PRIVATE", True)
    monkeypatch.setattr(settings.CONFIG, "WEBHOOK_ALLOWED_HOSTS", ["127.0.0.1"])
    row, _ = await sync_to_async(make_key)(["read", "write"])
    hook_key = await sync_to_async(webhook_key_create)(api_key=row)
    env = live_env(WEBHOOK_ALLOW_PRIVATE="true", WEBHOOK_ALLOWED_HOSTS="127.0.0.1", WEBHOOK_TIMEOUT="60")
    with receiving([hook_key.secret]) as receiver:
        receiver.script = [Reply(200, hang=60)]  # the first attempt never gets its answer
        worker = start_worker(env, tmp_path)
        try:
            await finished_run(row, receiver.url)  # queues the delivery job; the worker takes it
            deadline = time.monotonic() + 60
            while not receiver.received and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert receiver.received, worker.output()
        finally:
            worker.kill(signal.SIGKILL)
        delivery = await Delivery.objects.aget()
        assert (delivery.status, delivery.attempts) == ("pending", 1)
        await asyncio.sleep(1.5)
        async with worker_app().open_async() as app:
            # The killed worker's heartbeat stops: its job is stalled and goes back to the queue.
            assert await retry_stalled_jobs(app.job_manager, seconds_since_heartbeat=1.0) == 1
        await run_worker_until_idle()
        assert await settled()()
    first, second = receiver.received
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == delivery.pk
    assert receiver.unverified == []
    await delivery.arefresh_from_db()
    assert (delivery.status, delivery.attempts, delivery.last_status) == ("delivered", 2, 204)
