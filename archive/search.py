"""Conversation search: full text in the database, semantic in Qdrant, merged by rank fusion."""

from __future__ import annotations

from typing import Any

from django.db import connection
from django.db.models import Max, Q

from archive import vectors
from conversations.models import Conversation, Message
from conversations.selectors import _iso, visible_conversations
from gateway.principal import Principal

RRF_K = 60  # the usual reciprocal-rank-fusion constant
FTS_CONFIG = "english"
RANK_CANDIDATES = 2000


def fulltext(principal: Principal, query: str, limit: int) -> list[str]:
    """Ids of matching conversations, best first.

    PostgreSQL: websearch_to_tsquery over question and answers, ranked with ts_rank
    (GIN expression index from migration 0002). SQLite: case-insensitive substring match,
    newest first.
    """
    visible = visible_conversations(principal)
    if connection.vendor == "postgresql":
        from django.contrib.postgres.search import SearchQuery, SearchRank, SearchVector

        vector = SearchVector("content", config=FTS_CONFIG)
        ts_query = SearchQuery(query, config=FTS_CONFIG, search_type="websearch")
        # The index finds the matches; ranking re-parses each matched text, so only the
        # newest RANK_CANDIDATES matches are ranked (a bound on work for very common words).
        candidates = (
            Message.objects.filter(conversation__in=visible.values("pk"))
            .annotate(document=vector)
            .filter(document=ts_query)
            .order_by("-id")
            .values("id")[:RANK_CANDIDATES]
        )
        rows = (
            Message.objects.filter(pk__in=candidates)
            .values("conversation_id")
            .annotate(rank=Max(SearchRank(vector, ts_query)))
            .order_by("-rank", "conversation_id")[:limit]
        )
        return [str(row["conversation_id"]) for row in rows]
    matching = Message.objects.filter(content__icontains=query).values("conversation_id")
    ids = (
        visible.filter(Q(pk__in=matching) | Q(title__icontains=query))
        .order_by("-created_at")
        .values_list("pk", flat=True)[:limit]
    )
    return [str(pk) for pk in ids]


def rrf(*rankings: list[str], k: int = RRF_K) -> list[tuple[str, float]]:
    """Reciprocal rank fusion: each list adds 1 / (k + rank) to an id's score."""
    scores: dict[str, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, start=1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda pair: (-pair[1], pair[0]))


def search_conversations(principal: Principal, query: str, limit: int) -> dict[str, Any]:
    """Both rankings, merged; each hit says which search found it."""
    text_ids = fulltext(principal, query, limit)
    owner = None if principal.is_admin else principal.owner
    semantic_ids = [cid for cid, _ in vectors.search(query, limit, owner=owner)]
    merged = rrf(text_ids, semantic_ids)[:limit]
    rows = {str(c.pk): c for c in visible_conversations(principal).filter(pk__in=[cid for cid, _ in merged])}
    questions = {
        str(cid): content
        for cid, content in Message.objects.filter(
            conversation_id__in=list(rows), role=Message.Role.USER, exchange=1
        ).values_list("conversation_id", "content")
    }
    results = []
    for cid, score in merged:
        conversation: Conversation | None = rows.get(cid)
        if conversation is None:
            continue  # a stale Qdrant point whose row is gone
        results.append(
            {
                "conversation_id": cid,
                "title": conversation.title,
                "question": questions.get(cid, "")[:500],
                "status": conversation.status,
                "consensus_result": conversation.consensus_result[:500],
                "created_at": _iso(conversation.created_at),
                "score": round(score, 6),
                "matched_by": [
                    name for name, ids in (("fulltext", text_ids), ("semantic", semantic_ids)) if cid in ids
                ],
            }
        )
    return {"query": query, "count": len(results), "semantic": vectors.is_enabled(), "results": results}
