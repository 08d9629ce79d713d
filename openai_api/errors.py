"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with the
statuses the OpenAI SDKs turn into their exception classes (401 AuthenticationError, 403
PermissionDeniedError, 404 NotFoundError, 400 BadRequestError, 429 RateLimitError, 5xx)."""

from __future__ import annotations

from typing import Any

from rest_framework.response import Response

from gateway.errors import exception_handler

# Our error codes (gateway.errors' shape) that OpenAI names otherwise.
CODES = {
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", "permission_denied"),
    404: ("invalid_request_error", "not_found"),
    429: ("requests", "rate_limit_exceeded"),
    503: ("server_error", "service_unavailable"),
}


def openai_error(
    status: int,
    message: str,
    *,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return Response(body, status=status, headers=headers)


def openai_exception_handler(exc: Exception, context: dict[str, Any]) -> Response:
    """The service's own handler (every guard's refusal, parse errors), reshaped."""
    response = exception_handler(exc, context)
    body: dict[str, Any] = response.data if isinstance(response.data, dict) else {}
    status = response.status_code
    kind, code = CODES.get(status, ("server_error" if status >= 500 else "invalid_request_error", None))
    code = code if status in (401, 403, 404, 429) else body.get("code") or code
    message = str(body.get("detail") or "Error.")
    errors = body.get("errors")
    param = next(iter(errors), None) if isinstance(errors, dict) else None
    if isinstance(errors, dict):
        message = "; ".join(f"{name}: {' '.join(msgs)}" for name, msgs in errors.items())
    reshaped = openai_error(status, message, type=kind, param=param, code=code)
    for name, value in response.items():
        if name.lower() not in ("content-type", "content-length"):
            reshaped[name] = value
    return reshaped
