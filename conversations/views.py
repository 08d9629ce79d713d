"""POST /chat (ask the panel and wait for its consensus), and reading past conversations."""

from __future__ import annotations

import asyncio
import contextvars
import uuid
from typing import Any

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiExample, OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import serializers, status
from rest_framework.exceptions import APIException, NotFound
from rest_framework.request import Request
from rest_framework.response import Response

from conversations import schemas
from conversations.models import Conversation
from conversations.selectors import achat_result, conversation_detail, recent_conversations
from conversations.serializers import ChatRequestSerializer
from conversations.services import (
    ConversationError,
    conversation_run,
    conversation_start,
    release_connection,
)
from gateway.asyncviews import APIView
from gateway.errors import error_body
from gateway.openapi import errors, links
from gateway.permissions import CanWrite
from gateway.principal import Principal, principal_of
from gateway.validation import query_params
from panels.registry import PanelNotFound, start_options

# Runs started by /chat are kept here so a client that disconnects does not cancel them.
_RUNNING: set[asyncio.Task[Any]] = set()


def problem(status_code: int, code: str, detail: str, **extra: Any) -> Response:
    headers = {}
    if extra.get("retry_after"):
        headers["Retry-After"] = str(int(extra["retry_after"]))
    return Response({**error_body(code, detail), **extra}, status=status_code, headers=headers)


def conversation_problem(exc: ConversationError) -> Response:
    """A service refusal (unknown or foreign conversation, already running) as a JSON error."""
    return problem(exc.status_code, exc.code, str(exc), **getattr(exc, "extra", {}))


async def run_options(principal: Principal, data: dict[str, Any]) -> dict[str, Any]:
    """How a validated /chat or /stream body asks the panel to run: its named `panel`
    (resolved for the caller), or NUM_AGENTS / AGENT_MODELS_CONFIG with the body's sizes."""
    asked: dict[str, Any] = {
        "num_agents": data.get("num_agents"),
        "turns": data.get("turns"),
        "strategy": data.get("strategy"),
        "synthesis": data.get("synthesis"),
    }
    if not data.get("panel"):
        return {**asked, "strategy": asked["strategy"] or "majority"}
    try:
        return await start_options(principal=principal, panel_id=data["panel"], **asked)
    except PanelNotFound as exc:
        raise NotFound(str(exc), code="panel_not_found") from None
    except ValueError as exc:
        raise PanelTooSmall(f"num_agents: {exc}") from None


class PanelTooSmall(APIException):
    """422: a body asks for more agents than its named panel seats."""

    status_code = 422
    default_code = "panel_too_small"


# An OpenAPI link: the conversation_id of a /chat or /stream answer opens /conversations/{id}.
FOLLOW_CONVERSATION = ("conversations_detail", {"conversation_id": "$response.body#/conversation_id"})


class ChatView(APIView):
    permission_classes = [CanWrite]

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        """The request's checks, in its thread; then that thread's database connection (if a
        check used one) goes back to the pool, in the same trip. A /chat request lasts a whole
        conversation, whose own database work does not use that thread: 200 waiting clients
        must not hold 200 connections."""
        super().initial(request, *args, **kwargs)
        release_connection()

    @extend_schema(
        request=ChatRequestSerializer,
        responses={
            200: OpenApiResponse(
                schemas.CHAT_RESPONSE, description="The panel's answers, ballots and consensus."
            ),
            # 404: an unknown (or someone else's) conversation_id; 409: it is running already.
            **errors(404, 409, 422, 503),
        },
        extensions=links(GetConversation=FOLLOW_CONVERSATION),
        examples=[
            OpenApiExample(
                "Ask three agents",
                value={"message": "What are the benefits of renewable energy?", "num_agents": 3, "turns": 2},
                request_only=True,
            )
        ],
        summary="Run a panel discussion and return its consensus",
    )
    async def post(self, request: Request) -> Response:
        serializer = ChatRequestSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        principal = principal_of(request)
        options = await run_options(principal, data)
        try:
            conversation, exchange = await conversation_start(
                principal=principal,
                message=data["message"],
                conversation_id=data.get("conversation_id"),
                **options,
                max_cost=data.get("max_cost"),
                max_tokens=data.get("max_tokens"),
                running=True,
            )
        except ConversationError as exc:
            return conversation_problem(exc)
        # The request thread's connection went back to the pool (`initial`); the run goes in a
        # fresh context, so its own database work never holds a connection per client.
        task = asyncio.get_running_loop().create_task(
            conversation_run(
                conversation_id=conversation.pk,
                exchange=exchange,
                stream_when_watched=True,
                fresh=conversation,
                question=data["message"],
            ),
            context=contextvars.Context(),
        )
        _RUNNING.add(task)
        task.add_done_callback(_RUNNING.discard)
        conversation = await asyncio.shield(task)
        body = await achat_result(conversation, exchange)
        if conversation.status == "failed":
            return problem(
                status.HTTP_503_SERVICE_UNAVAILABLE,
                "agents_unavailable",
                f"The panel could not answer: {conversation.error}",
                retry_after=conversation.metadata.get("retry_after") or 10,
                conversation_id=str(conversation.pk),
                metadata=body["metadata"],
                failed_agents=body["failed_agents"],
            )
        return Response(body, status=status.HTTP_200_OK)


class RecentQuery(serializers.Serializer):
    limit = serializers.IntegerField(min_value=1, max_value=100, default=10, help_text="1..100")
    status = serializers.ChoiceField(choices=Conversation.Status.choices, required=False)


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
        parameters=[RecentQuery],
        responses={200: OpenApiResponse(schemas.RECENT_CONVERSATIONS)},
        examples=[
            OpenApiExample(
                "recent", value={"conversations": [CONVERSATION_EXAMPLE], "count": 1}, response_only=True
            )
        ],
    )
    def get(self, request: Request) -> Response:
        query = query_params(RecentQuery, request)
        rows = recent_conversations(principal_of(request), query["limit"], status=query.get("status"))
        return Response({"conversations": rows, "count": len(rows)})


class ConversationDetailView(APIView):
    @extend_schema(
        operation_id="conversations_detail",
        summary="A conversation with its messages, ballots and consensus results",
        parameters=[OpenApiParameter("conversation_id", OpenApiTypes.UUID, OpenApiParameter.PATH)],
        responses={200: OpenApiResponse(schemas.CONVERSATION_DETAIL)},
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
        detail = conversation_detail(principal_of(request), pk)
        if detail is None:
            raise NotFound("Conversation not found.")
        return Response(detail)
