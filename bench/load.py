"""Load run over real TCP: a daphne web process, the real Gemini SDK, a wire-format fake Gemini.

Starts the fake Gemini server (tests/fakes/gemini_server.py) in its own process, answering
every call after a fixed latency L, then a daphne process with GEMINI_BASE_URL pointing at it
and a dummy GEMINI_API_KEY (so every agent is the real google-genai client), then measures:

1. the first request: the first POST /chat once daphne accepts TCP connections (L = 0),
2. the warm POST /chat round trip at L = 0 (3 agents, 1 turn), sequential,
3. N concurrent POST /chat at L (3 agents, 2 turns; the fake gives the agents different
   positions so every conversation runs both turns and a vote: 3 rounds, ideal 3 x L):
   wall / ideal p50 and p99, errors, and the web process's CPU per conversation read from
   the OS (psutil: user + system time of the daphne process, before and after the burst;
   with `--web-processes N`, of the N processes sharing one listening socket).

Loopback only, bounded in count and time (each burst has a 300 s cap). On PostgreSQL + Redis
set DATABASE_URL and REDIS_URL; without them the web process runs on the embedded defaults
(a temporary SQLite file, in-memory channel layer, no Redis), which serialises every write
on one SQLite writer.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/db REDIS_URL=redis://127.0.0.1:6379/0 \\
        .venv/bin/python bench/load.py [--latency 1.0] [--concurrency 100 200] [--warm 20]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

QUESTIONS = [
    "Should a city invest first in solar or in wind power?",
    "Which colour should the new logo use: red, blue or green?",
    "What is the best database for analytics?",
    "Is it better to rent or to buy a home in a big city?",
    "Should a startup build on PostgreSQL or MongoDB?",
]
POSITIONS = ("Yes", "No", "It depends")


# --- the fake Gemini process ------------------------------------------------------------


def serve_fake() -> None:
    """Run the fake Gemini server until stdin closes; print its base URL first.

    `POST /_bench/latency?seconds=L` sets the delay of every later answer. Each agent (told
    apart by its system instruction) keeps a position of its own (Yes / No / It depends), so
    a panel of three never agrees and every conversation runs its turns and a vote: 3 rounds
    for 2 turns. (A position rotating per call, as before, let the calls of concurrent
    conversations interleave into unanimous panels now and then, whose one-round ideal made
    the p99 / ideal of a burst swing with chance.) A ballot votes for the first option. A
    request for structured output (a JSON schema) gets JSON that fits it, as Gemini answers;
    others get the text format.
    """
    import itertools

    from tests.fakes.gemini_server import FakeGemini, ok
    from tests.fakes.http_server import RecordedRequest, Response, structured_default

    class BenchGemini(FakeGemini):
        latency = 0.0
        counter = itertools.count()
        positions: dict[str, str] = {}  # an agent's system instruction -> its position

        def handle(self, request: RecordedRequest) -> Response:
            if request.path == "/_bench/latency":
                self.latency = float(request.query["seconds"][0])
                return Response(body={"latency": self.latency})
            with self._lock:
                self.requests.clear()  # nothing to assert here; keep memory flat
            body = request.body if isinstance(request.body, dict) else {}
            config = body.get("generationConfig") or {}
            schema = config.get("responseSchema") or config.get("responseJsonSchema")
            prompt = json.dumps(body)
            instruction = json.dumps(body.get("systemInstruction"))
            with self._lock:
                position = self.positions.get(instruction)
                if position is None:
                    position = POSITIONS[next(self.counter) % len(POSITIONS)]
                    self.positions[instruction] = position
            if schema is not None:
                # Structured output, as Gemini answers it: a ballot names the first option.
                text = structured_default(
                    schema, answer="Weighing the evidence.", position=position, confidence=0.8
                )
            elif "VOTE:" in prompt:
                text = "VOTE: A\nCONFIDENCE: 0.7\nREASON: the strongest argument."
            else:
                text = f"Weighing the evidence.\n\nFINAL POSITION: {position}\nCONFIDENCE: 0.8"
            match = request.path.endswith(":streamGenerateContent")
            if request.path.startswith("/v1beta/models/") and request.method == "POST":
                return ok(text, delay=self.latency).response(stream=match)
            return super().handle(request)

    fake = BenchGemini()
    fake.start()
    # Enough threads for hundreds of calls sleeping at once: ThreadingHTTPServer makes one each.
    print(fake.base_url, flush=True)
    sys.stdin.read()  # until the benchmark closes our stdin
    fake.stop()


# --- helpers ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def bench_environment(prefix: str) -> None:
    """What every process of a load benchmark runs with: throwaway secrets, quiet logs, no rate
    limits, Redis keys under a prefix of its own (`clean_redis` removes them), and every agent
    on the real Gemini SDK (GEMINI_BASE_URL is set once the fake runs)."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "polyagents_site.settings")
    os.environ.setdefault("SECRET_KEY", "bench-" + secrets.token_urlsafe(32))
    os.environ.setdefault("JWT_SECRET_KEY", "bench-" + secrets.token_urlsafe(32))
    os.environ.setdefault("LOG_LEVEL", "ERROR")
    os.environ["RATE_LIMITING_ENABLED"] = "false"
    os.environ["REDIS_KEY_PREFIX"] = f"{prefix}:{uuid.uuid4().hex[:10]}"
    os.environ["GEMINI_API_KEY"] = "bench-dummy-key"
    os.environ["LLM_PROVIDER"] = "gemini"
    os.environ.pop("AGENT_MODELS_CONFIG", None)


@contextlib.contextmanager
def fake_gemini() -> Iterator[str]:
    """The fake Gemini (`serve_fake`) in a process of its own for the block; yields its base URL."""
    fake = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--serve-fake"],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert fake.stdout is not None
        yield fake.stdout.readline().decode().strip()
    finally:
        if fake.stdin is not None:
            fake.stdin.close()  # it serves until its stdin closes
        try:
            fake.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(fake.pid, signal.SIGKILL)


def stop(*processes: subprocess.Popen[bytes]) -> None:
    """SIGTERM each process group still running, then wait; SIGKILL what outlives 20 s."""
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


@contextlib.contextmanager
def py_spy(pid: int, output: str | None, *, rate: int = 200, gil: bool = True) -> Iterator[None]:
    """Record the stacks of process `pid` for the block into `output` (raw format; nothing when
    None). py-spy is on PyPI and needs ptrace; `gil` keeps only samples of the thread holding it."""
    if output is None:
        yield
        return
    profiler = subprocess.Popen(
        [
            *(str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(pid)),
            *("--rate", str(rate), "--nonblocking", *(["--gil"] if gil else [])),
            *("--format", "raw", "--output", output),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        profiler.send_signal(signal.SIGINT)
        profiler.wait(timeout=60)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 60) -> float:
    """Seconds until the port accepts a TCP connection (no HTTP request: nothing warms up)."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        if process.poll() is not None:
            raise SystemExit(f"daphne exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return time.perf_counter() - started
        time.sleep(0.02)
    raise SystemExit("daphne did not start")


def rounds_of(body: dict[str, Any]) -> int:
    """Discussion turns completed plus the vote round, when there was one."""
    voted = any(v.get("reason") != "sole proposal" for v in body.get("votes", []))
    return int(body["metadata"]["turns_completed"]) + (1 if voted else 0)


# --- the run ------------------------------------------------------------------------------


async def burst(
    client: Any, key: str, concurrency: int, latency: float, cpu_of: Any, turns: int
) -> dict[str, Any]:
    """`concurrency` POST /chat at once; wall/ideal ratios, errors, CPU of the web process."""
    ratios: list[float] = []
    walls: list[float] = []
    errors: dict[str, int] = {}
    rounds_seen: dict[int, int] = {}

    async def one(i: int) -> None:
        started = time.perf_counter()
        try:
            response = await client.post(
                "/chat",
                json={"message": f"{QUESTIONS[i % len(QUESTIONS)]} (#{i})", "num_agents": 3, "turns": turns},
                headers={"Authorization": f"Bearer {key}"},
            )
        except Exception as exc:  # a benchmark counts failures, it never crashes on them
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
            return
        wall = time.perf_counter() - started
        if response.status_code != 200:
            errors[str(response.status_code)] = errors.get(str(response.status_code), 0) + 1
            return
        body = response.json()
        # The agents hold different positions on purpose, so a vote may end without a majority:
        # `no_consensus` is a finished conversation, not an error.
        if body["metadata"]["status"] not in ("completed", "no_consensus") or body["failed_agents"]:
            failed = ",".join(sorted({str(f.get("error", ""))[:60] for f in body["failed_agents"]}))
            kind = f"incomplete: {body['metadata']['status']} {failed}".strip()
            errors[kind] = errors.get(kind, 0) + 1
        rounds = rounds_of(body)
        rounds_seen[rounds] = rounds_seen.get(rounds, 0) + 1
        walls.append(wall)
        ratios.append(wall / (rounds * latency))

    cpu0 = cpu_of()
    started = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(concurrency))), 300)
    wall = time.perf_counter() - started
    cpu = cpu_of() - cpu0
    return {
        "concurrency": concurrency,
        "latency_s": latency,
        "rounds": rounds_seen,
        "wall_s": round(wall, 2),
        "conversations_per_s": round(concurrency / wall, 1),
        "p50_s": round(percentile(walls, 50), 2),
        "p99_s": round(percentile(walls, 99), 2),
        "ratio_p50": round(percentile(ratios, 50), 2),
        "ratio_p99": round(percentile(ratios, 99), 2),
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "web_cpu_ms_per_conversation": round(cpu * 1000 / concurrency, 1),
    }


async def run(
    args: argparse.Namespace, base: str, webs: list[subprocess.Popen[bytes]], fake: str, startup: float
) -> None:
    import httpx
    import psutil

    from gateway.keys import key_create

    procs = [psutil.Process(web.pid) for web in webs]
    daphne = webs[0]

    def cpu_of() -> float:
        """User + system CPU seconds of the web processes, from the OS."""
        return float(sum(t.user + t.system for t in (proc.cpu_times() for proc in procs)))

    from asgiref.sync import sync_to_async

    issued = await sync_to_async(key_create)(
        name=f"load-{uuid.uuid4().hex[:6]}", permissions=["read", "write"]
    )
    key = issued.raw
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    results: dict[str, Any] = {
        "web_processes": len(webs),
        "startup_s": round(startup, 2),
        "loadavg_before": os.getloadavg()[0],
    }
    async with (
        httpx.AsyncClient(base_url=base, timeout=300, limits=limits) as client,
        httpx.AsyncClient(base_url=fake, timeout=10) as control,
    ):

        async def set_latency(seconds: float) -> None:
            (await control.post("/_bench/latency", params={"seconds": seconds})).raise_for_status()

        await set_latency(0.0)
        payload = {"message": QUESTIONS[0], "num_agents": 3, "turns": 1}
        headers = {"Authorization": f"Bearer {key}"}
        cpu0 = cpu_of()
        started = time.perf_counter()
        first = await client.post("/chat", json=payload, headers=headers)
        results["first_chat_ms"] = round((time.perf_counter() - started) * 1000, 1)
        results["first_chat_cpu_ms"] = round((cpu_of() - cpu0) * 1000, 1)
        results["first_chat_status"] = first.status_code
        warm: list[float] = []
        warm_cpu = cpu_of()
        with py_spy(daphne.pid, args.py_spy_warm):
            for i in range(args.warm):
                started = time.perf_counter()
                response = await client.post(
                    "/chat",
                    json={**payload, "message": f"{QUESTIONS[i % 5]} ({i})"},
                    headers=headers,
                )
                warm.append((time.perf_counter() - started) * 1000)
                if response.status_code != 200:
                    results.setdefault("warm_errors", []).append(response.status_code)
        results["warm_chat_ms_p50"] = round(statistics.median(warm), 1)
        results["warm_chat_ms_min"] = round(min(warm), 1)
        results["warm_chat_cpu_ms"] = round((cpu_of() - warm_cpu) * 1000 / args.warm, 1)
        await set_latency(args.latency)
        bursts = []
        # Busy samples of the web process during the bursts.
        with py_spy(daphne.pid, args.py_spy):
            for concurrency in args.concurrency:
                # New clients for each burst: httpx's pool, handed 100 requests at once over 100
                # connections kept from the burst before, answered them about twice as slowly
                # as over new ones (GET /health: p50 540 against 240 ms, the same web CPU per
                # request; aiohttp's pool did not), which inflated every later burst's p99.
                async with httpx.AsyncClient(base_url=base, timeout=300, limits=limits) as clients:
                    bursts.append(await burst(clients, key, concurrency, args.latency, cpu_of, args.turns))
                await asyncio.sleep(args.settle)  # let the last writes drain before the next burst
        results["bursts"] = bursts
    results["loadavg_after"] = os.getloadavg()[0]
    await sync_to_async(issued.key.delete)()
    print(json.dumps(results))
    print()
    print(
        f"{len(webs)} web process(es); startup (TCP accept) {results['startup_s']:.2f} s; "
        "machine load average "
        f"{results['loadavg_before']:.1f} before, {results['loadavg_after']:.1f} after (2 cores, shared)"
    )
    print(
        f"first /chat {results['first_chat_ms']} ms (CPU {results['first_chat_cpu_ms']} ms); "
        f"warm /chat at L=0, 3 agents x 1 turn: p50 {results['warm_chat_ms_p50']} ms, "
        f"min {results['warm_chat_ms_min']} ms, web CPU {results['warm_chat_cpu_ms']} ms each"
    )
    print(
        f"{'conc':>5} {'L s':>5} {'wall s':>7} {'conv/s':>7} {'p50 s':>6} {'p99 s':>6} "
        f"{'p50/ideal':>9} {'p99/ideal':>9} {'errors':>6} {'CPU ms/conv':>11}  rounds"
    )
    for b in bursts:
        print(
            f"{b['concurrency']:>5} {b['latency_s']:>5} {b['wall_s']:>7} {b['conversations_per_s']:>7} "
            f"{b['p50_s']:>6} {b['p99_s']:>6} {b['ratio_p50']:>9} {b['ratio_p99']:>9} "
            f"{b['errors']:>6} {b['web_cpu_ms_per_conversation']:>11}  {b['rounds']}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=1.0, help="seconds per LLM call under load")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[100, 200])
    parser.add_argument("--turns", type=int, default=2)
    parser.add_argument("--warm", type=int, default=20, help="sequential warm /chat requests at L = 0")
    parser.add_argument("--settle", type=float, default=3.0)
    add_server_option(parser)
    parser.add_argument(
        "--web-processes", type=int, default=1, help="web processes sharing one listening socket"
    )
    parser.add_argument(
        "--py-spy",
        metavar="FILE",
        help="record the (first) web process's stacks while it holds the GIL (raw format)",
    )
    parser.add_argument(
        "--py-spy-warm",
        metavar="FILE",
        help="the same, during the sequential warm /chat requests",
    )
    parser.add_argument("--serve-fake", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_fake:
        serve_fake()
        return

    bench_environment("load")
    if not os.environ.get("DATABASE_URL"):
        os.environ["DATABASE_URL"] = f"sqlite:///{tempfile.mkdtemp()}/load.sqlite3"

    try:
        with fake_gemini() as fake_url:
            os.environ["GEMINI_BASE_URL"] = fake_url

            import django

            django.setup()
            from django.conf import settings
            from django.core.management import call_command

            call_command("migrate", interactive=False, verbosity=0)
            print(
                f"database: {str(settings.DATABASES['default']['ENGINE']).rsplit('.', 1)[-1]}, "
                f"redis: {settings.REDIS_URL or 'none'}, "
                f"channel layer: {str(settings.CHANNEL_LAYERS['default']['BACKEND']).rsplit('.', 1)[-1]}, "
                f"fake Gemini: {fake_url}"
            )
            # The clients measure: a full collection of this process's heap would add its pause
            # to the latencies it reads, so the heap is settled as the service's processes settle
            # theirs (before the server starts, so its first request is timed as before).
            from streaming.worker import settle_heap

            settle_heap()
            webs, port = spawn_web(args.server, args.web_processes)
            try:
                startup = wait_for_port(port, webs[0])
                asyncio.run(run(args, f"http://127.0.0.1:{port}", webs, fake_url, startup))
            finally:
                stop(*webs)
    finally:
        clean_redis()


SERVERS = ("daphne", "uvicorn")


def spawn_web(server: str, processes: int = 1) -> tuple[list[subprocess.Popen[bytes]], int]:
    """Start the web process on a free port; with processes > 1, that many share one listening
    socket (`--fd`), bound here and inherited: the kernel spreads the accepts. It listens before
    they start, so a first request then times their start-up too. Returns them and the port."""
    listener: socket.socket | None = None
    if processes > 1:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(2048)
        port = int(listener.getsockname()[1])
        command = server_command(server, fd=listener.fileno())
    else:
        port = free_port()
        command = server_command(server, port)
    started = [
        subprocess.Popen(
            command,
            cwd=ROOT,
            env=dict(os.environ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            pass_fds=(listener.fileno(),) if listener is not None else (),
        )
        for _ in range(processes)
    ]
    if listener is not None:
        listener.close()  # the children hold it
    return started, port


def server_command(server: str, port: int | None = None, *, fd: int | None = None) -> list[str]:
    """The command that serves the application with this ASGI server on 127.0.0.1:port, or on
    the inherited listening socket `fd` (several processes behind one port)."""
    app = "polyagents_site.asgi:application"
    if server == "uvicorn":
        where = ["--fd", str(fd)] if fd is not None else ["--host", "127.0.0.1", "--port", str(port)]
        return [
            *(sys.executable, "-m", "uvicorn", app, *where),
            *("--loop", "uvloop", "--http", "httptools", "--ws", "websockets"),
            *("--lifespan", "off", "--no-access-log", "--log-level", "warning"),
        ]
    # An endpoint with the backlog the run commands give (-b/-p listen with 50).
    endpoint = f"tcp:port={port}:interface=127.0.0.1:backlog=2048"
    where = ["--fd", str(fd)] if fd is not None else ["-e", endpoint]
    return [sys.executable, "-m", "daphne", *where, app]


def follow_socket(base: str, conversation_id: str, token: str, after: int) -> Any:
    """A WebSocket client of a conversation's events after seq `after` (the API key as its
    subprotocol, as the dashboard sends it), for `async with`."""
    import websockets

    return websockets.connect(
        f"{base}/ws/{conversation_id}?after={after}",
        subprotocols=[websockets.Subprotocol(f"bearer.{token}")],
        open_timeout=30,
        max_queue=None,
    )


def add_server_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server",
        choices=SERVERS,
        default="daphne",
        help="the ASGI server of the web process (uvicorn: uvloop, httptools, websockets)",
    )


def clean_redis() -> None:
    """Delete this run's Redis keys (REDIS_KEY_PREFIX), never anyone else's."""
    from django.conf import settings

    if not settings.configured or not getattr(settings, "REDIS_URL", None):
        return
    import redis

    conn = redis.Redis.from_url(str(settings.REDIS_URL))
    keys = list(conn.scan_iter(match=f"{settings.REDIS_KEY_PREFIX}:*", count=1000))
    if keys:
        conn.delete(*keys)
    conn.close()


if __name__ == "__main__":
    main()
