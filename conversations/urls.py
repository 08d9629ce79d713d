"""Routes of the conversations app; each feature keeps its own route module."""

from conversations import urls_chat, urls_history, urls_stream

# urls_chat: POST /chat. urls_stream: POST /stream/{id}, dashboard.
# urls_history: /conversations/*, /admin/cleanup, /admin/export.
urlpatterns = urls_chat.urlpatterns + urls_stream.urlpatterns + urls_history.urlpatterns
