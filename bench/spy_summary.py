"""Summarise a py-spy raw profile (collapsed stacks): where the busy samples of a process go.

    .venv/bin/python bench/spy_summary.py profile.txt [--top 25]

Each sample is put in the first category (in the order below) whose marker appears in its stack,
so the figures add up to 100 %; then the functions most often on top of the stack (self time).
"""

from __future__ import annotations

import argparse
from collections import Counter

# (category, markers in a frame's "function (file:line)" text). First match wins, so the
# specific ones (the SDK, the database) come before the general ones (asyncio, Twisted).
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("Gemini SDK (google-genai, pydantic)", ("genai/", "pydantic")),
    ("httpx / httpcore / anyio (SDK transport)", ("httpx/", "httpcore/", "anyio/", "h11/")),
    ("PostgreSQL: psycopg", ("psycopg",)),
    ("Django ORM / db", ("django/db/",)),
    ("Redis client (redis-py, channels_redis)", ("redis/", "channels_redis/", "msgpack")),
    ("event log (conversations/events.py)", ("conversations/events.py",)),
    ("watchdog / services", ("conversations/services.py",)),
    (
        "orchestrator / consensus",
        (
            "agents/orchestrator.py",
            "agents/turns.py",
            "agents/voting.py",
            "agents/calls.py",
            "agents/prompts.py",
            "agents/records.py",
            "agents/synthesis.py",
            "consensus/",
        ),
    ),
    ("providers (ours) / resilience", ("agents/providers/", "agents/resilience.py", "tenacity/")),
    ("WebSocket consumer / Channels", ("streaming/consumers.py", "channels/")),
    ("Django request path, DRF, gateway", ("django/", "rest_framework/", "adrf/", "gateway/", "monitoring/")),
    ("daphne / Twisted / autobahn (server I/O)", ("daphne/", "twisted/", "autobahn/", "txaio/")),
    ("asgiref thread hops (sync_to_async)", ("asgiref/", "concurrent/futures", "threading.py")),
    ("json / logging", ("json/", "logging/", "pythonjsonlogger")),
    ("asyncio event loop", ("asyncio/", "selectors.py")),
]


def categorise(stack: str) -> str:
    for name, markers in CATEGORIES:
        if any(marker in stack for marker in markers):
            return name
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    by_category: Counter[str] = Counter()
    by_self: Counter[str] = Counter()
    total = 0
    with open(args.profile, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            stack, _, count_text = line.rstrip("\n").rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            total += count
            by_category[categorise(stack)] += count
            by_self[stack.rsplit(";", 1)[-1]] += count
    if not total:
        raise SystemExit("no samples")
    print(f"{total} busy samples")
    for name, count in by_category.most_common():
        print(f"{100 * count / total:6.1f} %  {name}")
    print(f"\ntop {args.top} functions by self samples")
    for frame, count in by_self.most_common(args.top):
        print(f"{100 * count / total:6.1f} %  {frame[:150]}")


if __name__ == "__main__":
    main()
