"""Orchestration benchmark: prints figures and ratios (simulated agents at a fixed latency).

1. One conversation, 3 agents, 2 turns at latency L: wall time against the ideal
   (rounds run x L, where rounds = discussion turns + the vote round), goal <= 1.10.
2. The orchestrator's CPU time per conversation at L = 0 (alone, and with storage): the median
   of 5 rounds of 20 conversations each, the two kinds of round alternating, with the rounds'
   spread, and the storage's own share (each stored round less the round alone before it).
3. 200 concurrent POST /chat through the ASGI app at L = 1 s: throughput, p50/p95/p99, errors.

Runs on the embedded defaults (a temporary SQLite file) unless DATABASE_URL / REDIS_URL are set.
Usage: .venv/bin/python bench/orchestration.py [--latency 0.5] [--concurrency 200]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DEBUG", "true")
os.environ.setdefault("RATE_LIMITING_ENABLED", "false")
os.environ.setdefault("LOG_LEVEL", "WARNING")
if not os.environ.get("DATABASE_URL"):
    os.environ["DATABASE_URL"] = f"sqlite:///{tempfile.mkdtemp()}/bench.sqlite3"
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "polyagents_site.settings")

import django

django.setup()

from django.conf import settings  # noqa: E402
from django.core.management import call_command  # noqa: E402

from agents.orchestrator import Orchestrator  # noqa: E402
from agents.profiles import build_panel  # noqa: E402
from agents.providers.registry import reset_providers  # noqa: E402
from conversations.services import conversation_run, conversation_start  # noqa: E402
from gateway.principal import Principal  # noqa: E402

QUESTIONS = [
    "Should a city invest first in solar or in wind power?",
    "Which colour should the new logo use: red, blue or green?",
    "What is the best database for analytics?",
    "Is it better to rent or to buy a home in a big city?",
    "Which is the better first programming language: Python or JavaScript?",
    "Should a startup build on PostgreSQL or MongoDB?",
    "Is remote work better for productivity than office work?",
]
PRINCIPAL = Principal(kind="user", permissions=frozenset({"read", "write", "admin"}), name="bench", user_id=0)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def set_latency(latency: float) -> None:
    settings.CONFIG.SIMULATED_LATENCY = latency
    reset_providers()


async def bench_wall(latency: float) -> None:
    set_latency(latency)
    print(f"\n1. One conversation, 3 agents, 2 turns, L = {latency:.2f} s (full path: storage + event log)")
    # One unmeasured run first: imports, the first database connection, the provider's client.
    warm, warm_exchange = await conversation_start(
        principal=PRINCIPAL, message="warm-up", num_agents=3, turns=1
    )
    await conversation_run(conversation_id=warm.pk, exchange=warm_exchange)
    ratios = []
    for question in QUESTIONS:
        conversation, exchange = await conversation_start(
            principal=PRINCIPAL, message=question, num_agents=3, turns=2
        )
        start = time.perf_counter()
        done = await conversation_run(conversation_id=conversation.pk, exchange=exchange)
        wall = time.perf_counter() - start
        rounds = done.turns_completed + (1 if done.metadata.get("vote_round") else 0)
        ideal = rounds * latency
        ratios.append(wall / ideal)
        print(
            f"   {question[:48]:48s} rounds={rounds} (turns {done.turns_completed}, vote "
            f"{'yes' if done.metadata.get('vote_round') else 'no, unanimous'}) wall={wall:.3f}s "
            f"ideal={ideal:.3f}s ratio={wall / ideal:.3f} status={done.status}"
        )
    print(f"   ratio: mean {statistics.mean(ratios):.3f}, max {max(ratios):.3f} (goal <= 1.10)")


async def bench_cpu(runs: int, rounds: int = 5) -> None:
    """CPU per conversation, each figure the median of `rounds` rounds of `runs` conversations
    (each round's mean), with the rounds' spread: one long mean on a shared machine reads the
    host's busy minutes as much as the code."""
    set_latency(0.0)
    print(f"\n2. CPU time per conversation at L = 0 (3 agents, 2 turns, {rounds} rounds of {runs} runs)")

    async def emit(type: str, **data: object) -> None:
        return None

    async def alone(i: int) -> None:
        panel = build_panel(3)
        await Orchestrator(panel=panel, question=f"{QUESTIONS[i % 5]} #{i}", turns=2, emit=emit).run()

    async def stored(i: int) -> None:
        conversation, exchange = await conversation_start(
            principal=PRINCIPAL, message=f"{QUESTIONS[i % 5]} #{i}", num_agents=3, turns=2
        )
        await conversation_run(conversation_id=conversation.pk, exchange=exchange)

    async def one_round(one: Any, r: int) -> float:
        cpu0 = time.process_time()
        for i in range(runs):
            await one(r * runs + i)
        return (time.process_time() - cpu0) * 1000 / runs

    # The two kinds of round alternate, so a busy minute of the host weighs on both alike.
    alone_means, stored_means = [], []
    for r in range(rounds):
        alone_means.append(await one_round(alone, r))
        stored_means.append(await one_round(stored, r))

    def spread(means: list[float]) -> str:
        low, high = min(means), max(means)
        return f"{statistics.median(means):.2f} ms CPU per conversation (rounds {low:.2f}-{high:.2f})"

    print(f"   orchestrator alone: {spread(alone_means)}")
    engine = settings.DATABASES["default"]["ENGINE"].rsplit(".", 1)[-1]
    print(f"   with storage + event log ({engine}): {spread(stored_means)}")
    added = [s - a for a, s in zip(alone_means, stored_means, strict=True)]
    print(f"   storage + event log alone (each round less the orchestrator's before it): {spread(added)}")


async def bench_http(concurrency: int, latency: float) -> None:
    import httpx

    from gateway.models import ApiKey, generate_key, hash_key
    from polyagents_site.asgi import application

    set_latency(latency)
    raw = generate_key()
    await ApiKey.objects.acreate(
        name="bench", prefix=raw[:10], key_hash=hash_key(raw), permissions=["read", "write"]
    )
    print(
        f"\n3. {concurrency} concurrent POST /chat through the ASGI app, "
        f"L = {latency:.2f} s, 3 agents, 2 turns"
    )
    transport = httpx.ASGITransport(app=application)
    latencies: list[float] = []
    errors: dict[str, int] = {}
    async with httpx.AsyncClient(transport=transport, base_url="http://bench", timeout=600) as client:

        async def one(i: int) -> None:
            start = time.perf_counter()
            response = await client.post(
                "/chat",
                json={"message": f"{QUESTIONS[i % 5]} (#{i})", "num_agents": 3, "turns": 2},
                headers={"Authorization": f"Bearer {raw}"},
            )
            latencies.append(time.perf_counter() - start)
            if response.status_code != 200:
                errors[str(response.status_code)] = errors.get(str(response.status_code), 0) + 1

        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(concurrency)))
        wall = time.perf_counter() - start
    print(f"   wall {wall:.2f} s, throughput {concurrency / wall:.1f} conversations/s")
    print(
        f"   latency p50 {percentile(latencies, 50):.2f} s, p95 {percentile(latencies, 95):.2f} s, "
        f"p99 {percentile(latencies, 99):.2f} s; errors: {sum(errors.values())} {errors or ''}"
    )


async def main(args: argparse.Namespace) -> None:
    await bench_wall(args.latency)
    await bench_cpu(args.cpu_runs)
    await bench_http(args.concurrency, 1.0)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--latency", type=float, default=0.5)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--cpu-runs", type=int, default=20, help="conversations per CPU round (5 rounds)")
    arguments = parser.parse_args()
    call_command("migrate", verbosity=0, interactive=False)
    engine = str(settings.DATABASES["default"]["ENGINE"])
    print(
        f"database: {engine.rsplit('.', 1)[-1]}, channel layer: "
        f"{str(settings.CHANNEL_LAYERS['default']['BACKEND']).rsplit('.', 1)[-1]}"
    )
    asyncio.run(main(arguments))
