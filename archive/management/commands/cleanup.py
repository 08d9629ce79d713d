"""Delete conversations older than --days (with their Redis streams and Qdrant points)."""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from archive.retention import MAX_DAYS, cleanup


class Command(BaseCommand):
    help = "Delete conversations older than --days days; --dry-run only counts them."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--days", type=int, default=None, help="default: RETENTION_DAYS")
        parser.add_argument("--dry-run", action="store_true")

    def handle(self, *args: Any, **options: Any) -> None:
        from django.conf import settings

        days = options["days"] if options["days"] is not None else settings.CONFIG.RETENTION_DAYS
        if not 1 <= days <= MAX_DAYS:
            raise CommandError(f"--days must be between 1 and {MAX_DAYS}")
        result = cleanup(days=days, dry_run=options["dry_run"])
        self.stdout.write(json.dumps(result, indent=2))
