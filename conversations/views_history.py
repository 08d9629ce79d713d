"""Conversation history, search, and the admin cleanup and export endpoints."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

from asgiref.sync import sync_to_async
from django.core.handlers.asgi import ASGIRequest
from django.http import StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiExample, OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import serializers
from rest_framework.exceptions import NotFound
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from conversations import export, retention
from conversations.models import Conversation
from conversations.search import search_conversations
from conversations.selectors import conversation_detail, recent_conversations
from gateway.permissions import IsAdmin
from gateway.principal import Principal
from gateway.validation import SafeCharField

STREAM_PIECE_BYTES = 64 * 1024


class RecentQuery(serializers.Serializer):
    limit = serializers.IntegerField(min_value=1, max_value=100, default=10)
    status = serializers.ChoiceField(choices=Conversation.Status.choices, required=False)


class SearchBody(serializers.Serializer):
    query = SafeCharField(max_length=500, min_length=1)
    limit = serializers.IntegerField(min_value=1, max_value=100, default=10)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        unknown = (
            sorted(set(self.initial_data) - set(self.fields)) if isinstance(self.initial_data, dict) else []
        )
        if unknown:
            raise serializers.ValidationError({name: ["Unknown field."] for name in unknown})
        return attrs


class CleanupQuery(serializers.Serializer):
    days = serializers.IntegerField(min_value=1, max_value=retention.MAX_DAYS, default=30)
    dry_run = serializers.BooleanField(default=False)


class ExportQuery(serializers.Serializer):
    format = serializers.ChoiceField(choices=list(export.FORMATS), default="json")
    days = serializers.IntegerField(min_value=1, max_value=export.MAX_DAYS, default=7)


def _principal(request: Request) -> Principal:
    assert isinstance(request.user, Principal)  # guaranteed by the permission classes
    return request.user


def _query(serializer_class: type[serializers.Serializer], request: Request) -> dict[str, Any]:
    serializer = serializer_class(data=request.query_params.dict())
    serializer.is_valid(raise_exception=True)
    return dict(serializer.validated_data)


CONVERSATION_EXAMPLE = {
    "conversation_id": "6f1c1f0e-4c5b-4a1e-9a7e-1f2d3c4b5a69",
    "title": "Benefits of renewable energy",
    "status": "completed",
    "num_agents": 3,
    "turns_requested": 2,
    "turns_completed": 2,
    "exchanges": 1,
    "consensus_result": "Renewables cut emissions and running costs.",
    "confidence": 0.67,
    "duration": 2.5,
    "created_at": "2026-01-01T12:00:00Z",
    "completed_at": "2026-01-01T12:00:02.5Z",
}


class RecentConversationsView(APIView):
    @extend_schema(
        operation_id="conversations_recent",
        summary="Recent conversations (newest first)",
        parameters=[
            OpenApiParameter("limit", int, description="1..100, default 10"),
            OpenApiParameter("status", str, enum=Conversation.Status.values, description="only this status"),
        ],
        responses={200: OpenApiResponse(OpenApiTypes.OBJECT)},
        examples=[
            OpenApiExample(
                "recent", value={"conversations": [CONVERSATION_EXAMPLE], "count": 1}, response_only=True
            )
        ],
    )
    def get(self, request: Request) -> Response:
        query = _query(RecentQuery, request)
        rows = recent_conversations(_principal(request), query["limit"], status=query.get("status"))
        return Response({"conversations": rows, "count": len(rows)})


class ConversationDetailView(APIView):
    @extend_schema(
        operation_id="conversations_detail",
        summary="A conversation with its messages, ballots and consensus results",
        responses={200: OpenApiResponse(OpenApiTypes.OBJECT), 404: OpenApiResponse(OpenApiTypes.OBJECT)},
        examples=[
            OpenApiExample(
                "detail",
                response_only=True,
                value={
                    **CONVERSATION_EXAMPLE,
                    "messages": [{"role": "user", "turn": 0, "content": "Benefits of renewables?"}],
                    "votes": [{"voter": "agent_0", "choice": "A", "confidence": 0.8}],
                    "consensus_results": [
                        {"method": "majority", "reached": True, "winner": "A", "confidence": 0.67}
                    ],
                },
            )
        ],
    )
    def get(self, request: Request, conversation_id: str) -> Response:
        try:
            pk = uuid.UUID(conversation_id)
        except ValueError:
            raise NotFound("Conversation not found.") from None
        detail = conversation_detail(_principal(request), pk)
        if detail is None:
            raise NotFound("Conversation not found.")
        return Response(detail)


class SearchConversationsView(APIView):
    @extend_schema(
        operation_id="conversations_search",
        summary="Search conversations: full text, plus semantic search when Qdrant is configured",
        request=SearchBody,
        responses={200: OpenApiResponse(OpenApiTypes.OBJECT), 400: OpenApiResponse(OpenApiTypes.OBJECT)},
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
        return Response(search_conversations(_principal(request), data["query"], data["limit"]))


class CleanupView(APIView):
    permission_classes = [IsAdmin]

    @extend_schema(
        operation_id="admin_cleanup",
        summary="Delete conversations, Redis streams and Qdrant points older than `days` (admin)",
        request=None,
        parameters=[
            OpenApiParameter("days", int, description="default 30"),
            OpenApiParameter("dry_run", bool, description="count only, default false"),
        ],
        responses={200: OpenApiResponse(OpenApiTypes.OBJECT)},
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
        params = _query(CleanupQuery, request)
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
        parameters=[
            OpenApiParameter("format", str, enum=list(export.FORMATS), description="default json"),
            OpenApiParameter("days", int, description="default 7"),
        ],
        responses={
            (200, "application/json"): OpenApiResponse(OpenApiTypes.OBJECT),
            (200, "application/x-ndjson"): OpenApiResponse(OpenApiTypes.STR),
            (200, "text/csv"): OpenApiResponse(OpenApiTypes.STR),
        },
    )
    def get(self, request: Request) -> StreamingHttpResponse:
        params = _query(ExportQuery, request)
        fmt = params["format"]
        response = StreamingHttpResponse(
            _body(export.iter_export(fmt, params["days"]), request), content_type=export.FORMATS[fmt][0]
        )
        response["Content-Disposition"] = f'attachment; filename="{export.filename(fmt)}"'
        return response
