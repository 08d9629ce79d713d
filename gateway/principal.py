"""Who is calling: the authenticated identity every view and consumer works with."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

PrincipalKind = Literal["api_key", "user", "anonymous"]


@dataclass(frozen=True)
class Principal:
    """An API key, a Django user (via JWT) or, with API_KEY_ENABLED=false, anonymous.

    `owner` is the stable identity stored on the conversations it creates
    ("key:<id>", "user:<id>", "anonymous"); `admin` implies every permission.
    """

    kind: PrincipalKind
    permissions: frozenset[str] = field(default_factory=frozenset)
    name: str = ""
    api_key_id: int | None = None
    user_id: int | None = None
    rate_limit_override: int | None = None

    # Django/DRF look for these on request.user.
    is_authenticated: bool = True
    is_active: bool = True
    is_anonymous: bool = False

    @property
    def owner(self) -> str:
        if self.kind == "api_key":
            return f"key:{self.api_key_id}"
        if self.kind == "user":
            return f"user:{self.user_id}"
        return "anonymous"

    @property
    def is_admin(self) -> bool:
        return "admin" in self.permissions

    def has(self, permission: str) -> bool:
        return self.is_admin or permission in self.permissions

    @property
    def pk(self) -> str:  # some DRF and Django helpers expect a pk
        return self.owner


def principal_of(request: Any) -> Principal:
    """The Principal of an authenticated DRF request (guaranteed by the permission classes)."""
    user = request.user
    assert isinstance(user, Principal), "a permission class must authenticate the request first"
    return user
