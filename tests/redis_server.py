"""A private redis-server a test owns: killed and started again at will, never the shared one."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import redis


class RedisServer:
    """redis-server on `host`:`port`, without persistence (a restart loses every key, as an
    operator's `docker restart` of a cache-only Redis does). `prefix` runs it elsewhere, e.g.
    inside a network namespace (`ip netns exec db`); its unix socket `unixsocket` then lets a
    process outside that namespace check it."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        log: Path,
        prefix: Sequence[str] = (),
        unixsocket: Path | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.log = log
        self.prefix = list(prefix)
        self.unixsocket = unixsocket
        self.popen: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed"
        args = [
            *self.prefix,
            binary,
            *("--bind", self.host, "--port", str(self.port)),
            *("--save", "", "--appendonly", "no", "--protected-mode", "no"),
            *("--daemonize", "no", "--logfile", str(self.log)),
            *(("--unixsocket", str(self.unixsocket)) if self.unixsocket else ()),
        ]
        self.popen = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                with self.client() as client:
                    client.ping()
                return
            except redis.ConnectionError:
                if self.popen.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"redis-server did not start: {self.log.read_text(errors='replace')}"
                    ) from None
                time.sleep(0.05)

    def client(self) -> redis.Redis:
        if self.unixsocket is not None:
            return redis.Redis(unix_socket_path=str(self.unixsocket), socket_connect_timeout=1)
        return redis.Redis(host=self.host, port=self.port, socket_connect_timeout=1)

    def kill(self) -> None:
        """SIGKILL: connections are cut without a goodbye, as when a container is killed."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(timeout=10)

    def restart(self, down_seconds: float = 0.0) -> None:
        self.kill()
        time.sleep(down_seconds)
        self.start()

    def stop(self) -> None:
        self.kill()
        self.popen = None
