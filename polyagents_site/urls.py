"""Root URL map. Paths follow the product brief exactly (no trailing slashes)."""

from django.contrib import admin
from django.urls import include, path, re_path
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView, SpectacularSwaggerView

from gateway.errors import not_found

urlpatterns = [
    path("django-admin/", admin.site.urls),
    path("", include("gateway.urls")),
    path("", include("archive.urls")),  # before conversations: conversations/search is not an id
    path("", include("conversations.urls")),
    path("", include("streaming.urls")),
    path("", include("openai_api.urls")),
    path("", include("monitoring.urls")),
    # API docs: OpenAPI schema, Swagger UI and ReDoc (assets served locally by the sidecar).
    path("schema", SpectacularAPIView.as_view(), name="schema"),
    path("docs", SpectacularSwaggerView.as_view(url_name="schema"), name="swagger-ui"),
    path(
        "redoc",
        SpectacularRedocView.as_view(url_name="schema", template_name="monitoring/redoc.html"),
        name="redoc",
    ),
]

# Last route: any other path answers a JSON 404, in DEBUG too (the admin keeps its own pages).
urlpatterns.append(re_path(r"^(?!django-admin(?:/|$)).*$", not_found))

# Unknown paths and unexpected errors answer JSON too, never an HTML page.
handler400 = "gateway.errors.handler400"
handler403 = "gateway.errors.handler403"
handler404 = "gateway.errors.handler404"
handler500 = "gateway.errors.handler500"
