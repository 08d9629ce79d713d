"""Live events of background runs: N concurrent POST /stream runs executed by a real worker,
each followed by WebSocket clients over TCP, latency from an event's emit to its receipt.

Starts the wire-format fake Gemini of bench/load.py (every call answers after L seconds), a
daphne web process and a procrastinate worker (`manage.py worker`, with
WORKER_CONCURRENCY = N so every run is in flight at once; `--workers K` starts K of them,
each with N / K), all with the real google-genai SDK. Then N runs (3 agents, 2 turns + vote,
streamed: agent deltas included) are started with POST /stream/{id}, and each is followed
by C WebSocket clients until its terminal event. Reported: latency p50 / p99 / max of the
events emitted after the client had subscribed (events stored before it connected reach it
by replay and are not "live"), lost and duplicated events against the stored log, and the
workers' and the web process's CPU read from the OS.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/db REDIS_URL=redis://127.0.0.1:6379/0 \\
        .venv/bin/python bench/live.py [--runs 50] [--clients 2] [--latency 0.5]

Needs PostgreSQL (the worker's queue) and Redis (the channel layer across processes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.load import (  # noqa: E402
    add_server_option,
    bench_environment,
    clean_redis,
    fake_gemini,
    follow_socket,
    percentile,
    py_spy,
    spawn_web,
    stop,
    wait_for_port,
)

TERMINAL = {"conversation_completed", "conversation_failed"}


@dataclass
class Follower:
    conversation_id: str
    subscribed_at: float = 0.0
    seqs: list[int] = field(default_factory=list)
    live_latencies: list[float] = field(default_factory=list)
    error: str = ""


async def follow(base: str, token: str, follower: Follower, timeout: float) -> None:
    """Subscribe (a pong confirms it), then record every event until the terminal one.

    A dropped connection resumes with after=<last seq>, as a real client does.
    """
    import websockets

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        after = follower.seqs[-1] if follower.seqs else 0
        try:
            async with follow_socket(base, follower.conversation_id, token, after) as ws:
                if not follower.subscribed_at:
                    await ws.send('{"type":"ping"}')
                    pending = []
                    while True:
                        message = json.loads(await asyncio.wait_for(ws.recv(), 60))
                        if message.get("type") == "pong":
                            break
                        pending.append(message)  # replayed before the pong
                    follower.subscribed_at = time.time()
                    for event in pending:
                        if "seq" in event:
                            follower.seqs.append(event["seq"])
                    if pending and pending[-1].get("type") in TERMINAL:
                        return
                while True:
                    raw = await asyncio.wait_for(ws.recv(), max(0.1, deadline - time.monotonic()))
                    now = time.time()
                    event = json.loads(raw)
                    if "seq" not in event:
                        continue
                    follower.seqs.append(event["seq"])
                    emitted = event.get("emitted_at")
                    if isinstance(emitted, float | int) and emitted >= follower.subscribed_at:
                        follower.live_latencies.append((now - emitted) * 1000)
                    if event.get("type") in TERMINAL:
                        return
        except (TimeoutError, OSError, websockets.WebSocketException) as exc:
            follower.error = f"{type(exc).__name__}: {exc}"
            await asyncio.sleep(0.2)
    follower.error = follower.error or "timed out"


async def run(
    args: argparse.Namespace, base: str, web: subprocess.Popen[bytes], workers: list[subprocess.Popen[bytes]]
) -> None:
    import httpx
    import psutil
    from asgiref.sync import sync_to_async

    from conversations.models import Event
    from gateway.keys import key_create

    processes = {"web": [psutil.Process(web.pid)], "worker": [psutil.Process(w.pid) for w in workers]}

    def cpu() -> dict[str, float]:
        """User + system CPU seconds from the OS: the web process, and the workers together."""
        return {
            name: sum(t.user + t.system for t in (p.cpu_times() for p in group))
            for name, group in processes.items()
        }

    issued = await sync_to_async(key_create)(
        name=f"live-{uuid.uuid4().hex[:6]}", permissions=["read", "write"]
    )
    headers = {"Authorization": f"Bearer {issued.raw}"}
    ws_base = base.replace("http://", "ws://")
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        # Warm runs first (imports, SDK clients, pools), one per worker process, not measured.
        # (procrastinate decides which worker takes which job: usually one each, not always.)
        warm_ids = [str(uuid.uuid4()) for _ in workers]
        for warm in warm_ids:
            body = {"message": "Warm up?", "num_agents": 3, "turns": 1}
            (await client.post(f"/stream/{warm}", json=body, headers=headers)).raise_for_status()
        await asyncio.gather(*(follow(ws_base, issued.raw, Follower(warm), 60) for warm in warm_ids))
        ids = [str(uuid.uuid4()) for _ in range(args.runs)]
        followers = [Follower(cid) for cid in ids for _ in range(args.clients)]
        # The clients measure: a full collection of this process's heap would add its pause to
        # the latencies it reads, so the heap is settled as the service's processes settle theirs.
        from streaming.worker import settle_heap

        settle_heap()
        with py_spy(workers[0].pid, args.py_spy), py_spy(web.pid, args.py_spy_web):
            cpu_before = cpu()
            started = time.monotonic()
            responses = await asyncio.gather(
                *(
                    client.post(
                        f"/stream/{cid}",
                        json={"message": f"Question {n}: should we do it?", "num_agents": 3, "turns": 2},
                        headers=headers,
                    )
                    for n, cid in enumerate(ids)
                )
            )
            refused = [r.status_code for r in responses if r.status_code not in (200, 202)]
            await asyncio.gather(*(follow(ws_base, issued.raw, f, args.timeout) for f in followers))
            wall = time.monotonic() - started
            cpu_after = cpu()
    stored = {cid: await Event.objects.filter(conversation_id=cid).acount() for cid in ids}
    expected = sum(stored[f.conversation_id] for f in followers)
    distinct = sum(len(set(f.seqs)) for f in followers)
    received = sum(len(f.seqs) for f in followers)
    latencies = [lat for f in followers for lat in f.live_latencies]
    errors = [f.error for f in followers if f.error]
    result: dict[str, Any] = {
        "runs": args.runs,
        "clients": len(followers),
        "latency_s": args.latency,
        "refused": refused,
        "wall_s": round(wall, 2),
        "events_stored": sum(stored.values()),
        "deliveries_expected": expected,
        "deliveries_received": received,
        "lost": expected - distinct,
        "duplicates": received - distinct,
        "live_events": len(latencies),
        "latency_ms_p50": round(percentile(latencies, 50), 1),
        "latency_ms_p99": round(percentile(latencies, 99), 1),
        "latency_ms_max": round(max(latencies), 1) if latencies else None,
        "latency_ms_mean": round(statistics.fmean(latencies), 1) if latencies else None,
        "workers": args.workers,
        "worker_cpu_ms_per_run": round((cpu_after["worker"] - cpu_before["worker"]) * 1000 / args.runs, 1),
        "web_cpu_ms_per_run": round((cpu_after["web"] - cpu_before["web"]) * 1000 / args.runs, 1),
        "clients_failed": len(errors),
        "first_error": errors[0] if errors else "",
        "loadavg": round(os.getloadavg()[0], 2),
    }
    await sync_to_async(issued.key.delete)()
    print(json.dumps(result))
    print()
    print(
        f"{args.runs} /stream runs ({args.workers} worker process(es), L = {args.latency} s), "
        f"{len(followers)} clients: "
        f"live events p50 {result['latency_ms_p50']} ms, p99 {result['latency_ms_p99']} ms, "
        f"max {result['latency_ms_max']} ms over {len(latencies)} deliveries; lost {result['lost']}, "
        f"duplicated {result['duplicates']}; CPU per run: worker {result['worker_cpu_ms_per_run']} ms, "
        f"web {result['web_cpu_ms_per_run']} ms; load average {result['loadavg']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--clients", type=int, default=2, help="WebSocket clients per run")
    parser.add_argument("--latency", type=float, default=0.5, help="seconds per LLM call")
    parser.add_argument("--timeout", type=float, default=180)
    parser.add_argument(
        "--workers", type=int, default=1, help="worker processes (each with a concurrency of runs / workers)"
    )
    parser.add_argument(
        "--py-spy", metavar="FILE", help="record the worker's stacks while it holds the GIL (raw)"
    )
    parser.add_argument(
        "--py-spy-web", metavar="FILE", help="record the web process's stacks while it holds the GIL (raw)"
    )
    parser.add_argument(
        "--worker-concurrency",
        type=int,
        help="runs each worker process takes at once (default: runs / workers, every run in flight)",
    )
    add_server_option(parser)
    args = parser.parse_args()
    if not (os.environ.get("DATABASE_URL", "").startswith("postgres") and os.environ.get("REDIS_URL")):
        print("bench/live.py: skipped, needs DATABASE_URL (PostgreSQL, the worker's queue) and REDIS_URL")
        raise SystemExit(0)
    bench_environment("live")
    os.environ["WORKER_CONCURRENCY"] = str(args.worker_concurrency or -(-args.runs // args.workers))
    children: list[subprocess.Popen[bytes]] = []
    try:
        with fake_gemini() as fake_url:
            os.environ["GEMINI_BASE_URL"] = fake_url
            import django
            import httpx

            django.setup()
            from django.core.management import call_command

            call_command("migrate", interactive=False, verbosity=0)
            httpx.post(f"{fake_url}/_bench/latency", params={"seconds": args.latency}).raise_for_status()
            quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "start_new_session": True}
            try:
                webs, port = spawn_web(args.server)
                web = webs[0]
                children.append(web)
                workers = [
                    subprocess.Popen(
                        [sys.executable, "manage.py", "worker"],
                        cwd=ROOT,
                        env=dict(os.environ),
                        **quiet,  # type: ignore[call-overload]
                    )
                    for _ in range(args.workers)
                ]
                children.extend(workers)
                wait_for_port(port, web)
                asyncio.run(run(args, f"http://127.0.0.1:{port}", web, workers))
            finally:
                stop(*children)
    finally:
        clean_redis()


if __name__ == "__main__":
    main()
