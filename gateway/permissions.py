"""DRF permissions `read`, `write`, `admin` over the authenticated Principal."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rest_framework.permissions import BasePermission
from rest_framework.request import Request

from gateway.auth import report_auth_failure
from gateway.net import client_ip
from gateway.principal import Principal

if TYPE_CHECKING:  # rest_framework.views imports this module while it loads
    from rest_framework.views import APIView


class _Needs(BasePermission):
    """Grants access to a Principal holding `permission` (admin implies all)."""

    permission = "read"

    @property
    def message(self) -> str:
        return f"This action needs the '{self.permission}' permission."

    def has_permission(self, request: Request, view: APIView) -> bool:
        principal = request.user
        if not isinstance(principal, Principal):
            # No credentials at all: DRF answers 401 once this returns False.
            report_auth_failure(
                "not_authenticated", "No credentials.", ip=client_ip(request), path=request.path
            )
            return False
        if principal.has(self.permission):
            return True
        from gateway.security import log_security_event

        log_security_event(
            "permission_denied",
            ip=client_ip(request),
            path=request.path,
            api_key=principal.api_key_id,
            needed=self.permission,
            principal=principal.owner,
        )
        return False


class CanRead(_Needs):
    permission = "read"


class CanWrite(_Needs):
    permission = "write"


class IsAdmin(_Needs):
    permission = "admin"
