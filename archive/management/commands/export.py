"""Export conversations of the last --days days as json, jsonl or csv."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from archive.export import FORMATS, MAX_DAYS, iter_export


class Command(BaseCommand):
    help = "Write the conversations of the last --days days to --output (default: standard output)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--format", choices=list(FORMATS), default="json")
        parser.add_argument("--days", type=int, default=7)
        parser.add_argument("--output", type=Path, default=None)

    def handle(self, *args: Any, **options: Any) -> None:
        if not 1 <= options["days"] <= MAX_DAYS:
            raise CommandError(f"--days must be between 1 and {MAX_DAYS}")
        chunks = iter_export(options["format"], options["days"])
        if options["output"] is None:
            for chunk in chunks:
                self.stdout.write(chunk, ending="")
            return
        with options["output"].open("w", encoding="utf-8", newline="") as handle:
            for chunk in chunks:
                handle.write(chunk)
        self.stderr.write(f"wrote {options['output']}")
