from django.apps import AppConfig


class GatewayConfig(AppConfig):
    name = "gateway"
    verbose_name = "Gateway: keys, limits, security"

    def ready(self) -> None:
        from gateway import openapi  # noqa: F401  (registers the schema extensions with drf-spectacular)
