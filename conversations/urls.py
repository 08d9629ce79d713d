"""Routes of the conversations app: POST /chat and reading past conversations."""

from django.urls import URLPattern, URLResolver, path

from conversations import views

urlpatterns: list[URLPattern | URLResolver] = [
    path("chat", views.ChatView.as_view(), name="chat"),
    path("conversations/recent", views.RecentConversationsView.as_view(), name="conversations-recent"),
    path(
        "conversations/<str:conversation_id>",
        views.ConversationDetailView.as_view(),
        name="conversation-detail",
    ),
]
