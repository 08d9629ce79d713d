"""ASGI entry point: HTTP through Django, WebSockets through Channels."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "polyagents_site.settings")
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402

from gateway.keys import load_default_keys_at_start  # noqa: E402
from streaming.routing import websocket_urlpatterns  # noqa: E402

# DEFAULT_API_KEYS take effect whenever a web process starts (make run, daphne, Docker),
# idempotently: several processes starting together load the same rows.
load_default_keys_at_start()

application = ProtocolTypeRouter(
    {
        "http": ASGIStaticFilesHandler(django_asgi_app),
        "websocket": URLRouter(websocket_urlpatterns),
    }
)
