from django.contrib import admin

from telemetry.models import ErrorRecord


@admin.register(ErrorRecord)
class ErrorRecordAdmin(admin.ModelAdmin):
    list_display = ("kind", "message", "count", "first_seen", "last_seen")
    list_filter = ("kind",)
    search_fields = ("message", "fingerprint")
    readonly_fields = ("kind", "fingerprint", "message", "context", "count", "first_seen", "last_seen")
