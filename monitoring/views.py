"""Health and monitoring endpoints."""

from django.http import HttpRequest, JsonResponse


async def health(request: HttpRequest) -> JsonResponse:
    """Liveness: answers without authentication and without touching any backend."""
    return JsonResponse({"status": "healthy", "service": "polyagents"})
