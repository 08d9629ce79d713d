"""Auth endpoints (token, refresh, revoke, whoami) and the admin key-management API."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import authenticate
from django.db.models import Model
from django.shortcuts import get_object_or_404
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers, status
from rest_framework.exceptions import APIException
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from gateway import quota
from gateway.auth import AuthError, report_auth_failure
from gateway.keys import KeyRejected, key_authenticate, key_create, key_revoke, key_rotate
from gateway.models import ApiKey
from gateway.net import client_ip
from gateway.openapi import errors
from gateway.permissions import CanRead, IsAdmin
from gateway.principal import Principal
from gateway.security import log_key_event
from gateway.serializers import (
    ApiKeyCreatedSerializer,
    ApiKeyCreateSerializer,
    ApiKeySerializer,
    RefreshSerializer,
    RotateSerializer,
    TokenPairSerializer,
    TokenRequestSerializer,
    WhoAmISerializer,
)
from gateway.throttling import TokenEndpointThrottle
from gateway.tokens import TokenRejected, issue_for_key, issue_for_user, refresh_revoke, refresh_rotate


class Unauthorized(APIException):
    """401 from an endpoint that takes credentials in its body (no Bearer involved)."""

    status_code = status.HTTP_401_UNAUTHORIZED
    default_code = "invalid_credentials"

    def __init__(self, error: AuthError) -> None:
        super().__init__(detail=error.detail, code=error.code)
        self.headers = {"WWW-Authenticate": error.www_authenticate}


def _reject(request: Request, code: str, detail: str, api_key: Model | None = None) -> Unauthorized:
    report_auth_failure(
        code,
        detail,
        ip=client_ip(request),
        path=request.path,
        api_key=api_key if isinstance(api_key, ApiKey) else None,
    )
    return Unauthorized(AuthError(code, detail))


class _PublicTokenView(APIView):
    """Open to all (credentials travel in the body), limited per IP."""

    authentication_classes: list[Any] = []
    permission_classes = [AllowAny]
    throttle_classes = [TokenEndpointThrottle]


class TokenView(_PublicTokenView):
    """POST /auth/token: an API key, or a Django user's credentials, for a JWT pair."""

    @extend_schema(request=TokenRequestSerializer, responses={200: TokenPairSerializer, **errors(401)})
    def post(self, request: Request) -> Response:
        body = TokenRequestSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        if "api_key" in data:
            try:
                key = key_authenticate(data["api_key"])
            except KeyRejected as exc:
                raise _reject(request, exc.code, exc.detail, exc.key) from None
            return Response(issue_for_key(key).as_response())
        user = authenticate(request._request, username=data["username"], password=data["password"])
        if user is None:
            raise _reject(request, "invalid_credentials", "Unknown user or wrong password.")
        return Response(issue_for_user(user).as_response())


class TokenRefreshView(_PublicTokenView):
    """POST /auth/token/refresh: a new pair; the old refresh token is blacklisted."""

    @extend_schema(request=RefreshSerializer, responses={200: TokenPairSerializer, **errors(401)})
    def post(self, request: Request) -> Response:
        body = RefreshSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        try:
            pair = refresh_rotate(body.validated_data["refresh"])
        except TokenRejected as exc:
            raise _reject(request, exc.code, exc.detail, exc.key) from None
        return Response(pair.as_response())


class TokenRevokeView(_PublicTokenView):
    """POST /auth/token/revoke: blacklist a refresh token."""

    @extend_schema(
        request=RefreshSerializer,
        responses={
            200: inline_serializer("TokenRevoked", {"revoked": serializers.BooleanField()}),
            **errors(401),
        },
    )
    def post(self, request: Request) -> Response:
        body = RefreshSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        try:
            refresh_revoke(body.validated_data["refresh"])
        except TokenRejected as exc:
            raise _reject(request, exc.code, exc.detail, exc.key) from None
        return Response({"revoked": True})


class WhoAmIView(APIView):
    """GET /auth/whoami: the caller's principal."""

    permission_classes = [CanRead]

    @extend_schema(responses={200: WhoAmISerializer})
    def get(self, request: Request) -> Response:
        principal: Principal = request.user  # type: ignore[assignment]
        prefix = None
        if principal.api_key_id is not None:
            prefix = ApiKey.objects.filter(pk=principal.api_key_id).values_list("prefix", flat=True).first()
        return Response(
            {
                "kind": principal.kind,
                "name": principal.name,
                "owner": principal.owner,
                "permissions": sorted(principal.permissions),
                "key_prefix": prefix,
                "rate_limit_override": principal.rate_limit_override,
                "quota": state.to_dict()
                if (state := quota.usage(principal.api_key_id)) is not None
                else None,
            }
        )


def _admin(request: Request) -> Principal:
    return request.user  # type: ignore[return-value]


class KeyListView(APIView):
    """GET /auth/keys (list, no secrets) and POST /auth/keys (create; the key is shown once)."""

    permission_classes = [IsAdmin]

    @extend_schema(responses={200: inline_serializer("ApiKeyList", {"keys": ApiKeySerializer(many=True)})})
    def get(self, request: Request) -> Response:
        keys = ApiKey.objects.order_by("-created_at", "-id")[:1000]
        return Response({"keys": ApiKeySerializer(keys, many=True).data})

    @extend_schema(request=ApiKeyCreateSerializer, responses={201: ApiKeyCreatedSerializer})
    def post(self, request: Request) -> Response:
        body = ApiKeyCreateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        issued = key_create(**body.validated_data)
        log_key_event("key_created", request, issued.key, by=_admin(request).owner)
        body_out = {**ApiKeySerializer(issued.key).data, "key": issued.raw}
        return Response(body_out, status=status.HTTP_201_CREATED)


class KeyRevokeView(APIView):
    """POST /auth/keys/{id}/revoke."""

    permission_classes = [IsAdmin]

    @extend_schema(request=None, responses={200: ApiKeySerializer})
    def post(self, request: Request, key_id: int) -> Response:
        key = key_revoke(key=get_object_or_404(ApiKey, pk=key_id))
        log_key_event("key_revoked", request, key, by=_admin(request).owner)
        return Response(ApiKeySerializer(key).data)


class KeyRotateView(APIView):
    """POST /auth/keys/{id}/rotate: a new key; the old one works until its grace period ends."""

    permission_classes = [IsAdmin]

    @extend_schema(request=RotateSerializer, responses={201: ApiKeyCreatedSerializer, **errors(409)})
    def post(self, request: Request, key_id: int) -> Response:
        body = RotateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        old = get_object_or_404(ApiKey, pk=key_id)
        if old.revoked_at is not None:
            return Response(
                {"detail": "A revoked key cannot be rotated.", "code": "key_revoked"},
                status=status.HTTP_409_CONFLICT,
            )
        issued = key_rotate(key=old, grace_seconds=body.validated_data.get("grace_seconds"))
        log_key_event("key_rotated", request, old, by=_admin(request).owner, new_key=issued.key.pk)
        return Response(
            {**ApiKeySerializer(issued.key).data, "key": issued.raw, "replaces": ApiKeySerializer(old).data},
            status=status.HTTP_201_CREATED,
        )
