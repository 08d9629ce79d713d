"""Root URL map. Paths follow the product brief exactly (no trailing slashes)."""

from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("django-admin/", admin.site.urls),
    path("", include("gateway.urls")),
    path("", include("conversations.urls")),
    path("", include("monitoring.urls")),
]

# Unknown paths and unexpected errors answer JSON too, never an HTML page.
handler400 = "gateway.errors.handler400"
handler403 = "gateway.errors.handler403"
handler404 = "gateway.errors.handler404"
handler500 = "gateway.errors.handler500"
