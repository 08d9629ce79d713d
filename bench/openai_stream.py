"""Streamed /v1/chat/completions beside POST /chat, in the same run, over real TCP.

The fake Gemini of bench/load.py (every call answered after L seconds; three agents that never
agree, so each conversation runs 2 turns and a vote: 3 rounds, ideal 3 x L) and one daphne
process. At L, bursts of N concurrent requests alternate, each kind in turn (in one order in odd
rounds, the reverse in even ones, so drift on a shared machine falls on all):

- POST /chat (3 agents, 2 turns): wall / ideal, the web process's CPU per conversation;
- POST /v1/chat/completions not streamed ("plain"): wall / ideal, web CPU per conversation;
- POST /v1/chat/completions, `stream: true`, model `default` (the same panel): time to the
  first chunk (the role chunk), to the first agent token (reasoning_content), wall / ideal,
  web CPU per conversation, and whether every stream ended with the answer and [DONE].

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/db REDIS_URL=redis://127.0.0.1:6379/0 \\
        .venv/bin/python bench/openai_stream.py [--latency 1.0] [--concurrency 100] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import load  # noqa: E402


async def stream_burst(
    client: Any, key: str, concurrency: int, latency: float, cpu_of: Any
) -> dict[str, Any]:
    """`concurrency` streamed completions at once."""
    first_chunk: list[float] = []
    first_token: list[float] = []
    walls: list[float] = []
    ratios: list[float] = []
    errors: dict[str, int] = {}

    async def one(i: int) -> None:
        body = {
            "model": "default",
            "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": f"{load.QUESTIONS[i % len(load.QUESTIONS)]} (#{i})"}],
        }
        started = time.perf_counter()
        final: dict[str, Any] = {}
        seen_chunk = seen_token = False
        done = False
        try:
            async with client.stream(
                "POST", "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
            ) as response:
                if response.status_code != 200:
                    errors[str(response.status_code)] = errors.get(str(response.status_code), 0) + 1
                    return
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    now = time.perf_counter() - started
                    if not seen_chunk:
                        seen_chunk = True
                        first_chunk.append(now)
                    if line == "data: [DONE]":
                        done = True
                        break
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        errors["stream error"] = errors.get("stream error", 0) + 1
                        return
                    delta = chunk["choices"][0]["delta"] if chunk["choices"] else {}
                    if not seen_token and delta.get("reasoning_content"):
                        seen_token = True
                        first_token.append(now)
                    if "polyagents" in chunk and "conversation_id" in chunk["polyagents"]:
                        final = chunk["polyagents"]
        except Exception as exc:  # a benchmark counts failures, it never crashes on them
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
            return
        if not done or not final:
            errors["no [DONE]"] = errors.get("no [DONE]", 0) + 1
            return
        wall = time.perf_counter() - started
        voted = any(v.get("reason") != "sole proposal" for v in final.get("votes", []))
        walls.append(wall)
        ratios.append(wall / ((final["turns_completed"] + (1 if voted else 0)) * latency))

    cpu0 = cpu_of()
    started = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(concurrency))), 300)
    wall = time.perf_counter() - started
    cpu = cpu_of() - cpu0
    return {
        "kind": "stream",
        "concurrency": concurrency,
        "wall_s": round(wall, 2),
        "first_chunk_ms_p50": round(load.percentile(first_chunk, 50) * 1000, 1),
        "first_chunk_ms_p99": round(load.percentile(first_chunk, 99) * 1000, 1),
        "first_token_s_p50": round(load.percentile(first_token, 50), 2),
        "first_token_s_p99": round(load.percentile(first_token, 99), 2),
        "ratio_p50": round(load.percentile(ratios, 50), 2),
        "ratio_p99": round(load.percentile(ratios, 99), 2),
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "web_cpu_ms_per_conversation": round(cpu * 1000 / concurrency, 1),
    }


async def completion_burst(
    client: Any, key: str, concurrency: int, latency: float, cpu_of: Any
) -> dict[str, Any]:
    """`concurrency` completions at once, not streamed: the adapter without the stream."""
    walls: list[float] = []
    ratios: list[float] = []
    errors: dict[str, int] = {}

    async def one(i: int) -> None:
        question = f"{load.QUESTIONS[i % len(load.QUESTIONS)]} (#{i})"
        body = {"model": "default", "messages": [{"role": "user", "content": question}]}
        started = time.perf_counter()
        try:
            response = await client.post(
                "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
            )
        except Exception as exc:  # a benchmark counts failures, it never crashes on them
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
            return
        if response.status_code != 200:
            errors[str(response.status_code)] = errors.get(str(response.status_code), 0) + 1
            return
        final = response.json()["polyagents"]
        wall = time.perf_counter() - started
        voted = any(v.get("reason") != "sole proposal" for v in final.get("votes", []))
        walls.append(wall)
        ratios.append(wall / ((final["turns_completed"] + (1 if voted else 0)) * latency))

    cpu0 = cpu_of()
    started = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(concurrency))), 300)
    wall = time.perf_counter() - started
    return {
        "kind": "plain",
        "concurrency": concurrency,
        "wall_s": round(wall, 2),
        "ratio_p50": round(load.percentile(ratios, 50), 2),
        "ratio_p99": round(load.percentile(ratios, 99), 2),
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "web_cpu_ms_per_conversation": round((cpu_of() - cpu0) * 1000 / concurrency, 1),
    }


async def run(args: argparse.Namespace, base: str, web: Any, fake: str) -> None:
    import httpx
    import psutil
    from asgiref.sync import sync_to_async

    from gateway.keys import key_create

    proc = psutil.Process(web.pid)

    def cpu_of() -> float:
        times = proc.cpu_times()
        return float(times.user + times.system)

    issued = await sync_to_async(key_create)(
        name=f"openai-{uuid.uuid4().hex[:6]}", permissions=["read", "write"]
    )
    key = issued.raw
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    results: list[dict[str, Any]] = []
    loadavg_before = os.getloadavg()[0]
    async with httpx.AsyncClient(base_url=fake, timeout=10) as control:
        await control.post("/_bench/latency", params={"seconds": 0.0})
        async with httpx.AsyncClient(base_url=base, timeout=300, limits=limits) as client:
            await stream_burst(client, key, 5, 1.0, cpu_of)  # warm both paths up
            await load.burst(client, key, 5, 1.0, cpu_of, 2)
        await control.post("/_bench/latency", params={"seconds": args.latency})
        for round_ in range(args.rounds):
            order = ("chat", "stream", "plain") if round_ % 2 == 0 else ("plain", "stream", "chat")
            for kind in order:
                async with httpx.AsyncClient(base_url=base, timeout=300, limits=limits) as client:
                    if kind == "chat":
                        result = await load.burst(client, key, args.concurrency, args.latency, cpu_of, 2)
                        result["kind"] = "chat"
                    elif kind == "plain":
                        result = await completion_burst(client, key, args.concurrency, args.latency, cpu_of)
                    else:
                        result = await stream_burst(client, key, args.concurrency, args.latency, cpu_of)
                results.append({"round": round_ + 1, **result})
                await asyncio.sleep(args.settle)
    await sync_to_async(issued.key.delete)()
    print(json.dumps(results))
    print(
        f"\nL = {args.latency} s; machine load average {loadavg_before:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after (2 cores, shared)"
    )
    print(f"{'round':>5} {'kind':>6} {'wall s':>7} {'1st chunk p50/p99 ms':>21} {'1st token p50/p99 s':>20} "
          f"{'p50/ideal':>9} {'p99/ideal':>9} {'errors':>6} {'CPU ms/conv':>11}")  # fmt: skip
    for r in results:
        chunk = f"{r['first_chunk_ms_p50']}/{r['first_chunk_ms_p99']}" if r["kind"] == "stream" else "-"
        token = f"{r['first_token_s_p50']}/{r['first_token_s_p99']}" if r["kind"] == "stream" else "-"
        print(
            f"{r['round']:>5} {r['kind']:>6} {r['wall_s']:>7} {chunk:>21} {token:>20} {r['ratio_p50']:>9} "
            f"{r['ratio_p99']:>9} {r['errors']:>6} {r['web_cpu_ms_per_conversation']:>11}"
        )
    chat = [r["web_cpu_ms_per_conversation"] for r in results if r["kind"] == "chat"]
    stream = [r["web_cpu_ms_per_conversation"] for r in results if r["kind"] == "stream"]
    plain = [r["web_cpu_ms_per_conversation"] for r in results if r["kind"] == "plain"]
    if chat and stream and plain:
        base = sum(chat) / len(chat)
        print(
            f"web CPU per conversation against /chat's: stream {sum(stream) / len(stream) / base:.2f}, "
            f"not streamed {sum(plain) / len(plain) / base:.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=1.0, help="seconds per LLM call")
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument(
        "--rounds", type=int, default=2, help="rounds of bursts (/chat, stream, not streamed)"
    )
    parser.add_argument("--settle", type=float, default=3.0)
    args = parser.parse_args()
    load.bench_environment("openai")
    if not os.environ.get("DATABASE_URL"):
        os.environ["DATABASE_URL"] = f"sqlite:///{tempfile.mkdtemp()}/openai.sqlite3"
    try:
        with load.fake_gemini() as fake_url:
            os.environ["GEMINI_BASE_URL"] = fake_url
            import django

            django.setup()
            from django.core.management import call_command

            call_command("migrate", interactive=False, verbosity=0)
            webs, port = load.spawn_web("daphne")
            try:
                load.wait_for_port(port, webs[0])
                asyncio.run(run(args, f"http://127.0.0.1:{port}", webs[0], fake_url))
            finally:
                load.stop(*webs)
    finally:
        load.clean_redis()


if __name__ == "__main__":
    main()
