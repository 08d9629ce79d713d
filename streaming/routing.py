"""WebSocket routes."""

from django.urls import URLPattern, path

from streaming.consumers import ConversationConsumer

websocket_urlpatterns: list[URLPattern] = [
    path("ws/<str:conversation_id>", ConversationConsumer.as_asgi()),
]
