"""Django admin: conversations with their messages, ballots and results, read-only, exportable."""

from __future__ import annotations

import json
from typing import Any

from django.contrib import admin
from django.core.serializers.json import DjangoJSONEncoder
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse

from conversations.models import ConsensusResult, Conversation, Message, Vote
from conversations.selectors import conversation_summary, message_body, result_body, vote_body


class ReadOnlyInline(admin.TabularInline):
    extra = 0
    can_delete = False
    show_change_link = False

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class MessageInline(ReadOnlyInline):
    model = Message
    fields = ("exchange", "turn", "role", "agent_id", "model", "status", "latency_ms", "content")
    readonly_fields = fields


class VoteInline(ReadOnlyInline):
    model = Vote
    fields = ("exchange", "voter", "choice", "confidence", "reason")
    readonly_fields = fields


class ConsensusResultInline(ReadOnlyInline):
    model = ConsensusResult
    fields = ("exchange", "method", "reached", "winner", "confidence", "tie_break", "answer")
    readonly_fields = fields


@admin.action(description="Export selected conversations as JSON")
def export_json(
    modeladmin: admin.ModelAdmin, request: HttpRequest, queryset: QuerySet[Conversation]
) -> HttpResponse:
    data = [
        {
            **conversation_summary(c),
            "owner": c.owner,
            "messages": [message_body(m) for m in c.messages.all()],
            "votes": [vote_body(v) for v in c.votes.all()],
            "consensus_results": [result_body(r) for r in c.results.all()],
        }
        for c in queryset.prefetch_related("messages", "votes", "results")
    ]
    response = HttpResponse(
        json.dumps(data, cls=DjangoJSONEncoder, indent=2), content_type="application/json"
    )
    response["Content-Disposition"] = 'attachment; filename="conversations.json"'
    return response


@admin.register(Conversation)
class ConversationAdmin(admin.ModelAdmin):
    list_display = (
        "id",
        "title",
        "status",
        "owner",
        "num_agents",
        "turns_completed",
        "confidence",
        "created_at",
    )
    list_filter = ("status", "created_at")
    search_fields = ("=id", "title", "messages__content")
    date_hierarchy = "created_at"
    inlines = (MessageInline, VoteInline, ConsensusResultInline)
    actions = (export_json,)
    readonly_fields = (
        "id",
        "created_at",
        "updated_at",
        "started_at",
        "completed_at",
        "heartbeat_at",
        "last_seq",
    )

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Conversation], search_term: str
    ) -> Any:
        """Searching through messages joins rows: return each conversation once."""
        queryset, _ = super().get_search_results(request, queryset, search_term)
        return queryset.distinct(), False
