"""GET /statistics: database aggregates over conversations, messages and errors."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

from django.db import connection
from django.db.models import Avg, Count, F, Q, QuerySet, Sum
from django.utils import timezone

from conversations.models import Conversation, Message
from telemetry.errors import error_rates

PERCENTILES = (0.5, 0.95, 0.99)
SUCCESS = (Conversation.Status.COMPLETED, Conversation.Status.NO_CONSENSUS)
FINISHED = (*SUCCESS, Conversation.Status.FAILED)


def breaker_snapshot() -> dict[str, dict[str, Any]]:
    """The providers' circuit breakers, or {} while the resilience layer is absent."""
    try:
        from agents.resilience import breaker_snapshot as snapshot
    except ImportError:
        return {}
    return dict(snapshot())


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(float(value), digits)


def percentiles(queryset: QuerySet[Any], column: str, scale: float = 1.0) -> dict[str, Any]:
    """Continuous percentiles (percentile_cont) of a column, computed in the database.

    PostgreSQL does it in one query; SQLite fetches only the two neighbouring values of
    each rank (ORDER BY ... LIMIT 2 OFFSET k), the same linear interpolation.
    """
    values = queryset.exclude(**{f"{column}__isnull": True})
    if connection.vendor == "postgresql":
        sql, params = values.values(column).query.sql_with_params()
        quoted = connection.ops.quote_name(column)
        with connection.cursor() as cursor:
            cursor.execute(
                f"SELECT count(*), percentile_cont(%s::float8[]) WITHIN GROUP (ORDER BY sub.{quoted})"  # noqa: S608
                f" FROM ({sql}) AS sub",
                [list(PERCENTILES), *params],
            )
            count, result = cursor.fetchone()
        points = list(result) if count else [None] * len(PERCENTILES)
    else:
        count = values.count()
        points = []
        ordered = values.order_by(column).values_list(column, flat=True)
        for p in PERCENTILES:
            if not count:
                points.append(None)
                continue
            rank = p * (count - 1)
            low = math.floor(rank)
            pair = list(ordered[low : low + 2])
            high_value = pair[1] if len(pair) > 1 else pair[0]
            points.append(pair[0] + (high_value - pair[0]) * (rank - low))
    body: dict[str, Any] = {"samples": count}
    for p, value in zip(PERCENTILES, points, strict=True):
        body[f"p{round(p * 100)}"] = _round(None if value is None else value * scale)
    return body


def conversation_stats(now: datetime) -> dict[str, Any]:
    start_of_day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    agg = Conversation.objects.aggregate(
        total=Count("id"),
        today=Count("id", filter=Q(created_at__gte=start_of_day)),
        average_duration=Avg("duration", filter=Q(status__in=SUCCESS)),
        finished=Count("id", filter=Q(status__in=FINISHED)),
        succeeded=Count("id", filter=Q(status__in=SUCCESS)),
    )
    return {
        "total_conversations": agg["total"],
        "conversations_today": agg["today"],
        "average_duration": _round(agg["average_duration"], 3),
        "success_rate": _round(agg["succeeded"] / agg["finished"]) if agg["finished"] else None,
    }


def agent_stats() -> dict[str, Any]:
    answers = Message.objects.filter(role=Message.Role.AGENT)
    agg = answers.aggregate(total=Count("id"), latency=Avg("latency_ms", filter=Q(status=Message.Status.OK)))
    by_model = answers.exclude(model="").values("model").annotate(n=Count("id")).order_by("-n", "model")
    counted = sum(row["n"] for row in by_model)
    return {
        "total_messages": agg["total"],
        "average_response_time": _round(agg["latency"] / 1000 if agg["latency"] is not None else None, 3),
        "model_distribution": {row["model"]: round(row["n"] / counted, 4) for row in by_model}
        if counted
        else {},
    }


def cost_stats(now: datetime) -> dict[str, Any]:
    """Estimated cost next to tokens: in total, today, and per model (agents' answers)."""
    start_of_day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    agg = Conversation.objects.aggregate(
        usd=Sum("cost_usd"),
        usd_today=Sum("cost_usd", filter=Q(created_at__gte=start_of_day)),
        prompt=Sum("prompt_tokens"),
        completion=Sum("completion_tokens"),
        tokens_today=Sum(F("prompt_tokens") + F("completion_tokens"), filter=Q(created_at__gte=start_of_day)),
    )
    by_model = (
        Message.objects.filter(role=Message.Role.AGENT)
        .exclude(model="")
        .values("model")
        .annotate(usd=Sum("cost_usd"), tokens=Sum(F("prompt_tokens") + F("completion_tokens")))
        .order_by("-usd", "model")
    )
    return {
        "total_usd": _round(agg["usd"] or 0.0, 8),
        "today_usd": _round(agg["usd_today"] or 0.0, 8),
        "total_tokens": (agg["prompt"] or 0) + (agg["completion"] or 0),
        "tokens_today": agg["tokens_today"] or 0,
        "by_model": {
            row["model"]: {"cost_usd": _round(row["usd"] or 0.0, 8), "tokens": row["tokens"] or 0}
            for row in by_model
        },
    }


def statistics(now: datetime | None = None) -> dict[str, Any]:
    """The body of GET /statistics."""
    now = now or timezone.now()
    ok_answers = Message.objects.filter(role=Message.Role.AGENT, status=Message.Status.OK)
    finished = Conversation.objects.filter(status__in=SUCCESS)
    return {
        "conversations": conversation_stats(now),
        "agents": agent_stats(),
        "errors": error_rates(now),
        "costs": cost_stats(now),
        "circuit_breakers": breaker_snapshot(),
        "latency": {
            "agent_response_seconds": percentiles(ok_answers, "latency_ms", scale=0.001),
            "conversation_duration_seconds": percentiles(finished, "duration"),
        },
        "generated_at": now.isoformat().replace("+00:00", "Z"),
    }
