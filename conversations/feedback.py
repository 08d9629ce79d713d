"""POST /conversations/{id}/feedback: was the answer right? (labels that recalibrate confidence)."""

from __future__ import annotations

import uuid
from typing import Any

from django.db import transaction
from drf_spectacular.utils import OpenApiExample, OpenApiResponse, extend_schema
from rest_framework import serializers, status
from rest_framework.exceptions import NotFound
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from conversations import schemas
from conversations.assessment import forget_recalibration
from conversations.models import ConsensusResult, Conversation, Feedback
from conversations.selectors import visible_conversations
from conversations.serializers import StrictSerializer
from gateway.errors import error_body
from gateway.openapi import errors
from gateway.permissions import CanWrite
from gateway.principal import principal_of
from gateway.validation import SafeCharField

MAX_NOTE_CHARS = 2000


class StrictBooleanField(serializers.BooleanField):
    """Only JSON true or false: "true", 1 and "yes" are refused, not coerced."""

    default_error_messages = {"invalid": "Must be true or false."}

    def to_internal_value(self, data: Any) -> bool:
        if not isinstance(data, bool):
            self.fail("invalid")
        return data


class FeedbackBody(StrictSerializer):
    correct = StrictBooleanField()
    note = SafeCharField(max_length=MAX_NOTE_CHARS, required=False, allow_blank=True, default="")
    exchange = serializers.IntegerField(required=False, min_value=1, max_value=1_000_000)


def _iso(value: Any) -> str:
    return str(value.isoformat().replace("+00:00", "Z"))


class FeedbackView(APIView):
    permission_classes = [CanWrite]

    @extend_schema(
        operation_id="conversations_feedback",
        summary="Say whether the panel's answer was right (owner or admin); used to recalibrate confidence",
        request=FeedbackBody,
        responses={
            200: OpenApiResponse(schemas.FEEDBACK, description="Feedback replaced."),
            201: OpenApiResponse(schemas.FEEDBACK, description="Feedback stored."),
            # 404: unknown or someone else's conversation; 409: the exchange has no answer yet.
            **errors(409),
        },
        examples=[
            OpenApiExample(
                "right", value={"correct": True, "note": "Checked against the manual."}, request_only=True
            )
        ],
    )
    def post(self, request: Request, conversation_id: str) -> Response:
        principal = principal_of(request)
        try:
            pk = uuid.UUID(conversation_id)
        except ValueError:
            raise NotFound("Conversation not found.") from None
        body = FeedbackBody(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        with transaction.atomic():
            conversation = visible_conversations(principal).select_for_update().filter(pk=pk).first()
            if conversation is None:
                raise NotFound("Conversation not found.")
            exchange = data.get("exchange", conversation.exchanges)
            result = ConsensusResult.objects.filter(conversation=conversation, exchange=exchange).first()
            if result is None or exchange > conversation.exchanges or not _answered(conversation, exchange):
                return Response(
                    error_body("no_answer", f"Exchange {exchange} has no panel answer to judge (yet)."),
                    status=status.HTTP_409_CONFLICT,
                )
            feedback, created = Feedback.objects.update_or_create(
                conversation=conversation,
                exchange=exchange,
                defaults={"correct": data["correct"], "note": data["note"], "author": principal.owner},
            )
        forget_recalibration()
        return Response(
            {
                "conversation_id": str(conversation.pk),
                "exchange": exchange,
                "correct": feedback.correct,
                "note": feedback.note,
                "confidence": result.confidence,
                "created_at": _iso(feedback.created_at),
                "updated_at": _iso(feedback.updated_at),
            },
            status=status.HTTP_201_CREATED if created else status.HTTP_200_OK,
        )


def _answered(conversation: Conversation, exchange: int) -> bool:
    """An earlier exchange is finished; the current one only once its run is."""
    return exchange < conversation.exchanges or conversation.is_terminal
