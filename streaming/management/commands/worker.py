"""`manage.py worker`: run procrastinate jobs, starting again after a lost database."""

from __future__ import annotations

import asyncio
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from streaming.worker import serve


class Command(BaseCommand):
    help = (
        "Run a procrastinate worker (PostgreSQL); a worker that loses its database ends and a "
        "new one starts once the database answers (streaming/worker.py)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--concurrency", type=int, help="jobs run at once (default: WORKER_CONCURRENCY)")
        parser.add_argument("--queues", default="", help="comma-separated queues (default: all)")
        parser.add_argument("--name", help="the worker's name in logs")

    def handle(self, *args: Any, **options: Any) -> None:
        worker_options: dict[str, Any] = {}
        if options["concurrency"]:
            worker_options["concurrency"] = options["concurrency"]
        if options["queues"]:
            queues = [queue.strip() for queue in options["queues"].split(",")]
            worker_options["queues"] = [queue for queue in queues if queue]
        if options["name"]:
            worker_options["name"] = options["name"]
        asyncio.run(serve(**worker_options))
