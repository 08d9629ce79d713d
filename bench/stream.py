"""Streaming benchmark through real Redis and real sockets: latency, loss and duplicates.

Starts a web process (daphne, or uvicorn with --server), connects WebSocket clients over TCP
(token as subprotocol), and emits events from this process through `EventLog.emit` (database row, Redis Stream
XADD, channel-layer group_send over Redis), as the orchestrator does. Each event carries
its emit time; clients measure emit-to-receipt latency and check every seq arrives once.

Scenarios: 100 concurrent conversations followed by 200 clients (2 each), then one
conversation fanned out to 1,000 clients. Needs REDIS_URL (and preferably DATABASE_URL).

    REDIS_URL=redis://127.0.0.1:6379/0 DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres \\
        .venv/bin/python bench/stream.py [--conversations 100] [--clients 200] [--fanout 1000] [--events 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.load import (  # noqa: E402
    add_server_option,
    clean_redis,
    follow_socket,
    py_spy,
    spawn_web,
    stop,
)

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "polyagents_site.settings")
os.environ.setdefault("SECRET_KEY", "bench-" + secrets.token_urlsafe(32))
os.environ.setdefault("JWT_SECRET_KEY", "bench-" + secrets.token_urlsafe(32))
os.environ["REDIS_KEY_PREFIX"] = "bench:" + uuid.uuid4().hex[:10]
os.environ.setdefault("LOG_LEVEL", "ERROR")


@dataclass
class Client:
    conversation_id: str
    expected: int
    seqs: list[int] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    error: str = ""
    connect_retries: int = 0
    reconnects: int = 0


def start_web(server: str, processes: int = 1) -> tuple[list[subprocess.Popen[bytes]], str]:
    """Start the web process; with processes > 1, that many share one listening socket (`--fd`)."""
    import httpx

    started, port = spawn_web(server, processes)
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{base}/", timeout=2).status_code == 200:
                return started, f"ws://127.0.0.1:{port}"
        except httpx.HTTPError:
            time.sleep(0.2)
    for process in started:
        os.killpg(process.pid, signal.SIGKILL)
    raise SystemExit(f"{server} did not start")


def mark_ready(ready: asyncio.Event, ready_count: list[int], wanted: int) -> None:
    ready_count[0] += 1
    if ready_count[0] == wanted:
        ready.set()


async def follow(
    url: str,
    token: str,
    client: Client,
    ready: asyncio.Event,
    ready_count: list[int],
    wanted: int,
    timeout: float,
) -> None:
    """Subscribe (ping/pong confirms it), then record every event until the last seq.

    Like a real client, a refused or dropped connection is retried with backoff and
    resumes with after=<last seq received>.
    """

    subscribed = False
    deadline = time.monotonic() + timeout
    attempt = 0
    while True:
        after = client.seqs[-1] if client.seqs else 0
        try:
            async with follow_socket(url, client.conversation_id, token, after) as ws:
                if not subscribed:
                    await ws.send('{"type":"ping"}')
                    while json.loads(await asyncio.wait_for(ws.recv(), 60)).get("type") != "pong":
                        pass
                    subscribed = True
                    mark_ready(ready, ready_count, wanted)
                while not client.seqs or client.seqs[-1] < client.expected:
                    raw = await asyncio.wait_for(ws.recv(), max(0.1, deadline - time.monotonic()))
                    now = time.time()
                    event = json.loads(raw)
                    if "seq" in event:
                        client.seqs.append(event["seq"])
                        client.latencies.append((now - event["emitted_at"]) * 1000)
                return
        except Exception as exc:  # a benchmark reports failures, it never crashes on them
            attempt += 1
            if subscribed:
                client.reconnects += 1
            else:
                client.connect_retries += 1
            if attempt > 8 or time.monotonic() > deadline:
                client.error = f"{type(exc).__name__}: {exc}"
                if not subscribed:
                    mark_ready(ready, ready_count, wanted)
                return
            await asyncio.sleep(min(5.0, 0.2 * 2**attempt) * random.random())


async def emit_conversation(
    conversation_id: uuid.UUID, events: int, interval: float, calls: list[float], buffered: bool
) -> None:
    """Emit agent deltas; `calls` gets each emit's duration, ms. Unbuffered, each emit returns once
    its event is stored, appended and published (one batch per event); buffered, as a run's log
    emits its deltas, the log's writer stores and sends them in batches behind the emit."""
    from conversations.events import EventLog

    log = await EventLog.open(conversation_id, buffered=buffered)
    chunk = "token " * 16
    for n in range(events):
        started = time.perf_counter()
        await log.emit("agent_delta", agent_id=f"agent_{n % 3}", turn=1 + n // 10, delta=chunk)
        calls.append((time.perf_counter() - started) * 1000)
        await asyncio.sleep(interval)
    await log.flush()


async def scenario(
    name: str,
    url: str,
    token: str,
    owner: str,
    conversations: int,
    clients_per: int,
    events: int,
    interval: float,
    cpu_of: Callable[[], float] = lambda: 0.0,
    buffered: bool = False,
) -> dict[str, object]:
    from conversations.models import Conversation

    ids = [uuid.uuid4() for _ in range(conversations)]
    await Conversation.objects.abulk_create(
        [
            Conversation(id=cid, owner=owner, status="running", exchanges=1, title=f"bench {name}")
            for cid in ids
        ]
    )
    clients = [Client(str(cid), events) for cid in ids for _ in range(clients_per)]
    ready = asyncio.Event()
    ready_count = [0]
    connect_started = time.monotonic()
    tasks = []
    for index, client in enumerate(clients):
        tasks.append(asyncio.create_task(follow(url, token, client, ready, ready_count, len(clients), 120)))
        if index % 25 == 24:
            await asyncio.sleep(0.1)  # a ramp, not a stampede on the accept queue
    await asyncio.wait_for(ready.wait(), 180)
    connect_seconds = time.monotonic() - connect_started
    emit_started = time.monotonic()
    cpu_started = cpu_of()
    calls: list[float] = []
    await asyncio.gather(*(emit_conversation(cid, events, interval, calls, buffered) for cid in ids))
    emit_seconds = time.monotonic() - emit_started
    await asyncio.gather(*tasks)
    total_seconds = time.monotonic() - emit_started
    web_cpu = cpu_of() - cpu_started

    latencies = sorted(lat for client in clients for lat in client.latencies)
    expected = len(clients) * events
    distinct = sum(len(set(client.seqs) & set(range(1, events + 1))) for client in clients)
    received = sum(len(client.seqs) for client in clients)
    errors = [client.error for client in clients if client.error]
    await Conversation.objects.filter(pk__in=ids).adelete()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] if latencies else float("nan")

    return {
        "scenario": name,
        "conversations": conversations,
        "clients": len(clients),
        "events_emitted": conversations * events,
        "emit_interval_s": interval,
        "buffered": buffered,
        "deliveries_expected": expected,
        "deliveries_received": received,
        "lost": expected - distinct,
        "duplicates": received - distinct,
        "latency_ms_p50": round(pct(0.50), 2),
        "latency_ms_p99": round(pct(0.99), 2),
        "latency_ms_max": round(latencies[-1], 2) if latencies else None,
        "latency_ms_mean": round(statistics.fmean(latencies), 2) if latencies else None,
        "emit_call_ms_p50": round(statistics.median(calls), 2),
        "emit_call_ms_p99": round(sorted(calls)[int(0.99 * (len(calls) - 1))], 2),
        "connect_seconds": round(connect_seconds, 2),
        "emit_seconds": round(emit_seconds, 2),
        "deliveries_per_second": round(received / total_seconds) if total_seconds else None,
        "connect_retries": sum(client.connect_retries for client in clients),
        "reconnects": sum(client.reconnects for client in clients),
        "web_cpu_s": round(web_cpu, 2),
        "web_cpu_us_per_delivery": round(web_cpu * 1e6 / received, 1) if received else None,
        "loadavg": os.getloadavg()[0],
        "clients_failed": len(errors),
        "first_error": errors[0] if errors else "",
    }


async def main(args: argparse.Namespace) -> None:
    from asgiref.sync import sync_to_async
    from django.conf import settings

    from gateway.keys import key_create

    print(
        f"database: {settings.DATABASES['default']['ENGINE'].rsplit('.', 1)[-1]}, "
        f"redis: {settings.REDIS_URL}, channel layer: {settings.CHANNEL_LAYERS['default']['BACKEND']}"
    )
    issued = await sync_to_async(key_create)(
        name=f"bench-{uuid.uuid4().hex[:6]}", permissions=["read", "write"]
    )
    owner = f"key:{issued.key.pk}"
    processes, url = start_web(args.server, args.web_processes)
    print(f"web processes: {len(processes)} {args.server}")
    import psutil

    watched = [psutil.Process(process.pid) for process in processes]

    def cpu_of() -> float:
        """User + system CPU seconds of the web processes, from the OS."""
        return sum(t.user + t.system for t in (p.cpu_times() for p in watched))

    # This process emits as a worker does, so its heap is settled as a worker's is (without it a
    # full collection of the clients' heap paused every emit for about 80 ms in some runs).
    from streaming.worker import settle_heap

    settle_heap()
    try:
        # Busy samples of the (first) web process for the whole run.
        with py_spy(processes[0].pid, args.py_spy, rate=50, gil=False):
            results = []
            if not args.skip_many:
                results.append(
                    await scenario(
                        "many",
                        url,
                        issued.raw,
                        owner,
                        args.conversations,
                        args.clients // args.conversations,
                        args.events,
                        args.interval,
                        cpu_of,
                        args.buffered,
                    )
                )
            results.append(
                await scenario(
                    "fanout",
                    url,
                    issued.raw,
                    owner,
                    1,
                    args.fanout,
                    args.fanout_events,
                    args.fanout_interval,
                    cpu_of,
                    args.buffered,
                )
            )
    finally:
        stop(*processes)
        await sync_to_async(issued.key.delete)()
        clean_redis()
    for result in results:
        print(json.dumps(result))
    print()
    print(
        f"{'scenario':<8} {'conv':>5} {'clients':>7} {'deliveries':>10} {'lost':>5} {'dup':>4} "
        f"{'p50 ms':>8} {'p99 ms':>8} {'deliv/s':>8} {'CPU us/deliv':>12}"
    )
    for r in results:
        print(
            f"{r['scenario']:<8} {r['conversations']:>5} {r['clients']:>7} {r['deliveries_received']:>10} "
            f"{r['lost']:>5} {r['duplicates']:>4} {r['latency_ms_p50']:>8} {r['latency_ms_p99']:>8} "
            f"{r['deliveries_per_second']:>8} {r['web_cpu_us_per_delivery']:>12}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=100)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--events", type=int, default=30, help="events per conversation")
    parser.add_argument("--fanout", type=int, default=1000, help="clients of the fan-out conversation")
    parser.add_argument("--fanout-events", type=int, default=50)
    parser.add_argument("--fanout-interval", type=float, default=0.1)
    parser.add_argument(
        "--interval", type=float, default=0.05, help="seconds between a conversation's events"
    )
    parser.add_argument(
        "--web-processes", type=int, default=1, help="web processes sharing one listening socket"
    )
    parser.add_argument("--py-spy", metavar="FILE", help="record the web process's busy stacks (raw format)")
    parser.add_argument(
        "--buffered",
        action="store_true",
        help="emit through a buffered log, as a conversation run does (default: one batch per event)",
    )
    parser.add_argument("--skip-many", action="store_true", help="run only the fan-out scenario")
    add_server_option(parser)
    cli = parser.parse_args()
    if not os.environ.get("REDIS_URL"):
        print("bench/stream.py: skipped, needs REDIS_URL (real Redis)")
        raise SystemExit(0)
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", interactive=False, verbosity=0)
    asyncio.run(main(cli))
