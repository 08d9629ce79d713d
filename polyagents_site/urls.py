"""Root URL map. Paths follow the product brief exactly (no trailing slashes)."""

from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("django-admin/", admin.site.urls),
    path("", include("gateway.urls")),
    path("", include("conversations.urls")),
    path("", include("monitoring.urls")),
]
