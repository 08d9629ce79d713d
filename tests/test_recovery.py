"""Runs survive what operators do to them, over real processes (issue 8).

- PostgreSQL restarted under a running worker and a live run: a private cluster this test
  creates, restarts and drops (never the machine's shared one).
- A worker killed with SIGKILL, at the default settings: another worker resumes the run.
- The embedded defaults: a web process killed mid-run; the next one resumes it.

Each prints how long recovery took (`-s` shows it; the report quotes these figures).
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from asgiref.sync import sync_to_async
from django.conf import settings

from conversations.events import STORE_RETRY_SECONDS
from conversations.models import Conversation, Event, Message
from conversations.services import conversation_start
from gateway.models import ApiKey
from gateway.principal import Principal
from streaming.jobs import enqueue_run, job_lock
from tests.conftest import requires_postgres, requires_redis
from tests.test_stream_live import (
    PYTHON,
    ROOT,
    Process,
    free_port,
    live_env,
    start_stream,
    start_web,
    start_worker,
)

KeyMaker = Callable[..., tuple[ApiKey, str]]
TERMINAL = ("completed", "no_consensus", "failed", "cancelled")


def run(args: list[str], **kwargs: Any) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=120, **kwargs)
    assert done.returncode == 0, f"{args}: {done.stdout}\n{done.stderr}"
    return done.stdout


@dataclass
class Cluster:
    """A PostgreSQL server this test owns: restart or stop it at will."""

    port: int
    ctl: Callable[[str], None]  # "restart", "stop" or "start", as pg_ctl means them

    def restart(self) -> None:
        self.ctl("restart")

    def outage(self, seconds: float) -> None:
        """Down for `seconds`: longer than the event log's retries, so runs in flight crash."""
        self.ctl("stop")
        time.sleep(seconds)
        self.ctl("start")

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/polyagents"


def _postgres_bin() -> Path | None:
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parent.parent.name)
    )
    return versions[-1].parent if versions else None


@pytest.fixture
def private_postgres(tmp_path: Path) -> Iterator[Cluster]:
    """pg_createcluster (as root, as CI runs) or initdb + pg_ctl in a temporary directory."""
    port = free_port()
    bin_dir = _postgres_bin()
    if os.geteuid() == 0 and shutil.which("pg_createcluster") and bin_dir is not None:
        version = bin_dir.parent.name
        name = f"polyagents_test_{uuid.uuid4().hex[:8]}"
        run(
            [
                *("pg_createcluster", version, name, "--port", str(port), "--start"),
                *("--", "--auth-host=trust", "--auth-local=trust"),
            ]
        )
        ctl = ["pg_ctlcluster", "--skip-systemctl-redirect", version, name]

        def restart(action: str) -> None:
            run([*ctl, action, *(["-m", "fast"] if action != "start" else [])])

        try:
            _wait_ready(port)
            yield Cluster(port, restart)
        finally:
            subprocess.run([*ctl, "stop", "-m", "immediate"], capture_output=True, timeout=60)
            subprocess.run(["pg_dropcluster", version, name], capture_output=True, timeout=60)
        return
    initdb = shutil.which("initdb") or (str(bin_dir / "initdb") if bin_dir else None)
    pg_ctl = shutil.which("pg_ctl") or (str(bin_dir / "pg_ctl") if bin_dir else None)
    if os.geteuid() == 0 or not initdb or not pg_ctl:
        pytest.skip("needs pg_createcluster (as root) or initdb and pg_ctl (as another user)")
    data = tmp_path / "pgdata"
    run([initdb, "-D", str(data), "-U", "postgres", "--auth=trust"])
    options = f"-p {port} -k {tmp_path} -c listen_addresses=127.0.0.1"
    log = str(tmp_path / "postgres.log")
    run([pg_ctl, "-D", str(data), "-o", options, "-l", log, "-w", "start"])

    def restart_local(action: str) -> None:
        mode = ["-m", "fast"] if action != "start" else []
        run([pg_ctl, "-D", str(data), "-o", options, "-l", log, "-w", *mode, action])

    try:
        _wait_ready(port)
        yield Cluster(port, restart_local)
    finally:
        subprocess.run([pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True, timeout=60)


def _wait_ready(port: int) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            with psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres", autocommit=True) as conn:
                if not conn.execute("SELECT 1 FROM pg_database WHERE datname = 'polyagents'").fetchone():
                    conn.execute("CREATE DATABASE polyagents")
                return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def prepare(env: dict[str, str]) -> str:
    """Migrate the database of `env` and return a fresh read,write API key."""
    run([PYTHON, "manage.py", "migrate", "--noinput", "-v", "0"], cwd=ROOT, env=env)
    out = run(
        [PYTHON, "manage.py", "create_api_key", "--name", "recovery", "--permissions", "read,write"],
        cwd=ROOT,
        env=env,
    )
    return out.strip().splitlines()[-1].strip()


class Rows:
    """Reads a conversation's rows straight from a database the test process is not configured for."""

    def __init__(self, url: str | None = None, sqlite_path: Path | None = None) -> None:
        self.url = url
        self.sqlite_path = sqlite_path

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        try:
            if self.sqlite_path is not None:
                with sqlite3.connect(self.sqlite_path, timeout=10) as db:
                    return db.execute(sql.replace("%s", "?"), params).fetchall()
            with psycopg.connect(self.url or "", connect_timeout=3) as conn:
                return conn.execute(sql, params).fetchall()
        except (psycopg.OperationalError, sqlite3.OperationalError):
            return []  # restarting, or locked: the caller polls again

    def key(self, conversation_id: str) -> str:
        return conversation_id.replace("-", "") if self.sqlite_path is not None else conversation_id

    def status(self, conversation_id: str) -> str | None:
        rows = self.query(
            "SELECT status FROM conversations_conversation WHERE id = %s", self.key(conversation_id)
        )
        return str(rows[0][0]) if rows else None

    def agent_messages(self, conversation_id: str) -> list[tuple[int, int, str]]:
        return [
            (int(exchange), int(turn), str(agent))
            for exchange, turn, agent in self.query(
                "SELECT exchange, turn, agent_id FROM conversations_message"
                " WHERE conversation_id = %s AND role = 'agent'",
                self.key(conversation_id),
            )
        ]

    def events(self, conversation_id: str) -> list[dict[str, Any]]:
        rows = self.query(
            "SELECT data FROM conversations_event WHERE conversation_id = %s ORDER BY seq",
            self.key(conversation_id),
        )
        return [row[0] if isinstance(row[0], dict) else json.loads(row[0]) for row in rows]


async def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> float:
    """Poll until `predicate` holds; return when (time.monotonic())."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await asyncio.to_thread(predicate):
            return time.monotonic()
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


def check_complete_once(rows: Rows, conversation_id: str, *, resumed: bool | None) -> bool:
    """Finished, every agent answer stored and sent once, seq contiguous, one final event.

    Returns whether the run was resumed (`resumed` None: either way is right).
    """
    assert rows.status(conversation_id) in ("completed", "no_consensus"), rows.events(conversation_id)[-3:]
    events = rows.events(conversation_id)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    answers = Counter(
        (e["exchange"], e["turn"], e["agent_id"])
        for e in events
        if e["type"] in ("agent_response", "agent_error")
    )
    assert answers
    assert max(answers.values()) == 1
    messages = rows.agent_messages(conversation_id)
    # Every stored answer was sent exactly once (a resumed run announces the ones a dead run
    # stored without their event).
    assert len(messages) == len(set(messages)) == len(answers)
    types = [e["type"] for e in events]
    assert types.count("conversation_completed") == 1
    assert "conversation_failed" not in types
    starts = [e for e in events if e["type"] == "conversation_started"]
    was_resumed = any(e["resumed"] for e in starts)
    assert resumed is None or was_resumed == resumed
    return was_resumed


@requires_redis
@requires_postgres
@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("event", ["restart", "outage"])
async def test_postgres_restart_under_a_worker_and_a_live_run(
    private_postgres: Cluster, tmp_path: Path, event: str
) -> None:
    """`restart`: pg_ctl restart -m fast (seconds). `outage`: down for 15 s, longer than the
    event log retries a write, so the run in flight crashes and its job's retry resumes it."""
    env = live_env(DATABASE_URL=private_postgres.url, SIMULATED_LATENCY="0.8")
    raw = await asyncio.to_thread(prepare, env)
    rows = Rows(url=private_postgres.url)
    web, base = await asyncio.to_thread(start_web, env, tmp_path)
    worker = start_worker(env, tmp_path)
    try:
        started = await start_stream(
            base, raw, {"message": "Is a hot dog a sandwich?", "num_agents": 3, "turns": 4}
        )
        interrupted = started["conversation_id"]
        await wait_for(lambda: len(rows.agent_messages(interrupted)) >= 3, 90, "turn 1 to be stored")
        assert rows.status(interrupted) == "running"
        began = time.monotonic()
        if event == "restart":
            await asyncio.to_thread(private_postgres.restart)
        else:
            await asyncio.to_thread(private_postgres.outage, STORE_RETRY_SECONDS + 5)
        back = time.monotonic()
        # A new run started right after the restart, while the interrupted one recovers.
        after = await start_stream(base, raw, {"message": "Tea or coffee?", "num_agents": 2, "turns": 1})
        done = await wait_for(
            lambda: rows.status(interrupted) in TERMINAL, 240, "the interrupted run to finish"
        )
        await wait_for(
            lambda: rows.status(after["conversation_id"]) in TERMINAL, 120, "the new run to finish"
        )
        assert worker.popen.poll() is None, worker.output()
        # The run either rode through the restart (its writes retried) or was retried and
        # resumed after its last complete turn: both finish, nothing twice, no gap.
        resumed = check_complete_once(rows, interrupted, resumed=True if event == "outage" else None)
        check_complete_once(rows, after["conversation_id"], resumed=False)
        print(
            f"\nPostgreSQL {event}: server back after {back - began:.1f}s; interrupted run"
            f" {'resumed by a retry' if resumed else 'rode through'}, finished {done - began:.1f}s"
            f" after the {event} began"
        )
        # Nothing left behind in the queue: every run job finished.
        left = rows.query(
            "SELECT id, status FROM procrastinate_jobs"
            " WHERE task_name = 'conversations.run_conversation' AND status IN ('todo', 'doing')"
        )
        assert left == [], worker.output()
    finally:
        worker.kill()
        web.kill()


@requires_redis
@requires_postgres
@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(240)
async def test_killed_worker_resumed_by_another_at_default_settings(
    make_key: KeyMaker, tmp_path: Path
) -> None:
    """Real time, default thresholds: no test hook, only the workers' own recovery sweep."""
    from procrastinate.contrib.django.models import ProcrastinateJob

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
    env = live_env(SIMULATED_LATENCY="0.5")
    env.pop("CONVERSATION_STALE_SECONDS", None)  # the default
    # Two workers, each known by the id it registers under; the run goes to either.
    workers: dict[int, Process] = {}
    try:
        for name in ("first", "second"):
            known = await registered_workers()
            process = start_worker(env, tmp_path, name)
            await wait_for(functools.partial(one_more_worker, known), 60, f"{name} to register")
            [worker_id] = (await registered_workers()) - known
            workers[worker_id] = process
        await enqueue_run(conversation.pk, exchange)
        messages = Message.objects.filter(conversation=conversation, role="agent")
        await wait_for(lambda: messages.count() >= 3, 90, "turn 1 to be stored")
        running = ProcrastinateJob.objects.filter(  # type: ignore[misc]
            lock=job_lock(conversation.pk), status="doing"
        ).values_list("worker", flat=True)
        workers[await running.aget()].kill(signal.SIGKILL)
        killed = time.monotonic()
        await conversation.arefresh_from_db()
        assert conversation.status == "running"  # killed mid-run
        starts = Event.objects.filter(conversation=conversation, type="conversation_started")
        resumed = await wait_for(lambda: starts.count() >= 2, 120, "the other worker to resume the run")
        done = await wait_for(
            lambda: Conversation.objects.get(pk=conversation.pk).is_terminal, 120, "the resumed run to finish"
        )
        print(
            f"\nkilled worker (CONVERSATION_STALE_SECONDS={settings.CONVERSATION_STALE_SECONDS}):"
            f" resumed {resumed - killed:.1f}s after SIGKILL, finished {done - killed:.1f}s after"
        )
    finally:
        for process in workers.values():
            process.kill()
    rows = Rows(url=_test_database_url())
    check_complete_once(rows, str(conversation.pk), resumed=True)


def registered_workers_sync() -> set[int]:
    from procrastinate.contrib.django.models import ProcrastinateWorker

    return set(ProcrastinateWorker.objects.values_list("id", flat=True))  # type: ignore[misc]


registered_workers = sync_to_async(registered_workers_sync)


def one_more_worker(known: set[int]) -> bool:
    return len(registered_workers_sync() - known) == 1


def _test_database_url() -> str:
    db = settings.DATABASES["default"]
    user, host, port = db.get("USER") or "postgres", db.get("HOST") or "127.0.0.1", db.get("PORT") or 5432
    return f"postgresql://{user}@{host}:{port}/{db['NAME']}"


@pytest.mark.skipif(settings.USING_POSTGRES, reason="the embedded defaults' path (runs in the SQLite pass)")
@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_embedded_web_process_killed_mid_run_the_next_one_resumes_it(tmp_path: Path) -> None:
    database = tmp_path / "db.sqlite3"
    env = live_env(
        DATABASE_URL=f"sqlite:///{database}",
        SIMULATED_LATENCY="0.5",
        RECOVERY_SWEEP_IN_PROCESS="1",
        CONVERSATION_STALE_SECONDS="10",
    )
    env.pop("REDIS_URL", None)
    raw = await asyncio.to_thread(prepare, env)
    rows = Rows(sqlite_path=database)
    web, base = await asyncio.to_thread(start_web, env, tmp_path)
    try:
        started = await start_stream(
            base, raw, {"message": "Is a hot dog a sandwich?", "num_agents": 3, "turns": 4}
        )
        conversation_id = started["conversation_id"]
        await wait_for(lambda: len(rows.agent_messages(conversation_id)) >= 3, 90, "turn 1 to be stored")
        web.kill(signal.SIGKILL)
        killed = time.monotonic()
        assert rows.status(conversation_id) == "running"
        web, base = await asyncio.to_thread(start_web, env, tmp_path)  # its first request starts the sweep
        done = await wait_for(lambda: rows.status(conversation_id) in TERMINAL, 120, "the run to be resumed")
        print(f"\nembedded: web process killed; the run finished {done - killed:.1f}s later in the next one")
    finally:
        web.kill()
    check_complete_once(rows, conversation_id, resumed=True)
