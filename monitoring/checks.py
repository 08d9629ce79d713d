"""Component health checks, written as django-health-check backends.

Each check fills `result` (status, details) besides the plugin's own `errors`, so the
detailed view can report degraded and unknown states that a plain pass/fail cannot.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal

import psutil
from django.apps import apps
from django.conf import settings
from django.core.cache import cache
from django.db import connection
from django.utils import timezone
from health_check.backends import BaseHealthCheckBackend
from health_check.exceptions import ServiceUnavailable, ServiceWarning

Status = Literal["healthy", "degraded", "unhealthy", "unknown"]
GEMINI_CACHE_KEY = "health:gemini_models"
GEMINI_CACHE_SECONDS = 60
WORKER_STALL_SECONDS = 30


@dataclass
class CheckResult:
    status: Status
    details: dict[str, Any] = field(default_factory=dict)


class ComponentCheck(BaseHealthCheckBackend):
    """A check with a component name, a graded status and details."""

    component = "component"
    result: CheckResult

    def probe(self) -> CheckResult:
        raise NotImplementedError

    def check_status(self) -> None:
        self.result = self.probe()
        if self.result.status == "unhealthy":
            raise ServiceUnavailable(str(self.result.details.get("error", "unhealthy")))
        if self.result.status == "degraded":
            raise ServiceWarning(str(self.result.details.get("warning", "degraded")))

    def identifier(self) -> str:
        return self.component


class DatabaseCheck(ComponentCheck):
    """PostgreSQL (size, active connections) or SQLite (file size)."""

    critical_service = True

    def __init__(self) -> None:
        super().__init__()
        self.component = "postgresql" if connection.vendor == "postgresql" else "sqlite"

    def probe(self) -> CheckResult:
        try:
            with connection.cursor() as cursor:
                if connection.vendor == "postgresql":
                    cursor.execute(
                        "SELECT pg_database_size(current_database()),"
                        " (SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                        "  AND state = 'active'),"
                        " (SELECT count(*) FROM pg_stat_activity WHERE datname = current_database())"
                    )
                    size, active, total = cursor.fetchone()
                    return CheckResult(
                        "healthy",
                        {
                            "database_size_bytes": int(size),
                            "active_connections": int(active),
                            "total_connections": int(total),
                            "vendor": "postgresql",
                        },
                    )
                cursor.execute("SELECT 1")
                cursor.fetchone()
            name = str(connection.settings_dict["NAME"])
            on_disk = os.path.exists(name)
            return CheckResult(
                "healthy",
                {
                    "vendor": "sqlite",
                    "database_size_bytes": os.path.getsize(name) if on_disk else None,
                    "in_memory": not on_disk,
                },
            )
        except Exception as exc:
            return CheckResult("unhealthy", {"error": f"{type(exc).__name__}: {exc}"[:300]})


class RedisCheck(ComponentCheck):
    """Redis: ping, used memory and connected clients; unknown when REDIS_URL is unset."""

    component = "redis"
    critical_service = True

    def probe(self) -> CheckResult:
        if not settings.REDIS_URL:
            return CheckResult("unknown", {"configured": False, "reason": "REDIS_URL is not set"})
        import redis

        timeout = settings.CONFIG.HEALTH_CHECK_TIMEOUT
        client = redis.Redis.from_url(
            settings.REDIS_URL, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        try:
            client.ping()
            memory, clients = client.info("memory"), client.info("clients")
            return CheckResult(
                "healthy",
                {
                    "memory_usage_bytes": memory.get("used_memory"),
                    "connected_clients": clients.get("connected_clients"),
                },
            )
        except Exception as exc:
            return CheckResult("unhealthy", {"error": f"{type(exc).__name__}: {exc}"[:300]})
        finally:
            client.close()


class QdrantCheck(ComponentCheck):
    """Qdrant: collections and vectors of our collection; unknown when not configured."""

    component = "qdrant"
    critical_service = False

    def probe(self) -> CheckResult:
        from archive import vectors

        if not vectors.is_enabled():
            return CheckResult(
                "unknown", {"configured": False, "reason": "QDRANT_URL / QDRANT_LOCAL_PATH unset"}
            )
        try:
            return CheckResult("healthy", vectors.stats())
        except Exception as exc:
            return CheckResult("unhealthy", {"error": f"{type(exc).__name__}: {exc}"[:300]})


def _gemini_list_models() -> list[str]:
    """The Gemini provider's model list, bounded by HEALTH_CHECK_TIMEOUT (runs its own event loop)."""
    from agents.providers.registry import get_provider

    provider = get_provider("gemini")
    timeout = settings.CONFIG.HEALTH_CHECK_TIMEOUT

    async def bounded() -> list[str]:
        try:
            return list(await asyncio.wait_for(provider.list_models(), timeout))
        finally:
            await provider.aclose()  # the SDK client of this short-lived loop

    return asyncio.run(bounded())


class GeminiCheck(ComponentCheck):
    """Gemini API: key configured and the model list (cached for a minute)."""

    component = "gemini_api"
    critical_service = False

    def probe(self) -> CheckResult:
        config = settings.CONFIG
        configured = bool(config.GEMINI_API_KEY)
        if not configured:
            return CheckResult(
                "unknown", {"api_key_configured": False, "reason": "GEMINI_API_KEY is not set"}
            )
        if not config.HEALTH_CHECK_EXTERNAL_SERVICES:
            return CheckResult(
                "unknown",
                {
                    "api_key_configured": True,
                    "reason": "HEALTH_CHECK_EXTERNAL_SERVICES is false",
                },
            )
        cached = cache.get(GEMINI_CACHE_KEY)
        if cached is not None:
            return CheckResult(cached["status"], {**cached["details"], "cached": True})
        try:
            names = _gemini_list_models()
            result = CheckResult(
                "healthy" if names else "degraded",
                {
                    "available_models": len(names),
                    "api_key_configured": True,
                    **({} if names else {"warning": "no models listed"}),
                },
            )
        except Exception as exc:
            result = CheckResult(
                "unhealthy",
                {
                    "api_key_configured": True,
                    "error": f"{type(exc).__name__}: {exc}"[:300],
                },
            )
        cache.set(
            GEMINI_CACHE_KEY, {"status": result.status, "details": result.details}, GEMINI_CACHE_SECONDS
        )
        return CheckResult(result.status, {**result.details, "cached": False})


class WorkersCheck(ComponentCheck):
    """Background workers: procrastinate heartbeats, or the in-process job runner."""

    component = "workers"
    critical_service = False

    def probe(self) -> CheckResult:
        if not (apps.is_installed("procrastinate.contrib.django") and connection.vendor == "postgresql"):
            return CheckResult("healthy", {"mode": "in-process", "reason": "jobs run inside the web process"})
        from procrastinate.contrib.django.models import ProcrastinateWorker

        since = timezone.now() - timedelta(seconds=WORKER_STALL_SECONDS)
        try:
            workers = ProcrastinateWorker.objects.all()  # type: ignore[misc]  # generic read-only manager
            alive = workers.filter(last_heartbeat__gte=since).count()
            total = workers.count()
        except Exception as exc:
            return CheckResult(
                "unhealthy", {"mode": "procrastinate", "error": f"{type(exc).__name__}: {exc}"[:300]}
            )
        details = {"mode": "procrastinate", "alive_workers": alive, "registered_workers": total}
        if alive == 0:
            return CheckResult("degraded", {**details, "warning": "no worker heartbeat in the last 30 s"})
        return CheckResult("healthy", details)


class SystemCheck(ComponentCheck):
    """Memory, disk and CPU of this machine."""

    component = "system"
    critical_service = False
    DISK_DEGRADED, DISK_UNHEALTHY = 90.0, 98.0
    MEMORY_MIN_BYTES = 100 * 1024 * 1024

    def probe(self) -> CheckResult:
        memory = psutil.virtual_memory()
        disk = psutil.disk_usage(str(settings.BASE_DIR))
        details: dict[str, Any] = {
            "memory_percent": memory.percent,
            "memory_available_bytes": memory.available,
            "disk_percent": disk.percent,
            "disk_free_bytes": disk.free,
            "cpu_percent": psutil.cpu_percent(interval=None),
            "cpu_count": psutil.cpu_count(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        }
        if disk.percent >= self.DISK_UNHEALTHY:
            return CheckResult("unhealthy", {**details, "error": f"disk {disk.percent}% full"})
        if disk.percent >= self.DISK_DEGRADED or memory.available < self.MEMORY_MIN_BYTES:
            return CheckResult("degraded", {**details, "warning": "low disk space or memory"})
        return CheckResult("healthy", details)


OUR_CHECKS: tuple[type[ComponentCheck], ...] = (
    DatabaseCheck,
    RedisCheck,
    QdrantCheck,
    GeminiCheck,
    WorkersCheck,
    SystemCheck,
)
