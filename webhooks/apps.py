from django.apps import AppConfig


class WebhooksConfig(AppConfig):
    """Signed deliveries of a /stream run's events (Standard Webhooks), as procrastinate jobs."""

    name = "webhooks"

    def ready(self) -> None:
        from conversations.signals import agent_turn, run_finished
        from gateway.signals import default_keys_loaded
        from webhooks.keys import on_default_keys_loaded
        from webhooks.services import on_agent_turn, on_run_finished

        run_finished.connect(on_run_finished, dispatch_uid="webhooks.run_finished")
        agent_turn.connect(on_agent_turn, dispatch_uid="webhooks.agent_turn")
        default_keys_loaded.connect(on_default_keys_loaded, dispatch_uid="webhooks.default_keys")
