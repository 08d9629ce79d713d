"""Health, statistics and metrics endpoints."""

from __future__ import annotations

from typing import Any

from asgiref.sync import async_to_sync
from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from drf_spectacular.utils import OpenApiExample, OpenApiResponse, extend_schema
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from rest_framework.permissions import AllowAny, BasePermission
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from gateway.permissions import CanRead
from monitoring import schemas
from monitoring.health import detailed_report
from monitoring.statistics import breaker_snapshot, statistics
from telemetry.metrics import BREAKER_STATE

BREAKER_LEVELS = {"closed": 0, "half_open": 1, "open": 2}


@extend_schema(exclude=True)
async def health(request: HttpRequest) -> JsonResponse:
    """Liveness: answers without authentication and without touching any backend."""
    return JsonResponse({"status": "healthy", "service": "polyagents"})


class PublicOrRead(APIView):
    """Needs `read`, unless HEALTH_CHECK_PUBLIC=true opens it to anyone."""

    def get_permissions(self) -> list[BasePermission]:
        if settings.CONFIG.HEALTH_CHECK_PUBLIC:
            return [AllowAny()]
        return [CanRead()]

    def perform_content_negotiation(self, request: Request, force: bool = False) -> Any:
        # Scrapers ask for text/plain; successes bypass renderers, errors stay JSON.
        return super().perform_content_negotiation(request, force=True)


class HealthDetailedView(PublicOrRead):
    @extend_schema(
        operation_id="health_detailed",
        summary="Component health: database, Redis, Qdrant, Gemini, workers, system",
        responses={200: schemas.HEALTH_RESPONSE, 503: schemas.HEALTH_RESPONSE},
        examples=[OpenApiExample("healthy", value=schemas.HEALTH_EXAMPLE, response_only=True)],
    )
    def get(self, request: Request) -> Response:
        report = async_to_sync(detailed_report)()
        return Response(report, status=503 if report["status"] == "unhealthy" else 200)


class StatisticsView(APIView):
    @extend_schema(
        operation_id="statistics",
        summary="Conversation, agent, error and circuit-breaker statistics",
        responses={200: schemas.STATISTICS_RESPONSE},
        examples=[OpenApiExample("statistics", value=schemas.STATISTICS_EXAMPLE, response_only=True)],
    )
    def get(self, request: Request) -> Response:
        return Response(statistics())


class MetricsView(PublicOrRead):
    # A scraper polls every few seconds, beyond any sensible per-key request budget;
    # the endpoint is cheap (no database access), so it is not throttled.
    throttle_classes: list[Any] = []

    @extend_schema(
        operation_id="metrics",
        summary="Prometheus metrics (text exposition format)",
        responses={(200, "text/plain"): OpenApiResponse(response=str, description="Prometheus text format")},
    )
    def get(self, request: Request) -> HttpResponse:
        for name, breaker in breaker_snapshot().items():
            BREAKER_STATE.labels(breaker=name).set(BREAKER_LEVELS.get(str(breaker.get("state")), 0))
        return HttpResponse(generate_latest(REGISTRY), content_type=CONTENT_TYPE_LATEST)
