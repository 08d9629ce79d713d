"""Routes of history, search, cleanup and export (/conversations/*, /admin/cleanup, /admin/export)."""

from django.urls import URLPattern, URLResolver, path

from conversations import views_history as views

urlpatterns: list[URLPattern | URLResolver] = [
    path("conversations/recent", views.RecentConversationsView.as_view(), name="conversations-recent"),
    path("conversations/search", views.SearchConversationsView.as_view(), name="conversations-search"),
    path(
        "conversations/<str:conversation_id>",
        views.ConversationDetailView.as_view(),
        name="conversation-detail",
    ),
    path("admin/cleanup", views.CleanupView.as_view(), name="admin-cleanup"),
    path("admin/export", views.ExportView.as_view(), name="admin-export"),
]
