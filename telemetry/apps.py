from django.apps import AppConfig


class TelemetryConfig(AppConfig):
    """Metric declarations and error records: every layer counts here; it imports nothing of ours."""

    name = "telemetry"
