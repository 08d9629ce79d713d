"""Search over past conversations, and the admin cleanup and export endpoints."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from asgiref.sync import sync_to_async
from django.core.handlers.asgi import ASGIRequest
from django.http import StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiExample, OpenApiResponse, extend_schema
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from archive import export, retention, schemas
from archive.search import search_conversations
from conversations.views import CONVERSATION_EXAMPLE
from gateway.permissions import IsAdmin
from gateway.principal import principal_of
from gateway.validation import SafeCharField, StrictSerializer, query_params

STREAM_PIECE_BYTES = 64 * 1024


class SearchBody(StrictSerializer):
    query = SafeCharField(max_length=500, min_length=1)
    limit = serializers.IntegerField(min_value=1, max_value=100, default=10)


class CleanupQuery(serializers.Serializer):
    days = serializers.IntegerField(min_value=1, max_value=retention.MAX_DAYS, default=30)
    dry_run = serializers.BooleanField(default=False, help_text="count only")


class ExportQuery(serializers.Serializer):
    format = serializers.ChoiceField(choices=list(export.FORMATS), default="json")
    days = serializers.IntegerField(min_value=1, max_value=export.MAX_DAYS, default=7)


class SearchConversationsView(APIView):
    @extend_schema(
        operation_id="conversations_search",
        summary="Search conversations: full text, plus semantic search when Qdrant is configured",
        request=SearchBody,
        responses={200: OpenApiResponse(schemas.SEARCH_RESULTS)},
        examples=[
            OpenApiExample("query", value={"query": "renewable energy", "limit": 10}, request_only=True),
            OpenApiExample(
                "results",
                response_only=True,
                value={
                    "query": "renewable energy",
                    "count": 1,
                    "semantic": True,
                    "results": [
                        {
                            "conversation_id": CONVERSATION_EXAMPLE["conversation_id"],
                            "title": "Benefits of renewable energy",
                            "question": "Benefits of renewables?",
                            "status": "completed",
                            "consensus_result": "Renewables cut emissions.",
                            "created_at": "2026-01-01T12:00:00Z",
                            "score": 0.032787,
                            "matched_by": ["fulltext", "semantic"],
                        }
                    ],
                },
            ),
        ],
    )
    def post(self, request: Request) -> Response:
        body = SearchBody(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        return Response(search_conversations(principal_of(request), data["query"], data["limit"]))


class CleanupView(APIView):
    permission_classes = [IsAdmin]

    @extend_schema(
        operation_id="admin_cleanup",
        summary="Delete conversations, Redis streams and Qdrant points older than `days` (admin)",
        request=None,
        parameters=[CleanupQuery],
        responses={200: OpenApiResponse(schemas.CLEANUP_RESULTS)},
        examples=[
            OpenApiExample(
                "cleanup",
                response_only=True,
                value={
                    "cleanup_results": {
                        "postgresql": {
                            "conversations": 25,
                            "messages": 150,
                            "votes": 75,
                            "consensus_results": 25,
                            "events": 400,
                        },
                        "redis": {"deleted_streams": 8, "enabled": True},
                        "qdrant": {"enabled": True, "deleted_points": 25},
                    },
                    "days_threshold": 30,
                    "dry_run": False,
                    "cutoff": "2025-12-02T12:00:00Z",
                },
            )
        ],
    )
    def post(self, request: Request) -> Response:
        params = query_params(CleanupQuery, request)
        return Response(retention.cleanup(days=params["days"], dry_run=params["dry_run"]))


def _pieces(chunks: Iterator[str]) -> str | None:
    """Join pieces of the export up to ~64 KiB; None at the end."""
    parts: list[str] = []
    size = 0
    for part in chunks:
        parts.append(part)
        size += len(part)
        if size >= STREAM_PIECE_BYTES:
            break
    return "".join(parts) if parts else None


def _body(chunks: Iterator[str], request: Request) -> Iterator[str] | AsyncIterator[str]:
    """A sync iterator under WSGI; under ASGI an async one, so Django does not buffer it whole."""
    if not isinstance(request._request, ASGIRequest):
        return chunks

    async def stream() -> AsyncIterator[str]:
        next_piece = sync_to_async(_pieces)
        while (piece := await next_piece(chunks)) is not None:
            yield piece

    return stream()


class ExportView(APIView):
    permission_classes = [IsAdmin]

    def perform_content_negotiation(self, request: Request, force: bool = False) -> Any:
        # `format` is our own parameter here, not DRF's renderer override.
        return super().perform_content_negotiation(request, force=True)

    @extend_schema(
        operation_id="admin_export",
        summary="Stream conversations of the last `days` days as json, jsonl or csv (admin)",
        parameters=[ExportQuery],
        responses={
            (200, "application/json"): OpenApiResponse(OpenApiTypes.OBJECT),
            (200, "application/x-ndjson"): OpenApiResponse(OpenApiTypes.STR),
            (200, "text/csv"): OpenApiResponse(OpenApiTypes.STR),
        },
    )
    def get(self, request: Request) -> StreamingHttpResponse:
        params = query_params(ExportQuery, request)
        fmt = params["format"]
        response = StreamingHttpResponse(
            _body(export.iter_export(fmt, params["days"]), request), content_type=export.FORMATS[fmt][0]
        )
        response["Content-Disposition"] = f'attachment; filename="{export.filename(fmt)}"'
        return response
