"""The contract streaming/compat/procrastinate.py relies on, against the installed procrastinate."""

from __future__ import annotations

import asyncio
import uuid
from importlib.metadata import version

import pytest

from streaming.compat.procrastinate import JOB_TASK, SIDE_TASKS, WRITTEN_FOR, WorkerWatch
from tests.conftest import requires_postgres

pytestmark = [requires_postgres, pytest.mark.django_db(transaction=True)]


def test_written_for_the_installed_version() -> None:
    assert version("procrastinate").startswith(WRITTEN_FOR)


async def test_a_worker_runs_the_named_tasks_and_a_failed_heartbeat_is_heard() -> None:
    """procrastinate 3.5 names its side tasks as SIDE_TASKS says; a heartbeat that fails ends
    its task (the worker runs on without it) and `WorkerWatch` hears the error."""
    from streaming.tasks import worker_app

    queue = f"test-{uuid.uuid4().hex[:8]}"
    async with worker_app().open_async() as app:
        worker = asyncio.create_task(
            app.run_worker_async(queues=[queue], update_heartbeat_interval=0.2, install_signal_handlers=False)
        )
        watch = WorkerWatch()
        watching = asyncio.create_task(watch.run(poll_seconds=0.05))
        heard = watch.failed
        try:
            await asyncio.sleep(0.5)
            names = {task.get_name() for task in asyncio.all_tasks()}
            assert names >= SIDE_TASKS
            assert not heard.done()
            # The heartbeat's statement fails from now on, as it does on a lost database.
            await app.connector.execute_query_async(
                "ALTER FUNCTION procrastinate_update_heartbeat_v1(bigint) RENAME TO broken_heartbeat"
            )
            try:
                error = await asyncio.wait_for(heard, timeout=5)
            finally:
                await app.connector.execute_query_async(
                    "ALTER FUNCTION broken_heartbeat(bigint) RENAME TO procrastinate_update_heartbeat_v1"
                )
            assert "procrastinate_update_heartbeat_v1" in repr(error.__cause__ or error)
            assert not worker.done()  # procrastinate 3.5 itself does not stop
            assert watch.unsaved == set()
        finally:
            watching.cancel()
            worker.cancel()
            await asyncio.wait([worker, watching])


async def test_a_job_task_is_named_with_its_job_id() -> None:
    from streaming.tasks import worker_app

    queue = f"test-{uuid.uuid4().hex[:8]}"
    seen: set[str] = set()
    worker = worker_app()

    @worker.task(name=f"tests.compat_{queue}", queue=queue)
    async def look() -> None:
        current = asyncio.current_task()
        assert current is not None
        seen.add(current.get_name())

    async with worker.open_async() as app:
        job_id = await look.defer_async()
        await app.run_worker_async(queues=[queue], wait=False, install_signal_handlers=False)
    [name] = seen
    match = JOB_TASK.fullmatch(name)
    assert match is not None, name
    assert int(match.group(1)) == job_id
