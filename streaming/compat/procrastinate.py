"""What procrastinate 3.5 lacks for a crash-only worker: hearing that one of its loops died.

procrastinate 3.5's worker starts side tasks (heartbeat, periodic deferrer, abort poller,
LISTEN) and one task per job, and awaits none of them until it stops: a side task that
fails on a lost database ends silently (the worker then runs without heartbeat, or without
periodic jobs), and a job whose final status could not be written stays `doing` under a
worker that looks alive. procrastinate 3.6 stops the worker when a side task fails
(procrastinate-org/procrastinate#1463; a side task that returns cleanly still ends that
supervision there: #1597).

`WorkerWatch` finds these tasks on the running loop by the names procrastinate 3.5 gives
them (asyncio's public `Task.get_name`): it hears the first error one of them ends with, and
which jobs' status was not saved. tests/test_compat_procrastinate.py checks the names against
the installed version.
"""

from __future__ import annotations

import asyncio
import re
from importlib.metadata import version

WRITTEN_FOR = "3.5."
assert version("procrastinate").startswith(WRITTEN_FOR), (
    f"streaming/compat/procrastinate.py was written for procrastinate {WRITTEN_FOR}x: "
    "check whether the worker now stops by itself when a side task fails, then remove it"
)

SIDE_TASKS = frozenset({"update_heartbeats", "deferrer", "poll_jobs_to_abort", "listener"})
# "process job {task name}[{job id}]": ends with an error only when the job's status was not saved.
JOB_TASK = re.compile(r"process job .*\[(\d+)\]")
POLL_SECONDS = 0.5


class WorkerWatch:
    """The procrastinate worker tasks of one event loop, watched until `run` is cancelled.

    Tasks are looked for every `poll_seconds`: a job task that ends sooner is not seen (runs
    last longer; the heartbeat and the listener, which fail too, are always seen).
    """

    def __init__(self) -> None:
        self.failed: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()
        self.unsaved: set[int] = set()  # ids of jobs whose final status could not be written
        self._watched: set[asyncio.Task[object]] = set()

    async def run(self, *, poll_seconds: float = POLL_SECONDS) -> None:
        while True:
            for task in asyncio.all_tasks():
                if task not in self._watched and is_worker_task(task.get_name()):
                    self._watched.add(task)
                    task.add_done_callback(self._done)
            await asyncio.sleep(poll_seconds)

    def _done(self, task: asyncio.Task[object]) -> None:
        self._watched.discard(task)
        error = None if task.cancelled() else task.exception()
        if error is None:
            return
        job = JOB_TASK.fullmatch(task.get_name())
        if job is not None:
            self.unsaved.add(int(job.group(1)))
        if not self.failed.done():
            self.failed.set_result(error)


def is_worker_task(name: str) -> bool:
    return name in SIDE_TASKS or JOB_TASK.fullmatch(name) is not None
