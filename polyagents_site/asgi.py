"""ASGI entry point: HTTP through Django, WebSockets through Channels."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "polyagents_site.settings")
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.conf import settings  # noqa: E402
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402

from polyagents_site.warmup import awarm_up, schedule_on_server_loop, warm_up  # noqa: E402
from streaming.routing import websocket_urlpatterns  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": ASGIStaticFilesHandler(django_asgi_app),
        "websocket": URLRouter(websocket_urlpatterns),
    }
)

# Pay for imports, SDK clients, the database pool and the channel layer now, not on the first request.
if settings.CONFIG.WARM_UP:
    warm_up()
    schedule_on_server_loop(awarm_up)
