"""Request bodies of the conversation endpoints, validated strictly at the edge."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from rest_framework import serializers

from agents.synthesis import SYNTHESIS_MODES
from gateway.validation import (
    SafeCharField,
    StrictPositiveIntegerField,
    StrictPositiveNumberField,
    StrictUUIDField,
)

MAX_MESSAGE_CHARS = 8000


class StrictSerializer(serializers.Serializer):
    """Refuses fields it does not know, so a typo is an error rather than a silent default."""

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if isinstance(self.initial_data, dict):
            unknown = sorted(set(self.initial_data) - set(self.fields))
            if unknown:
                raise serializers.ValidationError({name: ["Unknown field."] for name in unknown})
        return attrs


class ChatRequestSerializer(StrictSerializer):
    """Body of POST /chat and POST /stream/{conversation_id}."""

    message = SafeCharField(max_length=MAX_MESSAGE_CHARS)
    conversation_id = StrictUUIDField(required=False, allow_null=True)
    num_agents = serializers.IntegerField(required=False, allow_null=True, min_value=1)
    turns = serializers.IntegerField(required=False, allow_null=True, min_value=1)
    strategy = serializers.ChoiceField(
        choices=["majority", "weighted", "reliability"], required=False, default="majority"
    )
    # Who writes consensus_result: the winner's best supporter, or a chairman model (one extra call).
    # Absent: SYNTHESIS_MODE.
    synthesis = serializers.ChoiceField(choices=list(SYNTHESIS_MODES), required=False)
    max_cost = StrictPositiveNumberField(
        required=False, allow_null=True, max_value=1_000_000, help_text="Budget in USD (estimated cost)."
    )
    max_tokens = StrictPositiveIntegerField(
        required=False, allow_null=True, max_value=1_000_000_000, help_text="Budget in tokens."
    )

    def validate_num_agents(self, value: int | None) -> int | None:
        limit = settings.CONFIG.MAX_AGENTS
        if value is not None and value > limit:
            raise serializers.ValidationError(f"Ensure this value is less than or equal to {limit}.")
        return value

    def validate_turns(self, value: int | None) -> int | None:
        limit = settings.CONFIG.MAX_TURNS
        if value is not None and value > limit:
            raise serializers.ValidationError(f"Ensure this value is less than or equal to {limit}.")
        return value
