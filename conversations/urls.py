"""Routes of the conversations app: POST /chat, reading past conversations, feedback on answers."""

from django.urls import URLPattern, URLResolver, path

from conversations import feedback, views

urlpatterns: list[URLPattern | URLResolver] = [
    path("chat", views.ChatView.as_view(), name="chat"),
    path("conversations/recent", views.RecentConversationsView.as_view(), name="conversations-recent"),
    path(
        "conversations/<str:conversation_id>/feedback",
        feedback.FeedbackView.as_view(),
        name="conversation-feedback",
    ),
    path(
        "conversations/<str:conversation_id>",
        views.ConversationDetailView.as_view(),
        name="conversation-detail",
    ),
]
