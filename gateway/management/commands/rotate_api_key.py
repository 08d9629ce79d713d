"""manage.py rotate_api_key <prefix-or-id>: issue a replacement, the old key works for a grace period."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from gateway.keys import key_find, key_rotate
from gateway.models import ApiKey
from gateway.security import log_security_event


class Command(BaseCommand):
    help = "Rotate an API key: print the new key once; the old one keeps working for the grace period."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("key", help="The key's id or prefix (as listed).")
        parser.add_argument(
            "--grace", type=int, help="Seconds the old key keeps working (default API_KEY_ROTATION_GRACE)."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["grace"] is not None and options["grace"] < 0:
            raise CommandError("--grace must be zero or more seconds")
        try:
            old = key_find(options["key"])
            issued = key_rotate(key=old, grace_seconds=options["grace"])
        except (ApiKey.DoesNotExist, ValueError) as exc:
            raise CommandError(str(exc)) from None
        log_security_event("key_rotated", ip=None, path="", api_key=old, new_key=issued.key.pk, by="command")
        until = f"{old.expires_at:%Y-%m-%d %H:%M:%S} UTC" if old.expires_at else "-"
        self.stdout.write(f"Rotated API key {old} (id {old.pk}); it keeps working until {until}.")
        self.stdout.write(f"New key (id {issued.key.pk}), shown once:")
        self.stdout.write(issued.raw)
