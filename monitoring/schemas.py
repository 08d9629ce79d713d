"""OpenAPI descriptions and examples of the monitoring endpoints."""

from __future__ import annotations

from drf_spectacular.utils import OpenApiResponse

from conversations.schemas import DATETIME, FREE_OBJECT, INTEGER, NUMBER, STRING, nullable, obj

HEALTH_STATUS = {"type": "string", "enum": ["healthy", "degraded", "unhealthy", "unknown"]}
HEALTH_SCHEMA = obj(
    {
        "status": HEALTH_STATUS,
        "timestamp": DATETIME,
        "components": {
            "type": "object",
            "additionalProperties": obj(
                {"status": HEALTH_STATUS, "response_time_ms": NUMBER, "details": FREE_OBJECT}
            ),
        },
        "summary": {"type": "object", "additionalProperties": INTEGER},
    }
)
_PERCENTILES = obj(
    {"samples": INTEGER, "p50": nullable(NUMBER), "p95": nullable(NUMBER), "p99": nullable(NUMBER)},
    required=["samples"],
)
STATISTICS_SCHEMA = obj(
    {
        "conversations": obj(
            {
                "total_conversations": INTEGER,
                "conversations_today": INTEGER,
                "average_duration": nullable(NUMBER),
                "success_rate": nullable(NUMBER),
            },
            required=[],
        ),
        "agents": obj(
            {
                "total_messages": INTEGER,
                "average_response_time": nullable(NUMBER),
                "model_distribution": {"type": "object", "additionalProperties": NUMBER},
            },
            required=[],
        ),
        "errors": FREE_OBJECT,
        "circuit_breakers": {"type": "object", "additionalProperties": FREE_OBJECT},
        "latency": obj(
            {"agent_response_seconds": _PERCENTILES, "conversation_duration_seconds": _PERCENTILES}
        ),
        "generated_at": STRING,
    }
)

HEALTH_EXAMPLE = {
    "status": "healthy",
    "timestamp": "2026-01-01T12:00:00Z",
    "components": {
        "redis": {
            "status": "healthy",
            "response_time_ms": 1.2,
            "details": {"memory_usage_bytes": 1048576, "connected_clients": 5},
        },
        "postgresql": {
            "status": "healthy",
            "response_time_ms": 3.5,
            "details": {"database_size_bytes": 52428800, "active_connections": 3},
        },
        "gemini_api": {
            "status": "healthy",
            "response_time_ms": 300.1,
            "details": {"available_models": 10, "api_key_configured": True},
        },
    },
    "summary": {"total_components": 3, "healthy": 3, "degraded": 0, "unhealthy": 0, "unknown": 0},
}
HEALTH_RESPONSE = OpenApiResponse(
    response=HEALTH_SCHEMA,
    description="Overall status, one entry per component, and counts by status (503 when unhealthy).",
)

STATISTICS_EXAMPLE = {
    "conversations": {
        "total_conversations": 1250,
        "conversations_today": 45,
        "average_duration": 3.2,
        "success_rate": 0.96,
    },
    "agents": {
        "total_messages": 8750,
        "average_response_time": 1.8,
        "model_distribution": {"gemini-2.5-flash": 0.7, "gemini-2.5-pro": 0.3},
    },
    "errors": {"chat_conversation": {"total_24h": 12, "rate_1h": 0.05}},
    "circuit_breakers": {
        "gemini:gemini-2.5-flash": {"state": "closed", "failure_count": 0, "last_failure_time": None}
    },
    "latency": {
        "agent_response_seconds": {"samples": 8750, "p50": 1.2, "p95": 3.9, "p99": 6.1},
        "conversation_duration_seconds": {"samples": 1200, "p50": 2.9, "p95": 7.5, "p99": 12.0},
    },
    "generated_at": "2026-01-01T12:00:00Z",
}
STATISTICS_RESPONSE = OpenApiResponse(response=STATISTICS_SCHEMA, description="System statistics.")
