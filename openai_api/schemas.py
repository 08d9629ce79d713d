"""OpenAPI shapes of the OpenAI-compatible endpoints (documentation only)."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import OpenApiResponse

from conversations.schemas import BOOLEAN, FREE_OBJECT, INTEGER, NUMBER, STRING, UUID, nullable, obj
from conversations.serializers import MAX_MESSAGE_CHARS
from gateway.openapi import SAFE_NON_BLANK_PATTERN, SAFE_TEXT_PATTERN
from openai_api.parsing import REFUSED
from panels.specs import PANEL_ID_PATTERN

NULLABLE_STRING = nullable(STRING)
ERROR = obj(
    {"error": obj({"message": STRING, "type": STRING, "param": NULLABLE_STRING, "code": NULLABLE_STRING})}
)
# The gateway answers a blocked IP before any view, in the service's own error shape.
GATEWAY_ERROR = obj({"detail": STRING, "code": STRING}, required=["detail", "code"])
ERROR_DESCRIPTIONS = {
    400: "invalid_request_error: a malformed body or a refused parameter (`param` names it).",
    401: "invalid_api_key: no, or a bad, API key or JWT.",
    403: "permission_error: the key lacks the permission; or the IP is blocked.",
    404: "model_not_found: no such panel for this key.",
    413: "The request body is too large.",
    415: "The body is not JSON.",
    422: "budget_too_small: max_tokens cannot pay for one round of this panel.",
    429: "rate_limit_exceeded (the key's rate limit) or insufficient_quota (its daily quota); "
    "see Retry-After.",
    503: "agents_unavailable: the panel's providers could not answer; see Retry-After.",
}


def errors(*statuses: int) -> dict[int, OpenApiResponse]:
    """Error responses in OpenAI's shape (403 may also be the gateway's IP block)."""
    shape: dict[int, Any] = {s: ERROR for s in statuses}
    if 403 in shape:
        shape[403] = {"anyOf": [ERROR, GATEWAY_ERROR]}
    return {s: OpenApiResponse(shape[s], description=ERROR_DESCRIPTIONS.get(s, "")) for s in statuses}


MODEL = obj(
    {
        "id": STRING,
        "object": {"type": "string", "enum": ["model"]},
        "created": INTEGER,
        "owned_by": STRING,
        "description": STRING,
        "agents": {
            "type": "array",
            "items": obj({"agent_id": STRING, "provider": STRING, "model": STRING, "temperature": NUMBER}),
        },
        "turns": INTEGER,
        "strategy": STRING,
    }
)
MODEL_LIST = obj({"object": {"type": "string", "enum": ["list"]}, "data": {"type": "array", "items": MODEL}})

TEXT = {"type": "string", "pattern": SAFE_NON_BLANK_PATTERN, "maxLength": MAX_MESSAGE_CHARS}
TEXT_PART = obj({"type": {"type": "string", "enum": ["text"]}, "text": TEXT}, additionalProperties=False)
MESSAGE = obj(
    {
        "role": {"type": "string", "enum": ["system", "developer", "user", "assistant"]},
        "content": {"oneOf": [TEXT, {"type": "array", "items": TEXT_PART, "minItems": 1}]},
        "name": {**STRING, "maxLength": 256, "pattern": SAFE_TEXT_PATTERN},
    },
    required=["role", "content"],
    additionalProperties=False,
)
COMPLETION_REQUEST = {
    "application/json": obj(
        {
            "model": {**STRING, "pattern": PANEL_ID_PATTERN, "description": "A panel id (GET /v1/models)."},
            "messages": {"type": "array", "items": MESSAGE, "minItems": 1, "maxItems": 100},
            "stream": BOOLEAN,
            "stream_options": obj({"include_usage": BOOLEAN}, required=[], additionalProperties=False),
            "max_tokens": {**INTEGER, "minimum": 1, "description": "The request's token budget."},
            "max_completion_tokens": {**INTEGER, "minimum": 1, "description": "As max_tokens (wins)."},
            "temperature": {
                **NUMBER,
                "minimum": 0,
                "maximum": 2,
                "description": "Every agent's temperature.",
            },
            "user": {
                **STRING,
                "maxLength": 256,
                "pattern": SAFE_TEXT_PATTERN,
                "description": "Stored with the conversation.",
            },
            "n": {"type": "integer", "enum": [1]},
            "logprobs": {"type": "boolean", "enum": [False]},
            "response_format": obj(
                {"type": {"type": "string", "enum": ["text"]}}, additionalProperties=False
            ),
        },
        required=["model", "messages"],
        additionalProperties=False,
    )
}
USAGE = obj({"prompt_tokens": INTEGER, "completion_tokens": INTEGER, "total_tokens": INTEGER})
POLYAGENTS = obj(
    {
        "conversation_id": UUID,
        "exchange": INTEGER,
        "panel": STRING,
        "status": STRING,
        "turns_completed": INTEGER,
        "confidence": nullable(NUMBER),
        "agreement": nullable(NUMBER),
        "consensus": FREE_OBJECT,
        "votes": {"type": "array", "items": FREE_OBJECT},
        "agents": {"type": "array", "items": FREE_OBJECT},
        "cost_usd": NUMBER,
        "no_consensus_reason": NULLABLE_STRING,
        "stopped": NULLABLE_STRING,
    }
)
COMPLETION = obj(
    {
        "id": STRING,
        "object": {"type": "string", "enum": ["chat.completion"]},
        "created": INTEGER,
        "model": STRING,
        "system_fingerprint": NULLABLE_STRING,
        "choices": {
            "type": "array",
            "items": obj(
                {
                    "index": INTEGER,
                    "message": obj({"role": STRING, "content": STRING, "refusal": NULLABLE_STRING}),
                    "logprobs": {"nullable": True},
                    "finish_reason": {"type": "string", "enum": ["stop", "length"]},
                }
            ),
        },
        "usage": USAGE,
        "polyagents": POLYAGENTS,
    }
)
COMPLETIONS_DESCRIPTION = (
    "OpenAI's Chat Completions API over a panel. `model` is a panel id. The last user message (or, "
    "without one, the last message) is the question; system (and developer) messages and the "
    "earlier messages reach every agent's instructions. `max_tokens` / `max_completion_tokens` "
    "set the token budget; `temperature` replaces every agent's; `user` is stored. `n` (1 only), "
    "`logprobs` (false only), "
    "`response_format` (text only) and `stream_options.include_usage` are accepted; these are "
    "refused with a 400 naming them: " + ", ".join(f"`{name}`" for name in REFUSED) + ", non-text parts."
)
STREAM_DESCRIPTION = (
    "Not streamed: a chat.completion whose `polyagents` object carries the votes, confidence "
    "and cost. With `stream: true`, `text/event-stream` of chat.completion.chunk: a role chunk; "
    "the agents' turns as `delta.reasoning_content` (labelled with agent and turn, also in the "
    "chunk's `polyagents`); the vote, summarised; the answer as `delta.content`; the "
    "`finish_reason` chunk (with `polyagents`); with `stream_options.include_usage`, a usage chunk "
    "with empty `choices`; `data: [DONE]`. A client that disconnects cancels the run."
)


def require_bodies(result: dict[str, Any], generator: Any, request: Any, public: bool) -> dict[str, Any]:
    """Postprocessing hook: an operation marked `x-body-required` (a raw request schema, which
    drf-spectacular leaves optional) documents its body as required."""
    for path_item in result.get("paths", {}).values():
        for operation in path_item.values():
            if isinstance(operation, dict) and operation.pop("x-body-required", False):
                operation.setdefault("requestBody", {})["required"] = True
    return result
