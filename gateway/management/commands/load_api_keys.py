"""manage.py load_api_keys: load DEFAULT_API_KEYS idempotently."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand

from gateway.keys import keys_load_defaults


class Command(BaseCommand):
    help = "Create or update the keys of DEFAULT_API_KEYS (matched by name); re-running changes nothing."

    def handle(self, *args: Any, **options: Any) -> None:
        if not settings.CONFIG.DEFAULT_API_KEYS:
            self.stdout.write("DEFAULT_API_KEYS is empty: nothing to load.")
            return
        for name, action in keys_load_defaults():
            self.stdout.write(f"{name}: {action}")
