"""Request bodies of the conversation endpoints, validated strictly at the edge."""

from __future__ import annotations

from django.conf import settings
from rest_framework import serializers

from agents.synthesis import SYNTHESIS_MODES
from gateway.validation import (
    SafeCharField,
    StrictPositiveIntegerField,
    StrictPositiveNumberField,
    StrictSerializer,
    StrictUUIDField,
)
from panels.specs import PANEL_ID_PATTERN, STRATEGIES

MAX_MESSAGE_CHARS = 8000


class ChatRequestSerializer(StrictSerializer):
    """Body of POST /chat and POST /stream/{conversation_id}."""

    message = SafeCharField(max_length=MAX_MESSAGE_CHARS)
    conversation_id = StrictUUIDField(required=False, allow_null=True)
    num_agents = serializers.IntegerField(required=False, allow_null=True, min_value=1)
    turns = serializers.IntegerField(required=False, allow_null=True, min_value=1)
    # A named panel (GET /v1/models lists them): its agents, turns, strategy and synthesis,
    # which the fields below override. Absent: NUM_AGENTS / AGENT_MODELS_CONFIG.
    panel = serializers.RegexField(PANEL_ID_PATTERN, required=False, max_length=64)
    # Absent: the panel's strategy (majority without a panel).
    strategy = serializers.ChoiceField(choices=list(STRATEGIES), required=False)
    # Who writes consensus_result: the winner's best supporter, or a chairman model (one extra call).
    # Absent: SYNTHESIS_MODE.
    synthesis = serializers.ChoiceField(choices=list(SYNTHESIS_MODES), required=False)
    max_cost = StrictPositiveNumberField(
        required=False, allow_null=True, max_value=1_000_000, help_text="Budget in USD (estimated cost)."
    )
    max_tokens = StrictPositiveIntegerField(
        required=False, allow_null=True, max_value=1_000_000_000, help_text="Budget in tokens."
    )

    def get_fields(self) -> dict[str, serializers.Field]:
        # The upper bounds are settings: the same bound validates and appears in the schema.
        fields = super().get_fields()
        config = settings.CONFIG
        fields["num_agents"] = serializers.IntegerField(
            required=False, allow_null=True, min_value=1, max_value=config.MAX_AGENTS
        )
        fields["turns"] = serializers.IntegerField(
            required=False, allow_null=True, min_value=1, max_value=config.MAX_TURNS
        )
        return fields


class StreamRequestSerializer(ChatRequestSerializer):
    """The schema of POST /stream/{conversation_id}'s body (documentation only): the /chat body,
    whose conversation is the path's. A `conversation_id` in the body is still tolerated when it
    equals the path's, so the schema leaves it out rather than describe that equality."""

    def get_fields(self) -> dict[str, serializers.Field]:
        fields = super().get_fields()
        fields.pop("conversation_id")
        return fields
