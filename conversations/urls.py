"""Routes of the conversations app. Each feature keeps its own route list."""

from django.urls import URLPattern, URLResolver

# POST /chat
chat_urlpatterns: list[URLPattern | URLResolver] = []
# POST /stream/{id} and the dashboard
stream_urlpatterns: list[URLPattern | URLResolver] = []
# /conversations/*, /admin/cleanup, /admin/export
history_urlpatterns: list[URLPattern | URLResolver] = []

urlpatterns = chat_urlpatterns + stream_urlpatterns + history_urlpatterns
