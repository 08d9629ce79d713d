"""Hosts for tests/test_hosts.py: one network namespace per host, joined by a bridge.

Every host has a veth into a `switch` namespace holding the bridge: nothing of it lives in
the machine's own namespace, and no traffic leaves the namespaces made here (10.77.0.0/24).
The test (outside them) reaches the web hosts, PostgreSQL and Redis through their unix
sockets, like an operator's console; the hosts reach each other only over the network, so a
host can be killed or cut off (its veth down) mid-run.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import websockets

from tests.redis_server import RedisServer
from tests.test_recovery import TERMINAL, Rows, _postgres_bin, wait_for
from tests.test_stream_live import FINAL, PYTHON, Process, live_env

NET = "10.77.0"
ADDRESSES = {"db": 2, "web1": 11, "web2": 12, "work1": 21, "work2": 22}
REDIS_PORT = 6379
WEB_PORT = 8000
SOCKET_DIR = Path("/var/run/postgresql")


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(args), capture_output=True, text=True, timeout=60)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {done.stderr.strip()}")
    return done


class Network:
    """Namespaces `<tag>-<host>` and `<tag>-switch`, each host's `eth0` bridged in the switch."""

    def __init__(self) -> None:
        self.tag = f"pa{uuid.uuid4().hex[:6]}"
        self.made: list[str] = []

    def ns(self, host: str) -> str:
        return f"{self.tag}-{host}"

    def address(self, host: str) -> str:
        return f"{NET}.{ADDRESSES[host]}"

    def exec(self, host: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns(host)]

    def build(self) -> None:
        switch = self.ns("switch")
        self._add(switch)
        sh("ip", "-n", switch, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", switch, "link", "set", "br0", "up")
        for host in ADDRESSES:
            ns = self.ns(host)
            self._add(ns)
            port = f"p-{host}"
            sh("ip", "-n", switch, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "-n", switch, "link", "set", port, "master", "br0", "up")
            sh("ip", "-n", ns, "addr", "add", f"{self.address(host)}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")

    def _add(self, ns: str) -> None:
        sh("ip", "netns", "add", ns)
        self.made.append(ns)

    def link(self, host: str, up: bool) -> None:
        sh("ip", "-n", self.ns(host), "link", "set", "eth0", "up" if up else "down")

    def teardown(self) -> None:
        for ns in reversed(self.made):
            # Whatever still runs in a namespace made here was started here: end it by its id.
            for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
                with suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            sh("ip", "netns", "del", ns, check=False)
        self.made = []


def skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs as root)"
    for tool in ("ip", "pg_createcluster", "pg_ctlcluster", "redis-server"):
        if shutil.which(tool) is None:
            return f"needs `{tool}`"
    if _postgres_bin() is None:
        return "needs PostgreSQL's binaries"
    probe = f"paprobe{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=30)
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=30)
    if made.returncode != 0:
        return f"cannot make a network namespace here: {made.stderr.strip()}"
    return None


class Postgres:
    """A private cluster whose postmaster runs in the db namespace, on its address only."""

    def __init__(self, net: Network, version: str) -> None:
        self.net = net
        self.version = version
        self.name = f"polyagents_hosts_{uuid.uuid4().hex[:8]}"
        self.ctl = [*net.exec("db"), "pg_ctlcluster", "--skip-systemctl-redirect", version, self.name]

    def create(self) -> None:
        sh(
            *("pg_createcluster", self.version, self.name, "--port", str(self._port())),
            *("--", "--auth-host=trust", "--auth-local=trust"),
        )
        config = Path(f"/etc/postgresql/{self.version}/{self.name}")
        with (config / "postgresql.conf").open("a") as conf:
            conf.write(f"listen_addresses = '{self.net.address('db')}'\n")
        with (config / "pg_hba.conf").open("a") as hba:
            hba.write(f"host all all {NET}.0/24 trust\n")
        sh(*self.ctl, "start")

    def _port(self) -> int:
        # The unix socket's name carries the port: one the machine's servers do not use.
        port = 45000 + int(uuid.uuid4().int % 5000)
        while (SOCKET_DIR / f".s.PGSQL.{port}").exists():
            port += 1
        self.port = port
        return port

    def restart(self) -> None:
        sh(*self.ctl, "restart", "-m", "fast")

    def drop(self) -> None:
        sh(*self.ctl, "stop", "-m", "immediate", check=False)
        sh("pg_dropcluster", self.version, self.name, check=False)

    @property
    def local(self) -> str:
        """Its unix socket, for this test (outside the namespaces)."""
        return f"host={SOCKET_DIR} port={self.port} dbname=polyagents user=postgres"

    @property
    def url(self) -> str:
        """Its network address, for the hosts."""
        return f"postgresql://postgres@{self.net.address('db')}:{self.port}/polyagents"


@dataclass
class Hosts:
    net: Network
    postgres: Postgres
    redis: RedisServer
    env: dict[str, str]
    raw: str
    rows: Rows
    log_dir: Path
    webs: dict[str, Process] = field(default_factory=dict)
    workers: dict[str, Process] = field(default_factory=dict)
    # Scenario 3's run, when the cut-off worker's link came back (database clock), that worker.
    cut_off: tuple[str, Any, str] | None = None

    def socket(self, web: str) -> Path:
        return self.log_dir / f"{web}.sock"

    def start_web(self, web: str) -> None:
        self.socket(web).unlink(missing_ok=True)
        args = [
            *self.net.exec(web),
            *(PYTHON, "-m", "daphne", "-b", self.net.address(web), "-p", str(WEB_PORT)),
            *("-u", str(self.socket(web)), "polyagents_site.asgi:application"),
        ]
        self.webs[web] = process = Process(args, self.env, self.log_dir / f"{web}.log")
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if process.popen.poll() is not None:
                raise RuntimeError(f"{web} exited:\n{process.output()}")
            with suppress(httpx.HTTPError):
                transport = httpx.HTTPTransport(uds=str(self.socket(web)))
                with httpx.Client(transport=transport, timeout=2) as client:
                    if client.get(f"http://{web}/").status_code == 200:
                        return
            time.sleep(0.3)
        raise RuntimeError(f"{web} did not start:\n{process.output()}")

    def start_worker(self, name: str) -> None:
        args = [*self.net.exec(name), PYTHON, "manage.py", "worker", "--concurrency", "2"]
        self.workers[name] = Process(args, self.env, self.log_dir / f"{name}.log")
        deadline = time.monotonic() + 90
        while not self.beating(name):
            if time.monotonic() > deadline or self.workers[name].popen.poll() is not None:
                raise RuntimeError(f"{name} did not register:\n{self.workers[name].output()}")
            time.sleep(0.3)

    def running_on(self, conversation_id: str) -> str | None:
        """The worker host whose job runs this conversation now."""
        rows = self.rows.query(
            "SELECT host(a.addr) FROM procrastinate_jobs j JOIN hosts_audit a"
            " ON a.tbl = 'procrastinate_workers' AND a.conversation = j.worker_id::text"
            " WHERE j.lock = %s AND j.status = 'doing'",
            f"conversation:{conversation_id}",
        )
        by_address = {self.net.address(host): host for host in ADDRESSES}
        return by_address.get(rows[0][0]) if rows else None

    def beating(self, worker: str) -> bool:
        """Whether a worker registered from that host beat its heartbeat in the last 3 s."""
        return bool(
            self.rows.query(
                "SELECT 1 FROM procrastinate_workers w JOIN hosts_audit a"
                " ON a.tbl = 'procrastinate_workers' AND a.conversation = w.id::text"
                " WHERE host(a.addr) = %s AND w.last_heartbeat > NOW() - interval '3 seconds'",
                self.net.address(worker),
            )
        )

    def stop(self) -> None:
        for process in [*self.webs.values(), *self.workers.values()]:
            process.kill(signal.SIGKILL)


def _manage(hosts_env: dict[str, str], net: Network, *args: str) -> str:
    done = subprocess.run(
        [*net.exec("db"), PYTHON, "manage.py", *args],
        capture_output=True,
        text=True,
        timeout=180,
        env=hosts_env,
    )
    assert done.returncode == 0, f"{args}: {done.stdout}\n{done.stderr}"
    return done.stdout


def _wait_for_postgres(postgres: Postgres) -> None:
    import psycopg

    deadline = time.monotonic() + 60
    while True:
        try:
            with psycopg.connect(postgres.local.replace("polyagents", "postgres"), autocommit=True) as conn:
                conn.execute("CREATE DATABASE polyagents")
                return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


# Which host wrote which row of a conversation: a trigger records the client address of every
# write to its rows (the test's instrument, in this private cluster only).
AUDIT = """
CREATE TABLE hosts_audit (
    at timestamptz NOT NULL DEFAULT clock_timestamp(),
    addr inet DEFAULT inet_client_addr(),
    tbl text NOT NULL,
    op text NOT NULL,
    conversation text
);
CREATE FUNCTION hosts_audit() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    j jsonb := to_jsonb(CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END);
BEGIN
    INSERT INTO hosts_audit (tbl, op, conversation) VALUES (
        TG_TABLE_NAME, TG_OP,
        COALESCE(j->>'conversation_id', replace(j->>'lock', 'conversation:', ''), j->>'id'));
    RETURN NULL;
END $$;
"""
AUDITED = ("conversations_event", "conversations_message", "conversations_conversation", "procrastinate_jobs")


def _audit_writes(postgres: Postgres) -> None:
    import psycopg

    with psycopg.connect(postgres.local, autocommit=True) as conn:
        conn.execute(AUDIT)
        for table in AUDITED:
            conn.execute(
                f"CREATE TRIGGER hosts_audit AFTER INSERT OR UPDATE OR DELETE ON {table}"
                " FOR EACH ROW EXECUTE FUNCTION hosts_audit()"
            )
        # And which host registered each worker id (a worker registers again after an outage).
        conn.execute(
            "CREATE TRIGGER hosts_audit AFTER INSERT ON procrastinate_workers"
            " FOR EACH ROW EXECUTE FUNCTION hosts_audit()"
        )


# --- clients, through the web hosts' unix sockets -----------------------------------------------


async def start_stream(hosts: Hosts, web: str, **body: Any) -> str:
    conversation_id = str(uuid.uuid4())
    transport = httpx.AsyncHTTPTransport(uds=str(hosts.socket(web)))
    async with httpx.AsyncClient(transport=transport, base_url=f"http://{web}", timeout=20) as client:
        response = await client.post(
            f"/stream/{conversation_id}",
            json={"message": "Is a hot dog a sandwich?", **body},  # a panel that does not agree at once
            headers={"Authorization": f"Bearer {hosts.raw}"},
        )
    assert response.status_code == 202, response.text
    return conversation_id


class Client:
    """A WebSocket follower of one conversation that, like the dashboard, reconnects with
    after=<last seq> when its connection ends before the final event: to the next web host in
    `webs` whose socket answers (a bounded number of connections)."""

    def __init__(self, hosts: Hosts, conversation_id: str, webs: list[str]) -> None:
        self.hosts = hosts
        self.conversation_id = conversation_id
        self.webs = webs
        self.events: list[dict[str, Any]] = []
        self.connections: list[tuple[str, int]] = []  # (web host, after)
        self.arrived: list[float] = []
        self.delays: list[float] = []  # from emit to arrival, seconds (one machine, one clock)

    async def run(self, timeout: float = 120) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        for index in range(12):
            web = self.webs[index % len(self.webs)]
            after = self.events[-1]["seq"] if self.events else 0
            self.connections.append((web, after))
            if await self._follow(web, after, deadline):
                return self.events
            await asyncio.sleep(0.3)
        raise AssertionError(f"no final event; connections {self.connections}")

    async def _follow(self, web: str, after: int, deadline: float) -> bool:
        uri = f"ws://{web}/ws/{self.conversation_id}?after={after}"
        protocols = [websockets.Subprotocol(f"bearer.{self.hosts.raw}")]
        try:
            async with websockets.unix_connect(
                str(self.hosts.socket(web)), uri, subprotocols=protocols, open_timeout=10
            ) as ws:
                while True:
                    left = deadline - time.monotonic()
                    assert left > 0, f"timed out with {len(self.events)} events"
                    event = json.loads(await asyncio.wait_for(ws.recv(), timeout=left))
                    self.events.append(event)
                    self.arrived.append(time.monotonic())
                    self.delays.append(time.time() - float(event.get("emitted_at", time.time())))
                    if event["type"] in FINAL:
                        return True
        except (websockets.ConnectionClosed, websockets.InvalidStatus, OSError):
            return False


def once_in_order(events: list[dict[str, Any]], stored: list[dict[str, Any]]) -> None:
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events == stored


async def finished(hosts: Hosts, conversation_id: str, timeout: float = 120) -> float:
    return await wait_for(
        lambda: hosts.rows.status(conversation_id) in TERMINAL, timeout, f"{conversation_id} to finish"
    )


@contextmanager
def hosts_up(log_dir: Path) -> Iterator[Hosts]:
    """db, web1, web2, work1 and work2 running; everything torn down on the way out, even on failure."""
    net = Network()
    bin_dir = _postgres_bin()
    assert bin_dir is not None
    postgres = Postgres(net, bin_dir.parent.name)
    redis = RedisServer(
        host=net.address("db"),
        port=REDIS_PORT,
        log=log_dir / "redis.log",
        prefix=net.exec("db"),
        unixsocket=log_dir / "redis.sock",
    )
    started: Hosts | None = None
    try:
        net.build()
        postgres.create()
        redis.start()
        env = live_env(
            DATABASE_URL=postgres.url,
            REDIS_URL=f"redis://{net.address('db')}:{REDIS_PORT}/0",
            SIMULATED_LATENCY="2.0",  # a turn lasts long enough to be cut
            CONVERSATION_STALE_SECONDS="10",
        )
        _wait_for_postgres(postgres)
        _manage(env, net, "migrate", "--noinput", "-v", "0")
        _audit_writes(postgres)
        out = _manage(env, net, "create_api_key", "--name", "hosts", "--permissions", "read,write")
        started = Hosts(
            net, postgres, redis, env, out.strip().splitlines()[-1].strip(), Rows(postgres.local), log_dir
        )
        with ThreadPoolExecutor(2) as pool:
            webs = [pool.submit(started.start_web, web) for web in ("web1", "web2")]
            for name in ("work1", "work2"):
                started.start_worker(name)
            for web in webs:
                web.result()
        yield started
    finally:
        if started is not None:
            started.stop()
        redis.stop()
        postgres.drop()
        net.teardown()
