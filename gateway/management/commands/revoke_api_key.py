"""manage.py revoke_api_key <prefix-or-id>: revoke a key at once."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from gateway.keys import key_find, key_revoke
from gateway.models import ApiKey
from gateway.security import log_security_event


class Command(BaseCommand):
    help = "Revoke an API key, given its id or its prefix."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("key", help="The key's id or prefix (as listed).")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            key = key_find(options["key"])
        except (ApiKey.DoesNotExist, ValueError) as exc:
            raise CommandError(str(exc)) from None
        if key.revoked_at is not None:
            self.stdout.write(f"API key {key} was already revoked at {key.revoked_at:%Y-%m-%d %H:%M:%S}.")
            return
        key_revoke(key=key)
        log_security_event("key_revoked", ip=None, path="", api_key=key, by="command")
        self.stdout.write(f"Revoked API key {key} (id {key.pk}).")
