"""ASGI entry point: HTTP through Django, WebSockets through Channels."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "polyagents_site.settings")
django_asgi_app = get_asgi_application()

from collections.abc import MutableMapping  # noqa: E402
from typing import Any  # noqa: E402

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.conf import settings  # noqa: E402
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402

from gateway.keys import load_default_keys_at_start  # noqa: E402
from mcp_server.asgi import PATH as MCP_PATH  # noqa: E402
from mcp_server.asgi import mcp_application  # noqa: E402
from polyagents_site.warmup import awarm_up, run_on_server_loop, warm_up  # noqa: E402
from streaming.jobs import start_in_process_sweeper  # noqa: E402
from streaming.routing import websocket_urlpatterns  # noqa: E402

# DEFAULT_API_KEYS take effect whenever a web process starts (make run, daphne, Docker),
# idempotently: several processes starting together load the same rows.
load_default_keys_at_start()

router = ProtocolTypeRouter(
    {
        "http": ASGIStaticFilesHandler(django_asgi_app),
        "websocket": URLRouter(websocket_urlpatterns),
    }
)

# Pay for imports, SDK clients, the database pool and the channel layer now, not on the first request.
if settings.CONFIG.WARM_UP:
    warm_up()
    run_on_server_loop(awarm_up)


async def application(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
    # Embedded defaults: the first request starts resuming the runs a previous process left.
    start_in_process_sweeper()
    if scope["type"] == "http" and scope["path"].rstrip("/") == MCP_PATH:
        await mcp_application(scope, receive, send)  # MCP streamable HTTP (mcp_server/asgi.py)
        return
    await router(scope, receive, send)
