"""Throughput of the parts under a conversation on this machine: PostgreSQL event writes, Redis.

1. PostgreSQL: C concurrent conversations, each storing K events one batch (one event) at a
   time, as the event log does for every event that is not an agent delta:
   a) the ORM's bulk operations (the embedded backend's `write_batch` code: bulk_create + UPDATE
      last_seq in one transaction, through sync_to_async and a pooled connection per thread),
      against the PostgreSQL backend's one statement (`PostgresEventStore.write_batch`);
   b) the phase-B candidate: psycopg's async connection in pipeline mode, the INSERT and the
      UPDATE sent together and committed in one round trip (no thread hop, no ORM);
   c) the same with 10 events per batch (a turn's rows together).
   Reports events/s and this process's CPU per event (process_time).
2. Redis: XADD (+EXPIRE, pipelined, as `_append_to_stream`) and PUBLISH per event, C at once.
3. The event log as the application runs it: `EventLog.emit` of C conversations at once, each
   event stored, appended and published before the next (one batch per event, a run's
   unbuffered events): the batches ready together share a statement and a Redis pipeline.
4. A WebSocket handshake's checks (block list, key, owner), C at once: `admit` through the ORM
   in a pool thread, and the one read a known key takes (`admit_in_one_read`).
5. A Gemini call through `GeminiProvider` (google-genai over aiohttp) against the wire-format
   fake Gemini in a thread of this process: the event loop thread's CPU per `generate` and per
   `stream` call (thread time, so the fake's own CPU is left out), best of 5 x 300 calls; and
   the resilience layer's own CPU around one call (`call_with_resilience`, best of 5 x 3000).
6. One request through the site's whole middleware stack (`GET /health`, Django's ASGI test
   client, the IP block check included), and one authenticated by an API key
   (`GET /auth/whoami`): this process's CPU per request, best of 5 x 300.

Needs DATABASE_URL (PostgreSQL) and REDIS_URL; writes to its own rows and keys, then deletes them.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/db REDIS_URL=redis://127.0.0.1:6379/0 \\
        .venv/bin/python bench/parts.py [--concurrency 50] [--events 40]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "polyagents_site.settings")
os.environ.setdefault("SECRET_KEY", "bench-" + secrets.token_urlsafe(32))
os.environ.setdefault("JWT_SECRET_KEY", "bench-" + secrets.token_urlsafe(32))
os.environ.setdefault("LOG_LEVEL", "ERROR")
os.environ["REDIS_KEY_PREFIX"] = "parts:" + uuid.uuid4().hex[:10]


def event_of(conversation_id: uuid.UUID, seq: int) -> dict[str, Any]:
    return {
        "type": "agent_response",
        "conversation_id": str(conversation_id),
        "seq": seq,
        "timestamp": "2026-01-01T00:00:00Z",
        "emitted_at": time.time(),
        "agent_id": "agent_0",
        "turn": 1,
        "content": "Weighing the evidence. " * 20 + "\n\nFINAL POSITION: Yes\nCONFIDENCE: 0.8",
    }


async def measure(
    name: str,
    concurrency: int,
    events: int,
    batch: int,
    write: Callable[[uuid.UUID, list[dict[str, Any]]], Awaitable[None]],
) -> dict[str, Any]:
    from conversations.models import Conversation

    ids = [uuid.uuid4() for _ in range(concurrency)]
    await Conversation.objects.abulk_create(
        [Conversation(id=cid, owner="bench:parts", status="running", exchanges=1) for cid in ids]
    )

    async def one(cid: uuid.UUID) -> None:
        for start in range(1, events + 1, batch):
            await write(cid, [event_of(cid, seq) for seq in range(start, min(events, start + batch - 1) + 1)])

    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(one(cid) for cid in ids))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    await Conversation.objects.filter(pk__in=ids).adelete()
    total = concurrency * events
    return {
        "part": name,
        "concurrency": concurrency,
        "events": total,
        "batch": batch,
        "events_per_s": round(total / wall),
        "round_trips_per_s": round(total / batch / wall),
        "cpu_us_per_event": round(cpu * 1e6 / total, 1),
    }


async def measure_handshakes(concurrency: int) -> list[dict[str, Any]]:
    """`concurrency` handshakes of one key following its own conversation, checked at once."""
    from asgiref.sync import sync_to_async
    from django.utils import timezone

    from conversations.events import in_pool_thread
    from conversations.models import Conversation
    from gateway.models import ApiKey, generate_key, hash_key
    from streaming.consumers import admit, admit_in_one_read

    raw = generate_key()
    key = await ApiKey.objects.acreate(
        name="bench:parts",
        prefix=raw[:10],
        key_hash=hash_key(raw),
        permissions=["read"],
        last_used_at=timezone.now(),
    )
    conversation = await Conversation.objects.acreate(owner=f"key:{key.pk}")
    scope = {
        "type": "websocket",
        "path": f"/ws/{conversation.pk}",
        "headers": [],
        "client": ("203.0.113.9", 40000),
        "subprotocols": [f"bearer.{raw}"],
        "query_string": b"",
        "url_route": {"kwargs": {"conversation_id": str(conversation.pk)}},
    }
    paths: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
        ("admit (ORM, pool thread)", lambda: in_pool_thread(admit, scope)),
        ("one read (admit_in_one_read)", lambda: admit_in_one_read(scope)),
    ]
    results = []
    for name, check in paths:
        await asyncio.gather(*(check() for _ in range(20)))  # warm: pools, plans
        cpu0, wall0 = time.process_time(), time.perf_counter()
        decisions = await asyncio.gather(*(check() for _ in range(concurrency)))
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        assert all(d is not None and d.principal is not None for d in decisions)
        results.append(
            {
                "part": name,
                "concurrency": concurrency,
                "checks_per_s": round(concurrency / wall),
                "cpu_ms_per_check": round(cpu * 1000 / concurrency, 2),
            }
        )
    await sync_to_async(conversation.delete)()
    await sync_to_async(key.delete)()
    return results


def best_of(
    rounds: int, calls: int, clock: Callable[[], float]
) -> Callable[[Callable[[], Awaitable[Any]]], Any]:
    """Run a call `rounds` x `calls` times after 50 warm-up calls: the least CPU ms per call."""

    async def run(call: Callable[[], Awaitable[Any]]) -> float:
        for _ in range(50):
            await call()
        best = float("inf")
        for _ in range(rounds):
            started = clock()
            for _ in range(calls):
                await call()
            best = min(best, (clock() - started) * 1000 / calls)
        return round(best, 3)

    return run


async def measure_calls() -> list[tuple[str, float]]:
    """Loop-thread CPU per Gemini call (5.), and process CPU per GET /health (6.)."""
    from django.test import AsyncClient

    from agents.providers.base import GenerationRequest, ResponseSchema
    from agents.providers.gemini import GeminiProvider
    from tests.fakes.gemini_server import FakeGemini

    schema = ResponseSchema(
        "answer",
        {
            "type": "object",
            "properties": {"answer": {"type": "string"}, "confidence": {"type": "number"}},
            "required": ["answer", "confidence"],
        },
    )
    request = GenerationRequest(
        model="gemini-2.5-flash",
        prompt="Is water wet? " * 30,
        system_instruction="Be terse.",
        response_schema=schema,
    )

    async def no_delta(text: str) -> None:
        return None

    with FakeGemini() as fake:
        provider = GeminiProvider(api_key="bench", base_url=fake.base_url, timeout=60)
        try:
            calls = best_of(5, 300, time.thread_time)
            generate = await calls(lambda: provider.generate(request))
            stream = await calls(lambda: provider.stream(request, no_delta))
        finally:
            await provider.aclose()
    layer = await measure_resilience_layer(request)
    from asgiref.sync import sync_to_async

    from gateway.keys import key_create

    client = AsyncClient()
    requests = best_of(5, 300, time.process_time)
    health = await requests(lambda: client.get("/health"))
    # A rate the token bucket never runs dry at (its check still runs on every request).
    issued = await sync_to_async(key_create)(
        name=f"parts-{uuid.uuid4().hex[:6]}", permissions=["read"], rate_limit_override=10**9
    )
    bearer = {"Authorization": f"Bearer {issued.raw}"}
    try:
        whoami = await requests(lambda: client.get("/auth/whoami", headers=bearer))
        assert (await client.get("/auth/whoami", headers=bearer)).status_code == 200
    finally:
        await sync_to_async(issued.key.delete)()
    return [
        ("Gemini generate (loop thread CPU)", generate),
        ("Gemini stream (loop thread CPU)", stream),
        ("resilience layer around one call (same)", layer),
        ("GET /health, whole middleware stack", health),
        ("GET /auth/whoami with an API key, same", whoami),
    ]


async def measure_resilience_layer(request: Any) -> float:
    """`call_with_resilience`'s own CPU per call (breaker, timeout, retries, metrics): around
    a provider that answers at once, less that provider's call alone, best of 5 x 3000."""
    from agents.providers.base import Generation, Usage
    from agents.resilience import call_with_resilience

    answer = Generation(text="Yes", model=request.model, provider="gemini", usage=Usage(10, 5))

    class AtOnce:
        name = "gemini"

        async def complete(self, request: Any, on_delta: Any = None) -> Generation:
            return answer

    provider: Any = AtOnce()
    calls = best_of(5, 3000, time.thread_time)
    bare = await calls(lambda: provider.complete(request))
    wrapped = await calls(lambda: call_with_resilience(provider, request, deadline=time.monotonic() + 600))
    return round(wrapped - bare, 4)


async def main(args: argparse.Namespace) -> None:
    from django.conf import settings
    from django.utils import timezone
    from psycopg.types.json import Jsonb
    from psycopg_pool import AsyncConnectionPool

    from conversations.events import EventLog, in_pool_thread, redis_client, stream_key
    from conversations.store import Rows
    from conversations.store.postgres import PostgresEventStore
    from conversations.store.sqlite import _write as orm_write

    results = []
    logs: dict[uuid.UUID, EventLog] = {}

    async def emit(cid: uuid.UUID, batch: list[dict[str, Any]]) -> None:
        log = logs.setdefault(cid, EventLog(cid))
        for event in batch:
            await log.emit("agent_response", agent_id="agent_0", turn=1, content=event["content"])

    async def orm(cid: uuid.UUID, batch: list[dict[str, Any]]) -> None:
        await in_pool_thread(orm_write, cid, batch, Rows(), timezone.now())

    statement = PostgresEventStore()

    async def one_statement(cid: uuid.UUID, batch: list[dict[str, Any]]) -> None:
        await statement.write_batch(cid, batch, Rows(), timezone.now())

    results.append(
        await measure("postgres: ORM bulk_create (thread hop)", args.concurrency, args.events, 1, orm)
    )
    results.append(
        await measure("postgres: event store statement", args.concurrency, args.events, 1, one_statement)
    )

    pool = AsyncConnectionPool(
        settings.CONFIG.DATABASE_URL or "", min_size=4, max_size=settings.CONFIG.DATABASE_POOL_MAX, open=False
    )
    await pool.open(wait=True)
    insert = (
        "INSERT INTO conversations_event (conversation_id, seq, type, data, created_at) "
        "VALUES (%s, %s, %s, %s, now())"
    )
    update = "UPDATE conversations_conversation SET last_seq = %s WHERE id = %s"

    async def pipelined(cid: uuid.UUID, batch: list[dict[str, Any]]) -> None:
        async with pool.connection() as conn, conn.pipeline(), conn.transaction(), conn.cursor() as cur:
            await cur.executemany(insert, [(cid, e["seq"], e["type"], Jsonb(e)) for e in batch])
            await cur.execute(update, (batch[-1]["seq"], cid))

    try:
        results.append(
            await measure("postgres: async psycopg pipeline", args.concurrency, args.events, 1, pipelined)
        )
        results.append(
            await measure("postgres: async psycopg pipeline", args.concurrency, args.events, 10, pipelined)
        )
    finally:
        await pool.close()

    client = redis_client()
    assert client is not None

    async def xadd(cid: uuid.UUID, batch: list[dict[str, Any]]) -> None:
        async with client.pipeline(transaction=False) as pipe:
            for event in batch:
                pipe.xadd(stream_key(cid), {"e": json.dumps(event)}, id=f"{event['seq']}-0", maxlen=10000)
            pipe.expire(stream_key(cid), 600)
            await pipe.execute()

    async def publish(cid: uuid.UUID, batch: list[dict[str, Any]]) -> None:
        for event in batch:
            await client.publish(f"{settings.REDIS_KEY_PREFIX}:bench:{cid}", json.dumps(event))

    results.append(await measure("redis: XADD + EXPIRE pipeline", args.concurrency, args.events, 1, xadd))
    results.append(await measure("redis: PUBLISH", args.concurrency, args.events, 1, publish))
    results.append(
        await measure("event log: emit (store, stream, publish)", args.concurrency, args.events, 1, emit)
    )
    handshakes = await measure_handshakes(args.concurrency * 6)
    keys = [key async for key in client.scan_iter(match=f"{settings.REDIS_KEY_PREFIX}:*", count=1000)]
    if keys:
        await client.delete(*keys)
    print(f"machine load average {os.getloadavg()[0]:.1f} (2 cores, shared)")
    print(f"{'part':<44} {'conc':>5} {'batch':>5} {'events/s':>9} {'trips/s':>8} {'CPU us/event':>12}")
    for r in results:
        print(
            f"{r['part']:<44} {r['concurrency']:>5} {r['batch']:>5} {r['events_per_s']:>9} "
            f"{r['round_trips_per_s']:>8} {r['cpu_us_per_event']:>12}"
        )
    print(f"\n{'WebSocket handshake checks':<44} {'conc':>5} {'checks/s':>9} {'CPU ms/check':>12}")
    for r in handshakes:
        print(f"{r['part']:<44} {r['concurrency']:>5} {r['checks_per_s']:>9} {r['cpu_ms_per_check']:>12}")
    print(f"\n{'one call at a time':<44} {'CPU ms/call':>11}")
    for part, ms in await measure_calls():
        print(f"{part:<44} {ms:>11}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--events", type=int, default=40, help="events per conversation")
    cli = parser.parse_args()
    if not (os.environ.get("REDIS_URL") and os.environ.get("DATABASE_URL", "").startswith("postgres")):
        print("bench/parts.py: skipped, needs DATABASE_URL (PostgreSQL) and REDIS_URL")
        raise SystemExit(0)
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", interactive=False, verbosity=0)
    asyncio.run(main(cli))
