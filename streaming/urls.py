"""POST /stream/{conversation_id} and the browser dashboard at GET /."""

from django.urls import URLPattern, URLResolver, path
from django.views.generic import TemplateView

from streaming.views import StreamView

urlpatterns: list[URLPattern | URLResolver] = [
    path("stream/<str:conversation_id>", StreamView.as_view(), name="stream"),
    path("", TemplateView.as_view(template_name="dashboard.html"), name="dashboard"),
]
