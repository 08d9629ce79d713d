"""manage.py create_api_key: create a key and print it once (or a demo key with --demo)."""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from gateway.keys import key_create, key_revoke
from gateway.models import ApiKey

DEMO_NAME = "demo"


class Command(BaseCommand):
    help = "Create an API key and print it once (only its SHA-256 hash is stored)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--name", help="A name for the key (required unless --demo).")
        parser.add_argument("--permissions", default="read", help="Comma-separated: read,write,admin.")
        parser.add_argument(
            "--rate-limit", type=int, dest="rate_limit", help="Requests per window, this key."
        )
        parser.add_argument(
            "--daily-quota",
            type=float,
            dest="daily_quota",
            help="Tokens (or USD with --quota-unit usd) this key may use per UTC day.",
        )
        parser.add_argument(
            "--quota-unit",
            choices=["tokens", "usd"],
            default="tokens",
            dest="quota_unit",
            help="Unit of --daily-quota (default tokens).",
        )
        parser.add_argument("--expires-days", type=int, dest="expires_days", help="Lifetime in days.")
        parser.add_argument(
            "--demo", action="store_true", help='A read,write key named "demo"; older demo keys are revoked.'
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["demo"]:
            self._demo()
            return
        name = (options["name"] or "").strip()
        if not name:
            raise CommandError("--name is required (or use --demo)")
        if options["rate_limit"] is not None and options["rate_limit"] <= 0:
            raise CommandError("--rate-limit must be a positive integer")
        quota = options["daily_quota"]
        if quota is not None and not (math.isfinite(quota) and 0 < quota <= 1e12):
            raise CommandError("--daily-quota must be a positive number")
        days = options["expires_days"]
        if days is not None and days <= 0:
            raise CommandError("--expires-days must be a positive integer")
        try:
            issued = key_create(
                name=name[:100],
                permissions=options["permissions"].split(","),
                rate_limit_override=options["rate_limit"],
                expires_at=timezone.now() + timedelta(days=days) if days else None,
                daily_quota=quota,
                daily_quota_unit=options["quota_unit"],
            )
        except ValueError as exc:
            raise CommandError(f"--permissions: {exc}") from None
        key = issued.key
        self.stdout.write(
            f"Created API key {key.name!r} (id {key.pk}, prefix {key.prefix}, "
            f"permissions {','.join(key.permissions)})."
        )
        if key.daily_quota is not None:
            self.stdout.write(f"Daily quota: {key.daily_quota:g} {key.daily_quota_unit} per UTC day.")
        self.stdout.write("Copy it now, it is not shown again:")
        self.stdout.write(issued.raw)

    def _demo(self) -> None:
        older = ApiKey.objects.filter(source=ApiKey.Source.DEMO, revoked_at__isnull=True)
        revoked = 0
        for key in older:
            key_revoke(key=key)
            revoked += 1
        issued = key_create(name=DEMO_NAME, permissions=["read", "write"], source=ApiKey.Source.DEMO)
        host = settings.CONFIG.API_HOST
        host = "localhost" if host in ("0.0.0.0", "::", "") else host  # noqa: S104
        base = f"http://{host}:{settings.CONFIG.API_PORT}"
        if revoked:
            self.stdout.write(f"Revoked {revoked} older demo key(s).")
        self.stdout.write(f"Demo API key (read,write), shown once: {issued.raw}")
        self.stdout.write("Try it:")
        self.stdout.write(
            f"  curl -s -X POST {base}/chat -H 'Authorization: Bearer {issued.raw}' "
            "-H 'Content-Type: application/json' -d '{\"message\": \"What is 2+2?\"}'"
        )
