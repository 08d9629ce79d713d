"""Warm a web process up at start, so its first request costs what every later one does.

Without it the first POST /chat of a process pays for importing the views, DRF's classes,
the orchestrator and the Gemini SDK, for opening the database pool, the Redis clients and
the channel layer's connection (docs/scaling.md has the first request's figure).

`warm_up()` runs when the ASGI application is imported (before the server accepts
connections); the steps that need the server's event loop (an SDK client and a Redis
client are bound to the loop that made them) run as a task as soon as that loop runs.
Nothing here calls an LLM. A step that fails is logged and skipped: warming up never
stops a process from starting; the first request then pays for that step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import logging
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from django.conf import settings

from agents.orchestrator import panel_shapes
from agents.profiles import build_panel
from agents.providers.registry import get_provider
from conversations.assessment import recalibration, reliabilities
from conversations.events import redis_client
from conversations.models import Conversation
from loopstate import PerLoop
from streaming.worker import settle_heap

logger = logging.getLogger("polyagents.warmup")

# Imported lazily by the request path; importing them here moves the cost to start-up.
HOT_MODULES = (
    "conversations.services",
    "conversations.selectors",
    "conversations.events",
    "agents.orchestrator",
    "agents.resilience",
    "consensus.formats",
    "streaming.consumers",
    "gateway.auth",
    "gateway.blocking",
    "gateway.security",
    "gateway.net",
    "httpx_aiohttp",  # the SDKs' transport (agents.providers.loops), built per event loop
)

REDIS_CONNECTIONS = 4  # opened at start; like the event store's pool (loopstate.postgres.POOL_MAX)
_tasks: set[asyncio.Task[None]] = set()


def _step(name: str, timings: dict[str, float], fn: Callable[[], Any]) -> None:
    started = time.perf_counter()
    try:
        fn()
    except Exception as exc:
        logger.warning("warm-up step skipped", extra={"step": name, "error": f"{type(exc).__name__}: {exc}"})
    timings[name] = round((time.perf_counter() - started) * 1000, 1)


def _routes() -> None:
    from django.urls import get_resolver

    get_resolver().resolve("/chat")  # imports every URL module and its views


def _rest_framework() -> None:
    from rest_framework.settings import api_settings

    for name in (
        "DEFAULT_AUTHENTICATION_CLASSES",
        "DEFAULT_PERMISSION_CLASSES",
        "DEFAULT_RENDERER_CLASSES",
        "DEFAULT_PARSER_CLASSES",
        "DEFAULT_THROTTLE_CLASSES",
        "DEFAULT_CONTENT_NEGOTIATION_CLASS",
        "EXCEPTION_HANDLER",
    ):
        getattr(api_settings, name)  # each is imported from its dotted path on first access


def _modules() -> None:
    for module in HOT_MODULES:
        importlib.import_module(module)


def panel_providers() -> list[Any]:
    """The provider instances a default panel uses (built now: imports their SDKs)."""
    names = {profile.provider for profile in build_panel(settings.CONFIG.MAX_AGENTS)}
    return [get_provider(name) for name in sorted(names)]


def _off_the_running_loop(fn: Callable[[], Any]) -> None:
    """Call `fn` here, or, when this thread runs an event loop (uvicorn imports the application
    inside it, as does an in-process ASGI client), in a thread while start-up waits for it."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        fn()
        return
    with concurrent.futures.ThreadPoolExecutor(1) as executor:
        executor.submit(fn).result()


def _database() -> None:
    from django.db import connection

    def query() -> None:
        try:
            # Opens psycopg's pool on PostgreSQL (or the SQLite file) and runs the ORM's query path once.
            Conversation.objects.filter(pk=uuid.uuid4()).exists()
        finally:
            connection.close()  # back to the pool: request threads take their own

    _off_the_running_loop(query)  # the ORM refuses to run inside a running loop


def _sdk_calls() -> None:
    """Each provider's SDK round in memory (`warm_up`), and what the calls of a default panel's
    shapes need (`prepare`: Gemini's request bodies), on a loop of its own before the server's
    runs: it binds nothing to a loop, and the server accepts no request before it is done."""

    async def calls() -> None:
        for provider in panel_providers():
            warm = getattr(provider, "warm_up", None)
            if warm is not None:
                await warm()
        config = settings.CONFIG
        for name, request in panel_shapes(build_panel(config.NUM_AGENTS), config.MAX_OUTPUT_TOKENS):
            await get_provider(name).prepare(request)

    _off_the_running_loop(lambda: asyncio.run(calls()))


def _fits() -> None:
    """The calibration fits a finished run reads (conversations.assessment): fitted or read from
    the shared cache now, and kept by this process for its first runs."""

    def read() -> None:
        from django.db import connection

        try:
            reliabilities()
            recalibration()
        finally:
            connection.close()

    _off_the_running_loop(read)


def _cache() -> None:
    from django.core.cache import cache

    cache.get("polyagents:warm-up")


def warm_up() -> dict[str, float]:
    """The synchronous steps, in the importing thread; milliseconds per step."""
    timings: dict[str, float] = {}
    _step("routes", timings, _routes)
    _step("rest_framework", timings, _rest_framework)
    _step("modules", timings, _modules)
    _step("providers", timings, panel_providers)
    _step("sdk_calls", timings, _sdk_calls)
    _step("database", timings, _database)
    _step("cache", timings, _cache)
    _step("fits", timings, _fits)
    logger.info("warmed up", extra={"steps_ms": timings})
    return timings


async def awarm_up() -> dict[str, float]:
    """The steps bound to the running event loop: SDK clients, the event store's connection
    pool, Redis, the channel layer."""
    timings: dict[str, float] = {}

    async def step(name: str, fn: Callable[[], Awaitable[Any]]) -> None:
        started = time.perf_counter()
        try:
            await fn()
        except Exception as exc:
            logger.warning(
                "warm-up step skipped", extra={"step": name, "error": f"{type(exc).__name__}: {exc}"}
            )
        timings[name] = round((time.perf_counter() - started) * 1000, 1)

    async def sdk_clients() -> None:
        for provider in panel_providers():
            # Providers keep one SDK client per event loop; build this loop's now.
            clients = getattr(provider, "_clients", None)
            if isinstance(clients, PerLoop):
                clients.get()

    async def redis() -> None:
        client = redis_client()
        if client is not None:
            # Pings at once open as many pooled connections: the first runs' batches write
            # their events concurrently, each on a connection of its own.
            await asyncio.gather(*(client.ping() for _ in range(REDIS_CONNECTIONS)))

    async def channel_layer() -> None:
        from channels.layers import get_channel_layer

        layer = get_channel_layer()
        if layer is not None:
            # A message to a group nobody joins: opens this loop's publishing connection.
            await layer.group_send("polyagents.warm-up", {"type": "warm.up"})

    async def event_store() -> None:
        from conversations.services import rehearse_run
        from conversations.store import event_store as store

        # This loop's connections opened, each having run a run's statements once (rolled back).
        await store().warm_up(rehearse_run)

    async def heap() -> None:
        settle_heap()

    await step("sdk_clients", sdk_clients)
    await step("event_store", event_store)
    await step("redis", redis)
    await step("channel_layer", channel_layer)
    # Last: everything the steps above built is part of the heap that is set aside.
    await step("heap", heap)
    logger.info("warmed up the event loop", extra={"steps_ms": timings})
    return timings


def run_on_server_loop(coroutine: Callable[[], Awaitable[Any]]) -> bool:
    """Run `coroutine()` on the server's event loop; False if there is none to find.

    daphne imports the application before it starts Twisted's asyncio reactor, and listens only
    after that: the coroutine runs to its end on the reactor's loop right away, so the first
    request never waits behind it (the event store's connections, the settled heap). daphne's
    server module names the loop it installs the reactor on (`daphne.server.twisted_loop`).
    Servers that import the application from inside their running loop (uvicorn) get a task
    instead.
    """

    async def run() -> None:
        await coroutine()

    def start(loop: asyncio.AbstractEventLoop) -> None:
        task = loop.create_task(run())
        _tasks.add(task)
        task.add_done_callback(_tasks.discard)

    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None  # no loop runs in this thread
    if running is not None:
        start(running)
        return True
    daphne = sys.modules.get("daphne.server")
    loop = getattr(daphne, "twisted_loop", None)
    if isinstance(loop, asyncio.AbstractEventLoop) and not loop.is_running() and not loop.is_closed():
        # What it leaves running on the loop (pools' tasks, connections) resumes with the reactor.
        loop.run_until_complete(run())
        return True
    return False  # no server loop (manage.py, tests): the first request builds them
