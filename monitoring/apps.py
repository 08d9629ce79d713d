from django.apps import AppConfig


class MonitoringConfig(AppConfig):
    name = "monitoring"

    def ready(self) -> None:
        """Register our component checks with django-health-check's plugin registry."""
        from health_check.plugins import plugin_dir

        from monitoring import openapi  # noqa: F401  (registers the Bearer scheme with drf-spectacular)
        from monitoring.checks import OUR_CHECKS

        registered = {cls for cls, _ in plugin_dir._registry}
        for check in OUR_CHECKS:
            if check not in registered:
                plugin_dir.register(check)
