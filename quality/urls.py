"""Routes of the quality app: POST /conversations/{id}/feedback."""

from django.urls import URLPattern, URLResolver, path

from quality.views import FeedbackView

urlpatterns: list[URLPattern | URLResolver] = [
    path(
        "conversations/<str:conversation_id>/feedback", FeedbackView.as_view(), name="conversation-feedback"
    ),
]
