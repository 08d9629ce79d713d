"""The OpenAPI contract of every endpoint: its error responses, request constraints and links.

Errors are documented once, here, rather than on each view:

- `ApiAutoSchema` (DRF's DEFAULT_SCHEMA_CLASS) adds to every operation the errors the
  gateway can answer before the view runs: 403 (`ip_blocked` on every path, and missing
  permission), 401 when the view needs credentials, 400 when it reads a body or a query
  string, 413 when it reads a body, 429 when it is rate limited, 404 when its path has a
  parameter. Each is `{"detail", "code", "errors"?}` (`ErrorSerializer`).
- A view adds the refusals of its own logic with `errors(409, 503)` in its `responses`,
  or lists them in an `openapi_errors` attribute; an explicit response always wins.
- `links(...)` (in a view's `extend_schema(extensions=…)`) declares OpenAPI links from a
  response field to another operation's parameter, so clients and schemathesis' stateful
  phase can follow ids; `add_links` (a postprocessing hook) moves them into the responses.

A new endpoint inherits the right error responses by declaring its permission,
throttle, request serializer and query serializer; nothing else needs listing.
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.extensions import OpenApiSerializerExtension, OpenApiSerializerFieldExtension
from drf_spectacular.openapi import AutoSchema
from drf_spectacular.plumbing import is_serializer
from drf_spectacular.utils import OpenApiResponse
from rest_framework import serializers
from rest_framework.permissions import AllowAny

# Strings SafeCharField accepts: no control characters but newline, carriage return and tab
# (unicodedata category Cc is U+0000–U+001F and U+007F–U+009F).
_SAFE_CHAR = r"[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]"
SAFE_TEXT_PATTERN = rf"^{_SAFE_CHAR}*$"
# The same, with at least one character that is not whitespace (the value is stripped first).
SAFE_NON_BLANK_PATTERN = rf"^{_SAFE_CHAR}*[^\s\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]{_SAFE_CHAR}*$"

ERROR_DESCRIPTIONS: dict[int, str] = {
    400: "Invalid input: `errors` maps each field (or `non_field_errors`) to its messages.",
    401: "Missing, unknown, expired or revoked credentials.",
    403: "Not allowed: the credentials lack the permission (`permission_denied`), or the client IP "
    "is blocked after repeated authentication failures (`ip_blocked`).",
    404: "Not found, or not yours.",
    409: "Conflicts with the current state.",
    413: "Request body too large.",
    429: "Rate limited (`Retry-After` says when to retry).",
    503: "A dependency is unavailable (`Retry-After` says when to retry).",
}


class ErrorSerializer(serializers.Serializer):
    """The error body of every endpoint (see gateway.errors.error_body)."""

    detail = serializers.CharField(help_text="For people.")
    code = serializers.CharField(help_text="For programs, e.g. `invalid`, `not_authenticated`, `ip_blocked`.")
    # (the metaclass turns it into a field: Serializer.errors stays the validation errors)
    errors = serializers.DictField(  # type: ignore[assignment]
        child=serializers.ListField(child=serializers.CharField()),
        required=False,
        help_text="Only on 400 validation errors: field name to messages.",
    )

    class Meta:
        ref_name = "Error"


def error(status: int, description: str | None = None, response: Any = ErrorSerializer) -> OpenApiResponse:
    """One documented error response."""
    return OpenApiResponse(response=response, description=description or ERROR_DESCRIPTIONS.get(status, ""))


def errors(*statuses: int) -> dict[int, OpenApiResponse]:
    """Error responses to merge into an `extend_schema(responses=…)`: `{200: X, **errors(404, 409)}`."""
    return {status: error(status) for status in statuses}


def links(**targets: tuple[str, dict[str, str]]) -> dict[str, Any]:
    """`extend_schema(extensions=links(GetConversation=("conversations_detail", {...})))`."""
    return {
        "x-links": {
            name: {"operationId": operation_id, "parameters": parameters}
            for name, (operation_id, parameters) in targets.items()
        }
    }


class ApiAutoSchema(AutoSchema):
    """drf-spectacular's AutoSchema plus the error responses every operation can give."""

    def _needs_credentials(self) -> bool:
        permissions = self.view.get_permissions()
        return bool(permissions) and not all(isinstance(p, AllowAny) for p in permissions)

    def _reads_body(self) -> bool:
        return self.method in ("POST", "PUT", "PATCH") and self.get_request_serializer() is not None

    def _reads_query(self) -> bool:
        # A serializer among the parameters is a query-string serializer (see query_params).
        return any(
            getattr(p, "location", None) == "query" or is_serializer(p)
            for p in self.get_override_parameters()
        )

    def automatic_errors(self) -> list[int]:
        codes = [403]  # ip_blocked answers every path; permission_denied every protected one
        if self._needs_credentials():
            codes.append(401)
        if self._reads_body() or self._reads_query():
            codes.append(400)
        if self._reads_body():
            codes.append(413)
        if "{" in self.path:
            codes.append(404)
        if self.view.get_throttles():
            codes.append(429)
        codes.extend(getattr(self.view, "openapi_errors", ()))
        return sorted(set(codes))

    def _get_request_for_media_type(self, serializer: Any, direction: Any = "request") -> Any:
        # A body whose required fields are alternatives (a oneOf) is still a required body.
        schema, required = super()._get_request_for_media_type(serializer, direction)
        return schema, required or bool(getattr(serializer, "openapi_body_required", False))

    def _get_response_bodies(self, direction: Any = "response") -> dict[str, Any]:
        responses: dict[str, Any] = super()._get_response_bodies(direction)
        for code in self.automatic_errors():
            key = str(code)
            if key not in responses:
                responses[key] = self._get_response_for_code(error(code), key, direction=direction)
        return dict(sorted(responses.items()))


def add_links(result: dict[str, Any], generator: Any, request: Any, public: bool) -> dict[str, Any]:
    """Postprocessing hook: move each operation's `x-links` into its 2xx responses as OpenAPI links."""
    for path_item in result.get("paths", {}).values():
        for operation in path_item.values():
            if not isinstance(operation, dict):
                continue
            declared = operation.pop("x-links", None)
            if not declared:
                continue
            for status, response in operation.get("responses", {}).items():
                if str(status).startswith("2"):
                    response["links"] = declared
    return result


class SafeCharFieldExtension(OpenApiSerializerFieldExtension):
    """SafeCharField as a pattern: no control characters, and non-blank unless blank is allowed."""

    target_class = "gateway.validation.SafeCharField"
    match_subclasses = True

    def map_serializer_field(self, auto_schema: Any, direction: Any) -> Any:
        schema = auto_schema._map_serializer_field(self.target, direction, bypass_extensions=True)
        if direction == "request":
            schema["pattern"] = SAFE_TEXT_PATTERN if self.target.allow_blank else SAFE_NON_BLANK_PATTERN
        return schema


class StrictSerializerExtension(OpenApiSerializerExtension):
    """A StrictSerializer refuses unknown fields: its request schema says `additionalProperties: false`."""

    target_class = "gateway.validation.StrictSerializer"
    match_subclasses = True

    def map_serializer(self, auto_schema: Any, direction: Any) -> Any:
        schema = auto_schema._map_basic_serializer(self.target, direction)
        if direction == "request":
            schema["additionalProperties"] = False
        return schema


class TokenRequestExtension(OpenApiSerializerExtension):
    """POST /auth/token takes `api_key`, or `username` and `password`, never both: a `oneOf`."""

    target_class = "gateway.serializers.TokenRequestSerializer"

    def map_serializer(self, auto_schema: Any, direction: Any) -> Any:
        fields = auto_schema._map_basic_serializer(self.target, direction)["properties"]
        for name in ("username", "password"):
            fields[name]["minLength"] = 1
        return {
            "oneOf": [
                {
                    "type": "object",
                    "title": "With an API key",
                    "properties": {"api_key": fields["api_key"]},
                    "required": ["api_key"],
                    "not": {"anyOf": [{"required": ["username"]}, {"required": ["password"]}]},
                },
                {
                    "type": "object",
                    "title": "With a username and password",
                    "properties": {"username": fields["username"], "password": fields["password"]},
                    "required": ["username", "password"],
                    "not": {"required": ["api_key"]},
                },
            ]
        }


class StrictPositiveNumberExtension(OpenApiSerializerFieldExtension):
    """StrictPositiveNumberField: a number strictly greater than 0 (OpenAPI 3.0's exclusiveMinimum)."""

    target_class = "gateway.validation.StrictPositiveNumberField"

    def map_serializer_field(self, auto_schema: Any, direction: Any) -> Any:
        schema = auto_schema._map_serializer_field(self.target, direction, bypass_extensions=True)
        schema.update({"minimum": 0, "exclusiveMinimum": True})
        return schema


class StrictPositiveIntegerExtension(OpenApiSerializerFieldExtension):
    """StrictPositiveIntegerField: an integer of at least 1."""

    target_class = "gateway.validation.StrictPositiveIntegerField"

    def map_serializer_field(self, auto_schema: Any, direction: Any) -> Any:
        schema = auto_schema._map_serializer_field(self.target, direction, bypass_extensions=True)
        schema["minimum"] = 1
        return schema
