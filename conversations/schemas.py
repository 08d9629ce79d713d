"""OpenAPI shapes of the conversation responses (documentation only: `conversations.selectors` builds them).

Raw JSON schemas, so nullability and required fields say exactly what the selectors return.
"""

from __future__ import annotations

from typing import Any


def obj(properties: dict[str, Any], *, required: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    """An object schema; every property is required unless `required` says otherwise."""
    names = list(properties) if required is None else required
    return {"type": "object", "properties": properties, **({"required": names} if names else {}), **extra}


def nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "nullable": True}


STRING = {"type": "string"}
INTEGER = {"type": "integer"}
NUMBER = {"type": "number"}
BOOLEAN = {"type": "boolean"}
DATETIME = {"type": "string", "format": "date-time"}
UUID = {"type": "string", "format": "uuid"}
FREE_OBJECT = {"type": "object", "additionalProperties": True}
STATUS = {
    "type": "string",
    "enum": ["pending", "running", "completed", "no_consensus", "failed", "cancelled"],
}

TOKENS = obj({"prompt": INTEGER, "completion": INTEGER, "total": INTEGER})

AGENT_RESPONSE = obj(
    {
        "agent_id": STRING,
        "response": STRING,
        "model": STRING,
        "temperature": nullable(NUMBER),
        "provider": STRING,
        "personality": STRING,
        "turn": INTEGER,
        "position": nullable(STRING),
        "confidence": nullable(NUMBER),
        "abstained": BOOLEAN,
        "latency_ms": nullable(NUMBER),
        "tokens": TOKENS,
        "simulated": BOOLEAN,
    }
)

CHAT_RESPONSE = obj(
    {
        "conversation_id": UUID,
        "exchange": INTEGER,
        "agent_responses": {"type": "array", "items": AGENT_RESPONSE},
        "consensus_result": nullable(STRING),
        "confidence": nullable(NUMBER),
        "consensus": nullable(
            obj(
                {
                    "reached": BOOLEAN,
                    "method": STRING,
                    "winner": nullable(STRING),
                    "position": {},
                    "confidence": NUMBER,
                    "tallies": {"type": "object", "additionalProperties": NUMBER},
                    "tie_break": nullable(STRING),
                    "dissent": {"type": "array", "items": {}},
                }
            )
        ),
        "votes": {
            "type": "array",
            "items": obj(
                {
                    "voter": STRING,
                    "choice": nullable(STRING),
                    "position": {},
                    "confidence": nullable(NUMBER),
                    "reason": STRING,
                }
            ),
        },
        "failed_agents": {
            "type": "array",
            "items": obj({"agent_id": STRING, "turn": INTEGER, "error": STRING, "model": STRING}),
        },
        "transcript": {"type": "array", "items": AGENT_RESPONSE},
        "usage": obj({"prompt": INTEGER, "completion": INTEGER, "total": INTEGER}, required=[]),
        "metadata": obj(
            {
                "status": STATUS,
                "duration": nullable(NUMBER),
                "turns_completed": INTEGER,
                "turns_requested": INTEGER,
                "num_agents": INTEGER,
                "early_stop": BOOLEAN,
                "strategy": {"type": "string", "enum": ["majority", "weighted", "reliability"]},
                "simulated": BOOLEAN,
                "error": nullable(STRING),
            }
        ),
    }
)

STREAM_STARTED = obj(
    {
        "conversation_id": UUID,
        "status": {"type": "string", "enum": ["started"]},
        "websocket_url": STRING,
        "exchange": INTEGER,
    }
)

CONVERSATION_SUMMARY = obj(
    {
        "conversation_id": UUID,
        "title": STRING,
        "status": STATUS,
        "num_agents": INTEGER,
        "turns_requested": INTEGER,
        "turns_completed": INTEGER,
        "exchanges": INTEGER,
        "consensus_result": STRING,
        "confidence": nullable(NUMBER),
        "duration": nullable(NUMBER),
        "created_at": DATETIME,
        "completed_at": nullable(DATETIME),
    }
)

RECENT_CONVERSATIONS = obj(
    {"conversations": {"type": "array", "items": CONVERSATION_SUMMARY}, "count": INTEGER}
)

CONVERSATION_DETAIL = obj(
    {
        **CONVERSATION_SUMMARY["properties"],
        "error": STRING,
        "metadata": FREE_OBJECT,
        "tokens": obj({"prompt": INTEGER, "completion": INTEGER}),
        "messages": {
            "type": "array",
            "items": obj(
                {
                    "exchange": INTEGER,
                    "role": STRING,
                    "agent_id": STRING,
                    "turn": INTEGER,
                    "content": STRING,
                    "position": STRING,
                    "confidence": nullable(NUMBER),
                    "status": STRING,
                    "error": STRING,
                    "provider": STRING,
                    "model": STRING,
                    "temperature": nullable(NUMBER),
                    "personality": STRING,
                    "simulated": BOOLEAN,
                    "latency_ms": nullable(NUMBER),
                    "tokens": obj({"prompt": INTEGER, "completion": INTEGER}),
                    "created_at": DATETIME,
                }
            ),
        },
        "votes": {
            "type": "array",
            "items": obj(
                {
                    "exchange": INTEGER,
                    "voter": STRING,
                    "choice": STRING,
                    "confidence": nullable(NUMBER),
                    "reason": STRING,
                    "created_at": DATETIME,
                }
            ),
        },
        "consensus_results": {
            "type": "array",
            "items": obj(
                {
                    "exchange": INTEGER,
                    "method": STRING,
                    "reached": BOOLEAN,
                    "winner": STRING,
                    "answer": STRING,
                    "confidence": NUMBER,
                    "tie_break": STRING,
                    "tallies": FREE_OBJECT,
                    "dissent": {"type": "array", "items": {}},
                    "details": FREE_OBJECT,
                    "created_at": DATETIME,
                }
            ),
        },
    }
)

FEEDBACK = obj(
    {
        "conversation_id": UUID,
        "exchange": INTEGER,
        "correct": BOOLEAN,
        "note": STRING,
        "confidence": nullable(NUMBER),
        "created_at": DATETIME,
        "updated_at": DATETIME,
    }
)
