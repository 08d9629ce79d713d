"""One JSON error shape for the whole service: `{"detail", "code", "errors"?}`."""

from __future__ import annotations

import logging
from typing import Any

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import RequestDataTooBig, SuspiciousOperation
from django.http import Http404, HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from rest_framework import exceptions, status
from rest_framework.response import Response

logger = logging.getLogger("polyagents.errors")


def error_body(code: str, detail: str, errors: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """The error body every endpoint answers with."""
    body: dict[str, Any] = {"detail": detail, "code": code}
    if errors is not None:
        body["errors"] = errors
    return body


def error_response(
    status: int, code: str, detail: str, errors: dict[str, list[str]] | None = None
) -> JsonResponse:
    """A JSON error for plain Django views (outside DRF)."""
    return JsonResponse(error_body(code, detail, errors), status=status)


class PayloadTooLarge(exceptions.APIException):
    """413: the request body exceeds DATA_UPLOAD_MAX_MEMORY_SIZE."""

    status_code = 413
    default_detail = "Request body too large."
    default_code = "payload_too_large"


def _flatten(detail: Any) -> list[str]:
    """Messages of one field, nested lists and dicts flattened to strings."""
    if isinstance(detail, dict):
        return [f"{key}: {msg}" for key, value in detail.items() for msg in _flatten(value)]
    if isinstance(detail, list | tuple):
        return [msg for item in detail for msg in _flatten(item)]
    return [str(detail)]


def validation_errors(exc: exceptions.ValidationError) -> dict[str, list[str]]:
    """Field name to messages; errors not tied to a field go under `non_field_errors`."""
    if isinstance(exc.detail, dict):
        return {str(field): _flatten(value) for field, value in exc.detail.items()}
    return {"non_field_errors": _flatten(exc.detail)}


def _code_of(exc: exceptions.APIException) -> str:
    codes = exc.get_codes()
    if isinstance(codes, str):
        return codes
    if isinstance(codes, list) and len(codes) == 1 and isinstance(codes[0], str):
        return codes[0]
    return str(exc.default_code)


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response:
    """DRF EXCEPTION_HANDLER: every error, expected or not, becomes the JSON error shape."""
    # Imported here: rest_framework.views loads the authentication classes, which load this module.
    from rest_framework.views import set_rollback

    if isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, DjangoPermissionDenied):
        exc = exceptions.PermissionDenied()
    elif isinstance(exc, RequestDataTooBig):
        exc = PayloadTooLarge()
    elif isinstance(exc, SuspiciousOperation):
        exc = exceptions.ParseError("Bad request.", code="bad_request")

    if not isinstance(exc, exceptions.APIException):
        view = context.get("view")
        logger.exception("unhandled error in %s", type(view).__name__ if view else "view", exc_info=exc)
        set_rollback()
        return Response(
            error_body("server_error", "Internal server error."),
            status=status.HTTP_500_INTERNAL_SERVER_ERROR,
        )

    headers: dict[str, str] = {}
    auth_header = getattr(exc, "auth_header", None)
    if auth_header:
        headers["WWW-Authenticate"] = auth_header
    wait = getattr(exc, "wait", None)
    if wait is not None:
        headers["Retry-After"] = str(max(1, int(-(-wait // 1))))
    # Exceptions may carry extra headers (rate-limit headers, for instance).
    extra = getattr(exc, "headers", None)
    if isinstance(extra, dict):
        headers.update({str(k): str(v) for k, v in extra.items()})

    if isinstance(exc, exceptions.ValidationError):
        errors = validation_errors(exc)
        fields = ", ".join(errors)
        body = error_body("invalid", f"Invalid input: {fields}.", errors)
    else:
        detail = exc.detail if isinstance(exc.detail, str) else "; ".join(_flatten(exc.detail))
        body = error_body(_code_of(exc), str(detail))
    set_rollback()
    return Response(body, status=exc.status_code, headers=headers)


def handler404(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    """JSON 404 for paths no route matches."""
    return error_response(404, "not_found", f"No route for {request.path}.")


@csrf_exempt  # a POST to an unknown path is a JSON 404, not Django's HTML CSRF page
def not_found(request: HttpRequest, *args: object, **kwargs: object) -> JsonResponse:
    """Catch-all route: JSON 404 even in DEBUG, where Django would render its HTML 404 page."""
    return handler404(request)


def handler500(request: HttpRequest) -> JsonResponse:
    """JSON 500 for errors outside DRF views."""
    return error_response(500, "server_error", "Internal server error.")


def handler400(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    """JSON 400 for requests Django itself refuses (bad host, malformed body)."""
    return error_response(400, "bad_request", "Bad request.")


def handler403(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    """JSON 403 for Django's own refusals (CSRF on non-API views, for instance)."""
    return error_response(403, "permission_denied", "You do not have permission to perform this action.")
