"""The detailed health report: every registered check, run concurrently with a timeout."""

from __future__ import annotations

import asyncio
import copy
import time
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connections
from django.utils import timezone
from health_check.backends import BaseHealthCheckBackend
from health_check.exceptions import ServiceWarning
from health_check.plugins import plugin_dir

from monitoring.checks import ComponentCheck

# Friendlier names for django-health-check's own plugins.
PLUGIN_NAMES = {"Cache backend: default": "cache", "DatabaseHeartBeatCheck": "database_heartbeat"}
STATUSES = ("healthy", "degraded", "unhealthy", "unknown")


def _component_name(plugin: BaseHealthCheckBackend) -> str:
    identifier = str(plugin.identifier())
    return PLUGIN_NAMES.get(identifier, identifier)


def _run_plugin(plugin: BaseHealthCheckBackend) -> dict[str, Any]:
    """Run one plugin in the calling thread and describe its outcome."""
    started = time.perf_counter()
    try:
        plugin.run_check()
        if isinstance(plugin, ComponentCheck):
            status, details = plugin.result.status, dict(plugin.result.details)
        elif not plugin.errors:
            status, details = "healthy", {}
        else:
            warning_only = all(isinstance(e, ServiceWarning) for e in plugin.errors)
            status = "degraded" if warning_only or not plugin.critical_service else "unhealthy"
            details = {"error": "; ".join(str(e) for e in plugin.errors)[:300]}
    except Exception as exc:
        status, details = "unhealthy", {"error": f"{type(exc).__name__}: {exc}"[:300]}
    finally:
        connections.close_all()  # this worker thread's connections go back to the pool
    return {
        "status": status,
        "response_time_ms": round((time.perf_counter() - started) * 1000, 2),
        "details": details,
    }


async def _bounded(plugin: BaseHealthCheckBackend, timeout: float) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        return await asyncio.wait_for(sync_to_async(_run_plugin, thread_sensitive=False)(plugin), timeout)
    except TimeoutError:
        return {
            "status": "unhealthy",
            "response_time_ms": round((time.perf_counter() - started) * 1000, 2),
            "details": {"error": f"no answer within {timeout} s (HEALTH_CHECK_TIMEOUT)"},
        }


def overall_status(components: dict[str, dict[str, Any]], critical: dict[str, bool]) -> str:
    """Unhealthy if a critical component is; degraded if anything else is wrong; else healthy."""
    states = {name: c["status"] for name, c in components.items()}
    if any(state == "unhealthy" and critical.get(name, True) for name, state in states.items()):
        return "unhealthy"
    if any(state in ("unhealthy", "degraded") for state in states.values()):
        return "degraded"
    return "healthy"


async def detailed_report() -> dict[str, Any]:
    """Run every registered check concurrently and build the /health/detailed body."""
    plugins = [cls(**copy.deepcopy(options)) for cls, options in plugin_dir._registry]
    timeout = settings.CONFIG.HEALTH_CHECK_TIMEOUT
    results = await asyncio.gather(*(_bounded(plugin, timeout) for plugin in plugins))
    components = {
        _component_name(p): r
        for p, r in sorted(zip(plugins, results, strict=True), key=lambda pr: _component_name(pr[0]))
    }
    critical = {_component_name(p): bool(p.critical_service) for p in plugins}
    summary: dict[str, int] = {"total_components": len(components)}
    for state in STATUSES:
        summary[state] = sum(1 for c in components.values() if c["status"] == state)
    return {
        "status": overall_status(components, critical),
        "timestamp": timezone.now().isoformat().replace("+00:00", "Z"),
        "components": components,
        "summary": summary,
    }
