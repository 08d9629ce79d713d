"""A tiny threaded HTTP server on 127.0.0.1 that fake vendors build on.

Each fake subclasses `FakeVendor`, implements `handle(request) -> Response`, and is
used as a context manager: `with FakeGemini() as fake: ... fake.base_url ...`.
Requests are recorded so tests can assert what the real SDK sent.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the fake received it."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-cased names
    body: Any  # parsed JSON, or None


@dataclass
class Response:
    """What the fake answers: a JSON body, or SSE events sent one by one."""

    status: int = 200
    body: Any = None
    events: list[Any] | None = None  # SSE `data:` payloads (dicts are JSON-encoded)
    delay: float = 0.0  # seconds before the status line
    event_delay: float = 0.0  # seconds between SSE events
    headers: dict[str, str] = field(default_factory=dict)


class _Server(ThreadingHTTPServer):
    # A vendor accepts a burst of connections; the socketserver default queue of 5 made the
    # kernel drop the SYNs of hundreds of simultaneous calls, each retried a second later.
    request_queue_size = 1024


class FakeVendor:
    """Base class: starts a real HTTP server on a free port, records requests."""

    def __init__(self) -> None:
        self.requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- to implement -------------------------------------------------------
    def handle(self, request: RecordedRequest) -> Response:
        """Answer one request."""
        raise NotImplementedError

    # -- lifecycle -----------------------------------------------------------
    @property
    def base_url(self) -> str:
        """http://127.0.0.1:<port> of the running server."""
        assert self._server is not None, "server not started"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> None:
        """Listen on a free port in a background thread."""
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, like the real vendors
            # TCP_NODELAY, as the vendors' front ends: with Nagle on, a body written after its
            # headers waits for the client's delayed ACK (~40 ms on Linux) on a kept-alive socket.
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                return

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = raw.decode(errors="replace")
                split = urlsplit(self.path)
                recorded = RecordedRequest(
                    method=self.command,
                    path=split.path,
                    query=parse_qs(split.query),
                    headers={k.lower(): v for k, v in self.headers.items()},
                    body=body,
                )
                with fake._lock:
                    fake.requests.append(recorded)
                response = fake.handle(recorded)
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    fake._write(self, response)  # the client may have given up (a timeout test)

            do_GET = _serve
            do_POST = _serve

        self._server = _Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._server.block_on_close = False
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop listening (slow handlers still sleeping are abandoned)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeVendor:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @staticmethod
    def _write(handler: BaseHTTPRequestHandler, response: Response) -> None:
        if response.delay:
            time.sleep(response.delay)
        handler.send_response(response.status)
        for name, value in response.headers.items():
            handler.send_header(name, value)
        if response.events is not None:
            handler.send_header("Content-Type", "text/event-stream")
            # As the vendors stream over HTTP/1.1: in chunks, the connection kept for the next
            # call. (Ending the body by closing the connection made every streamed call open a
            # new one, about 60 % of a streamed call's CPU in the SDK's transport.)
            handler.send_header("Transfer-Encoding", "chunked")
            handler.end_headers()
            for i, event in enumerate(response.events):
                if i and response.event_delay:
                    time.sleep(response.event_delay)
                payload = event if isinstance(event, str) else json.dumps(event)
                data = f"data: {payload}\n\n".encode()
                handler.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                handler.wfile.flush()
            handler.wfile.write(b"0\r\n\r\n")
            return
        data = json.dumps(response.body if response.body is not None else {}).encode()
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)


def structured_default(schema: Any, *, answer: str, position: str, confidence: float) -> str:
    """A JSON reply that fits a requested schema: answers, restated positions, ballots (first label)."""
    properties = schema.get("properties") if isinstance(schema, dict) else None
    if not isinstance(properties, dict):
        return json.dumps({"answer": answer, "position": position, "confidence": confidence})
    reply: dict[str, Any] = {}
    for name, spec in properties.items():
        if name == "answer":
            reply[name] = answer
        elif name == "position":
            reply[name] = position
        elif name == "confidence":
            reply[name] = confidence
        elif isinstance(spec, dict) and spec.get("enum"):
            reply[name] = spec["enum"][0]
        else:
            reply[name] = "It is the best supported proposal."
    return json.dumps(reply)


def split_text(text: str, parts: int = 3) -> Iterator[str]:
    """Cut a text into `parts` roughly equal pieces (for streamed answers)."""
    size = max(1, -(-len(text) // parts))
    for start in range(0, len(text), size):
        yield text[start : start + size]
