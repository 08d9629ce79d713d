"""OpenAPI shapes of the search and cleanup responses (documentation only)."""

from __future__ import annotations

from conversations.schemas import BOOLEAN, DATETIME, INTEGER, NUMBER, STATUS, STRING, UUID, obj

SEARCH_RESULTS = obj(
    {
        "query": STRING,
        "count": INTEGER,
        "semantic": BOOLEAN,
        "results": {
            "type": "array",
            "items": obj(
                {
                    "conversation_id": UUID,
                    "title": STRING,
                    "question": STRING,
                    "status": STATUS,
                    "consensus_result": STRING,
                    "created_at": DATETIME,
                    "score": NUMBER,
                    "matched_by": {
                        "type": "array",
                        "items": {"type": "string", "enum": ["fulltext", "semantic"]},
                    },
                }
            ),
        },
    }
)

_COUNT = {"type": "integer", "minimum": 0}
CLEANUP_RESULTS = obj(
    {
        "cleanup_results": obj(
            {
                "postgresql": obj(
                    {
                        "conversations": _COUNT,
                        "messages": _COUNT,
                        "votes": _COUNT,
                        "consensus_results": _COUNT,
                        "events": _COUNT,
                    }
                ),
                "redis": obj(
                    {"deleted_streams": _COUNT, "enabled": BOOLEAN, "error": STRING},
                    required=["deleted_streams", "enabled"],
                ),
                "qdrant": obj(
                    {"enabled": BOOLEAN, "deleted_points": _COUNT, "error": STRING},
                    required=["enabled", "deleted_points"],
                ),
            }
        ),
        "days_threshold": INTEGER,
        "dry_run": BOOLEAN,
        "cutoff": DATETIME,
    }
)
