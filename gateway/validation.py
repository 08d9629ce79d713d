"""Reusable input checks: safe text fields and UUID checks for every serializer and view."""

from __future__ import annotations

import math
import unicodedata
import uuid
from typing import Any

from rest_framework import serializers

ALLOWED_CONTROL = frozenset("\n\r\t")


def control_characters(text: str) -> list[str]:
    """Control characters in `text` other than newline, carriage return and tab, as U+XXXX."""
    found = {c for c in text if c not in ALLOWED_CONTROL and unicodedata.category(c) == "Cc"}
    return sorted(f"U+{ord(c):04X}" for c in found)


class SafeCharField(serializers.CharField):
    """A CharField that strips, enforces a mandatory max_length and refuses control characters."""

    default_error_messages = {
        "control_characters": "Control characters are not allowed (found {chars}).",
    }

    def __init__(self, *, max_length: int, **kwargs: Any) -> None:
        if max_length is None or max_length <= 0:
            raise ValueError("SafeCharField needs a positive max_length")
        kwargs.setdefault("trim_whitespace", True)
        super().__init__(max_length=max_length, **kwargs)

    def to_internal_value(self, data: Any) -> str:
        # Only strings: numbers, booleans, lists and objects are refused, not coerced to text.
        if not isinstance(data, str):
            self.fail("invalid")
        value = super().to_internal_value(data)
        bad = control_characters(value)
        if bad:
            self.fail("control_characters", chars=", ".join(bad))
        return value


class StrictUUIDField(serializers.UUIDField):
    """A UUID given as text in its usual 36-character form; numbers and other spellings are refused."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("format", "hex_verbose")
        super().__init__(**kwargs)

    def to_internal_value(self, data: Any) -> Any:
        if not isinstance(data, str) or len(data) != 36:
            self.fail("invalid", value=data)
        return super().to_internal_value(data)


class StrictPositiveNumberField(serializers.FloatField):
    """A JSON number greater than 0 and finite; strings, booleans, NaN and infinities are refused."""

    default_error_messages = {"positive": "Must be a number greater than 0."}

    def to_internal_value(self, data: Any) -> float:
        if isinstance(data, bool) or not isinstance(data, int | float):
            self.fail("invalid")
        if not math.isfinite(data):
            self.fail("invalid")
        if data <= 0:
            self.fail("positive")
        return super().to_internal_value(data)


class StrictPositiveIntegerField(serializers.IntegerField):
    """A JSON integer greater than 0; strings, booleans and fractions are refused."""

    default_error_messages = {"positive": "Must be an integer greater than 0."}

    def to_internal_value(self, data: Any) -> int:
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("invalid")
        if data <= 0:
            self.fail("positive")
        return super().to_internal_value(data)


class StrictSerializer(serializers.Serializer):
    """Refuses fields it does not know, so a typo is an error rather than a silent default."""

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if isinstance(self.initial_data, dict):
            unknown = sorted(set(self.initial_data) - set(self.fields))
            if unknown:
                raise serializers.ValidationError({name: ["Unknown field."] for name in unknown})
        return attrs


def parse_uuid(value: object, *, field: str = "id") -> uuid.UUID:
    """The UUID in `value`, or a ValidationError naming `field`."""
    if isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(str(value))
    except (TypeError, ValueError):
        raise serializers.ValidationError({field: [f"{str(value)[:64]!r} is not a valid UUID."]}) from None


def query_params(serializer_class: type[serializers.Serializer], request: Any) -> dict[str, Any]:
    """Validate a request's query string with a serializer; invalid values answer 400 naming the field."""
    serializer = serializer_class(data=request.query_params.dict())
    serializer.is_valid(raise_exception=True)
    return dict(serializer.validated_data)
