"""POST /stream/{conversation_id}: start an exchange in the background and point at its WebSocket."""

from __future__ import annotations

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiExample, OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import status
from rest_framework.exceptions import ValidationError
from rest_framework.request import Request
from rest_framework.response import Response

from conversations import schemas
from conversations.serializers import ChatRequestSerializer, StreamRequestSerializer
from conversations.services import ConversationError, conversation_start
from conversations.views import FOLLOW_CONVERSATION, conversation_problem, run_options
from gateway.asyncviews import APIView
from gateway.openapi import errors, links
from gateway.permissions import CanWrite
from gateway.principal import principal_of
from gateway.validation import parse_uuid
from streaming.jobs import enqueue_run
from webhooks.services import asubscribe, asubscription, split_request


class StreamView(APIView):
    """Starts (or continues) a conversation as a background run followed over WS /ws/{id}."""

    permission_classes = [CanWrite]

    @extend_schema(
        request=StreamRequestSerializer,
        responses={
            202: OpenApiResponse(schemas.STREAM_STARTED, description="Started; follow it on websocket_url."),
            # 404: the id is someone else's conversation; 409: it is running already.
            **errors(409, 422),
        },
        parameters=[OpenApiParameter("conversation_id", OpenApiTypes.UUID, OpenApiParameter.PATH)],
        extensions=links(GetConversation=FOLLOW_CONVERSATION),
        examples=[
            OpenApiExample(
                "Stream three agents",
                value={"message": "What are the benefits of renewable energy?", "num_agents": 3, "turns": 2},
                request_only=True,
            )
        ],
        summary="Start a streamed conversation; follow it on websocket_url",
    )
    async def post(self, request: Request, conversation_id: str) -> Response:
        conv_id = parse_uuid(conversation_id, field="conversation_id")
        body, hook_fields = split_request(request.data)
        serializer = ChatRequestSerializer(data=body)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        body_id = data.get("conversation_id")
        if body_id is not None and body_id != conv_id:
            raise ValidationError({"conversation_id": ["Must match the conversation id of the path."]})
        principal = principal_of(request)
        hook = await asubscription(principal, hook_fields)
        options = await run_options(principal, data)
        try:
            conversation, exchange = await conversation_start(
                principal=principal,
                message=data["message"],
                conversation_id=conv_id,
                **options,
                create_with_id=True,
                max_cost=data.get("max_cost"),
                max_tokens=data.get("max_tokens"),
            )
        except ConversationError as exc:
            return conversation_problem(exc)
        if hook is not None:
            await asubscribe(hook, conversation_id=conversation.pk, exchange=exchange)
        await enqueue_run(conversation.pk, exchange)
        return Response(
            {
                "conversation_id": str(conversation.pk),
                "status": "started",
                "websocket_url": f"/ws/{conversation.pk}",
                "exchange": exchange,
            },
            status=status.HTTP_202_ACCEPTED,
        )
