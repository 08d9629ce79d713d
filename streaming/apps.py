from django.apps import AppConfig


class StreamingConfig(AppConfig):
    """Live streaming: the WebSocket consumer, POST /stream, background runs and the dashboard."""

    name = "streaming"
