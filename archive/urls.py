"""Routes of the archive: search, and the admin cleanup and export endpoints.

Included before `conversations.urls`, so `conversations/search` is not taken for a conversation id.
"""

from django.urls import URLPattern, URLResolver, path

from archive import views

urlpatterns: list[URLPattern | URLResolver] = [
    path("conversations/search", views.SearchConversationsView.as_view(), name="conversations-search"),
    path("admin/cleanup", views.CleanupView.as_view(), name="admin-cleanup"),
    path("admin/export", views.ExportView.as_view(), name="admin-export"),
]
