"""Rate limiter bench: one Redis token bucket hammered by several OS processes.

Run: `python -m bench.ratelimit` (REDIS_URL, default redis://127.0.0.1:6379/0). It prints the
requests allowed against the expected burst + refill over the run, and the per-check
latency (p50/p99) of the Lua script, round trip included.

Method: the parent's first check creates the bucket (full) and marks the start on Redis'
clock; the workers hammer it for `--duration` seconds and then until one check is refused;
the end is the timestamp of the last check. Expected = capacity + rate x (end - start). A
bucket that lost or double-spent tokens under concurrency would drift past +-1.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
import uuid
from dataclasses import dataclass
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from pathlib import Path

# Run as a script too (`make bench` does): the project's apps import from its root.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


@dataclass(frozen=True)
class SharedBucketRun:
    """Outcome of one burst-then-refill run."""

    allowed: int
    expected: float
    checks: int
    elapsed: float
    p50_ms: float
    p99_ms: float

    @property
    def error(self) -> float:
        return self.allowed - self.expected


def _hammer(
    url: str, key: str, policy: tuple[int, int, int], duration: float, ready: Queue, go: Event
) -> None:
    """Worker: call the bucket in a tight loop for `duration` seconds, report counts and latencies."""
    from gateway.ratelimit import Policy, take

    bucket = Policy(*policy)
    take(url, key + ":warmup", bucket)  # connect and load the script before the clock starts
    ready.put(("ready", 0, 0, []))
    go.wait()
    allowed = checks = 0
    latencies: list[float] = []
    end = time.monotonic() + duration
    last_allowed = True
    # Past the deadline, go on until refused: the run then ends on an empty bucket, so tokens
    # refilled while a worker was descheduled near the end are not counted as lost.
    while time.monotonic() < end or last_allowed:
        start = time.perf_counter()
        decision = take(url, key, bucket)
        latencies.append(time.perf_counter() - start)
        last_allowed = decision.allowed
        allowed += decision.allowed
        checks += 1
    ready.put(("done", allowed, checks, latencies))


def run_shared_bucket(
    url: str, key: str, *, capacity: int, requests: int, window: int, duration: float, processes: int = 2
) -> SharedBucketRun:
    """Start `processes` spawned workers on one bucket and compare allowed with capacity + refill."""
    import redis

    from gateway.ratelimit import Policy, take

    conn = redis.Redis.from_url(url)
    conn.delete(key, key + ":warmup")
    ctx = mp.get_context("spawn")
    ready: Queue = ctx.Queue()
    go = ctx.Event()
    policy = (capacity, requests, window)
    workers = [
        ctx.Process(target=_hammer, args=(url, key, policy, duration, ready, go)) for _ in range(processes)
    ]
    for worker in workers:
        worker.start()
    try:
        for _ in workers:
            ready.get(timeout=60)
        # The parent's first check creates the bucket full and marks the start on Redis' clock.
        first = take(url, key, Policy(*policy))
        started = float(conn.hget(key, "ts") or 0)
        go.set()
        results = [ready.get(timeout=duration + 60) for _ in workers]
    finally:
        for worker in workers:
            worker.join(timeout=10)
    # The bucket's timestamp is that of the last check, on the same Redis clock.
    finished = float(conn.hget(key, "ts") or 0)
    conn.delete(key, key + ":warmup")
    conn.close()
    latencies = sorted(lat for *_, lats in results for lat in lats)
    elapsed = finished - started
    return SharedBucketRun(
        allowed=int(first.allowed) + sum(r[1] for r in results),
        expected=capacity + elapsed * requests / window,
        checks=1 + sum(r[2] for r in results),
        elapsed=elapsed,
        p50_ms=statistics.median(latencies) * 1000,
        p99_ms=latencies[int(len(latencies) * 0.99)] * 1000,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--capacity", type=int, default=10, help="bucket size (RATE_LIMIT_BURST)")
    parser.add_argument("--requests", type=int, default=20, help="tokens refilled per window")
    parser.add_argument("--window", type=int, default=1, help="window in seconds")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds of hammering")
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args()
    prefix = os.environ.get("REDIS_KEY_PREFIX", "polyagents")
    key = f"{prefix}:rl:bench:{uuid.uuid4().hex[:8]}"
    run = run_shared_bucket(
        args.url,
        key,
        capacity=args.capacity,
        requests=args.requests,
        window=args.window,
        duration=args.duration,
        processes=args.processes,
    )
    print(
        f"token bucket via Redis, {args.processes} processes, capacity {args.capacity}, "
        f"{args.requests}/{args.window}s, {run.elapsed:.2f}s run"
    )
    print(
        f"allowed {run.allowed} / expected {run.expected:.2f} (error {run.error:+.2f}), {run.checks} checks"
    )
    print(f"per-check latency (Lua script, round trip): p50 {run.p50_ms:.3f} ms, p99 {run.p99_ms:.3f} ms")


if __name__ == "__main__":
    main()
