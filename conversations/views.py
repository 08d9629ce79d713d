"""POST /chat: ask the panel and wait for its consensus."""

from __future__ import annotations

import asyncio
import contextvars
from typing import Any

from adrf.views import APIView
from asgiref.sync import sync_to_async
from django.db import connection
from drf_spectacular.utils import OpenApiExample, extend_schema
from rest_framework import status
from rest_framework.request import Request
from rest_framework.response import Response

from conversations.selectors import achat_result
from conversations.serializers import ChatRequestSerializer
from conversations.services import (
    ConversationError,
    conversation_run,
    conversation_start,
)
from gateway.errors import error_body
from gateway.permissions import CanWrite

# Runs started by /chat are kept here so a client that disconnects does not cancel them.
_RUNNING: set[asyncio.Task[Any]] = set()


def _release_connection() -> None:
    connection.close()  # resolved in the calling thread: its own connection goes back to the pool


def problem(status_code: int, code: str, detail: str, **extra: Any) -> Response:
    headers = {}
    if extra.get("retry_after"):
        headers["Retry-After"] = str(int(extra["retry_after"]))
    return Response({**error_body(code, detail), **extra}, status=status_code, headers=headers)


def conversation_problem(exc: ConversationError) -> Response:
    """A service refusal (unknown or foreign conversation, already running) as a JSON error."""
    return problem(exc.status_code, exc.code, str(exc))


class ChatView(APIView):
    permission_classes = [CanWrite]

    @extend_schema(
        request=ChatRequestSerializer,
        responses={200: dict, 400: dict, 401: dict, 403: dict, 404: dict, 409: dict, 429: dict, 503: dict},
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
        try:
            conversation, exchange = await conversation_start(
                principal=request.user,  # type: ignore[arg-type]
                message=data["message"],
                conversation_id=data.get("conversation_id"),
                num_agents=data.get("num_agents"),
                turns=data.get("turns"),
                strategy=data["strategy"],
                synthesis=data.get("synthesis"),
            )
        except ConversationError as exc:
            return conversation_problem(exc)
        # Under ASGI each request gets its own thread for thread-sensitive ORM calls, and that
        # thread keeps its pooled connection until the request ends. A /chat request lasts a
        # whole conversation, so hand the connection back now and run the conversation in a
        # fresh context: its ORM calls then share the process's sync thread instead of holding
        # one connection per waiting client (200 clients would otherwise drain the pool).
        await sync_to_async(_release_connection)()
        task = asyncio.get_running_loop().create_task(
            conversation_run(conversation_id=conversation.pk, exchange=exchange),
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
