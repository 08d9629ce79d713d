"""What the SDK clients of each running event loop (`loopstate.PerLoop`) share.

httpx async clients (used by google-genai and openai) hold connections bound to the
loop that opened them; a cached provider reused from another loop (`manage.py chat`,
`async_to_sync` in a worker thread, each test's loop) would fail on a dead loop.
"""

from __future__ import annotations

import functools
import os
import ssl
from typing import Any

# An idle connection to a vendor is kept this long for the next call.
KEEPALIVE_SECONDS = 30


@functools.cache
def tls_context() -> ssl.SSLContext:
    """The process's one verifying TLS context, shared by every SDK client and transport.

    The CA bundle is the one the SDKs would load (SSL_CERT_FILE or certifi's, and
    SSL_CERT_DIR); loading it takes about 50 ms, google-genai would load it twice for each
    client it builds (once per event loop), and the aiohttp transport once more.
    """
    import certifi

    return ssl.create_default_context(
        cafile=os.environ.get("SSL_CERT_FILE", certifi.where()), capath=os.environ.get("SSL_CERT_DIR")
    )


def aiohttp_transport() -> Any:
    """An httpx client whose connection pool is aiohttp's (httpx-aiohttp), for the SDKs' async calls.

    Both SDKs keep their httpx code paths (timeouts, exceptions); aiohttp's connector costs far
    less CPU than httpcore's pool under hundreds of concurrent calls (docs/scaling.md). One per
    event loop, like the SDK clients holding it (a session is bound to its loop).

    No connection cap: a process runs as many calls at once as it has conversations in flight.
    The session is built here because httpx-aiohttp 0.2 leaves aiohttp's default cap of 100
    connections in place when httpx's `max_connections` is None: 100 concurrent /chat
    conversations (300 calls at once) then ran each round in three waves.
    """
    import aiohttp
    from httpx_aiohttp import AiohttpTransport, HttpxAiohttpClient

    context = tls_context()

    def session() -> aiohttp.ClientSession:  # called on the first request, inside the loop
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_SECONDS, ssl=context)
        return aiohttp.ClientSession(connector=connector)

    return HttpxAiohttpClient(transport=AiohttpTransport(verify=context, client=session))


def refused(exc: BaseException) -> bool:
    """Whether the cause chain holds a connection that failed at once (refused, unreachable).

    httpx-aiohttp 0.2 reports such a failure as `httpx.ConnectTimeout` (and the openai SDK then
    as `APITimeoutError`): it is a connection error, not a timeout.
    """
    import aiohttp

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, aiohttp.ClientConnectorError) and not isinstance(seen, TimeoutError):
            return True
        seen = seen.__cause__
    return False
