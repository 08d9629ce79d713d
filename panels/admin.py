"""Django admin: named panels (PANELS in settings holds the others)."""

from __future__ import annotations

from django.contrib import admin

from panels.models import Panel


@admin.register(Panel)
class PanelAdmin(admin.ModelAdmin):
    list_display = ("name", "description", "strategy", "turns", "enabled", "updated_at")
    list_filter = ("enabled", "strategy")
    search_fields = ("name", "description")
    filter_horizontal = ("api_keys",)
