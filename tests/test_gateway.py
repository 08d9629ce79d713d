"""Gateway: authentication (keys, JWT), permissions, key services, token endpoints, errors."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import jwt
import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.urls import include, path
from django.utils import timezone
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.test import APIClient
from rest_framework.views import APIView
from rest_framework_simplejwt.tokens import AccessToken

from gateway.auth import AuthError, aauthenticate_bearer, authenticate_bearer
from gateway.keys import key_authenticate, key_create, key_revoke, key_rotate, keys_load_defaults
from gateway.models import ApiKey, SecurityEvent, hash_key
from gateway.permissions import CanWrite
from polyagents_site.config import ApiKeySpec
from tests.conftest import requires_postgres


class WriteOnlyView(APIView):
    """A tiny endpoint guarded by CanWrite, for the permission matrix."""

    permission_classes = [CanWrite]

    def post(self, request: Request) -> Response:
        return Response({"ok": True})


class BoomView(APIView):
    """An endpoint that fails unexpectedly."""

    permission_classes: list[Any] = []

    def get(self, request: Request) -> Response:
        raise RuntimeError("boom")


# This module is also the URLconf of its tests: the gateway routes, the admin and the two views above.
urlpatterns = [
    path("", include("gateway.urls")),
    path("write-only", WriteOnlyView.as_view()),
    path("boom", BoomView.as_view()),
]
pytestmark = [pytest.mark.urls("tests.test_gateway"), pytest.mark.django_db]

MakeKey = Callable[..., tuple[ApiKey, str]]


@pytest.fixture(autouse=True)
def _no_rate_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests send many requests; the token buckets are tested in test_ratelimit."""
    monkeypatch.setattr(settings.CONFIG, "RATE_LIMITING_ENABLED", False)


def bearer(token: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    return client


def assert_401(response: Any, code: str, *, invalid_token: bool = True) -> None:
    assert response.status_code == 401, response.content
    body = response.json()
    assert body["code"] == code
    assert body["detail"]
    assert "errors" not in body
    header = response["WWW-Authenticate"]
    assert header.startswith('Bearer realm="polyagents"')
    assert ('error="invalid_token"' in header) is invalid_token


def auth_failures() -> int:
    return SecurityEvent.objects.filter(kind="auth_failed").count()


def access_token_for(raw_key: str) -> str:
    """Exchange a raw API key for an access token through the token endpoint."""
    return APIClient().post("/auth/token", {"api_key": raw_key}, format="json").json()["access"]


@pytest.fixture
def key_of(make_key: MakeKey) -> Callable[..., tuple[ApiKey, str]]:
    """make_key taking the permissions as positional arguments."""

    def _make(*permissions: str, **fields: Any) -> tuple[ApiKey, str]:
        return make_key(list(permissions) or ["read"], **fields)

    return _make


def forged_token(**claims: Any) -> str:
    """A well-formed access token signed with someone else's secret."""
    payload = {
        "token_type": "access",
        "exp": timezone.now() + timedelta(minutes=5),
        "jti": "x" * 32,
        "kind": "api_key",
        "key_id": 1,
        "permissions": ["read", "write", "admin"],
        **claims,
    }
    return jwt.encode(payload, "not-the-server-secret-" + "x" * 20, algorithm="HS256")


class TestAuthentication:
    def test_valid_key_authenticates(self, key_of: Callable[..., tuple[ApiKey, str]]) -> None:
        row, raw = key_of("read")
        response = bearer(raw).get("/auth/whoami")
        assert response.status_code == 200
        body = response.json()
        assert body["kind"] == "api_key"
        assert body["key_prefix"] == row.prefix
        assert body["permissions"] == ["read"]
        assert body["owner"] == f"key:{row.pk}"

    def test_missing_header_is_401_with_realm(self) -> None:
        response = APIClient().get("/auth/whoami")
        assert_401(response, "not_authenticated", invalid_token=False)
        assert auth_failures() == 1

    @pytest.mark.parametrize("header", ["Basic dXNlcjpwYXNz", "Token abc", "pk_raw_key_without_scheme"])
    def test_wrong_scheme_is_401(self, header: str) -> None:
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=header)
        response = client.get("/auth/whoami")
        assert_401(response, "invalid_request", invalid_token=False)
        assert 'error="invalid_request"' in response["WWW-Authenticate"]
        assert auth_failures() == 1

    @pytest.mark.parametrize("header", ["Bearer", "Bearer    "])
    def test_empty_token_is_401(self, header: str) -> None:
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=header)
        response = client.get("/auth/whoami")
        assert_401(response, "invalid_request", invalid_token=False)

    def test_unknown_key_is_401(self, key_of: Callable[..., tuple[ApiKey, str]]) -> None:
        _, raw = key_of("read")
        response = bearer(raw[:-1] + ("A" if raw[-1] != "A" else "B")).get("/auth/whoami")
        assert_401(response, "invalid_token")
        event = SecurityEvent.objects.get(kind="auth_failed")
        assert event.ip == "127.0.0.1"
        assert event.path == "/auth/whoami"
        assert event.detail["reason"] == "invalid_token"

    def test_revoked_key_is_401(self, key_of: Callable[..., tuple[ApiKey, str]]) -> None:
        row, raw = key_of("read", revoked_at=timezone.now())
        assert_401(bearer(raw).get("/auth/whoami"), "key_revoked")
        assert SecurityEvent.objects.get(kind="auth_failed").api_key_id == row.pk

    def test_expired_key_is_401(self, key_of: Callable[..., tuple[ApiKey, str]]) -> None:
        _, raw = key_of("read", expires_at=timezone.now() - timedelta(seconds=1))
        assert_401(bearer(raw).get("/auth/whoami"), "key_expired")

    def test_key_not_yet_expired_works(self, key_of: Callable[..., tuple[ApiKey, str]]) -> None:
        _, raw = key_of("read", expires_at=timezone.now() + timedelta(hours=1))
        assert bearer(raw).get("/auth/whoami").status_code == 200

    def test_rotated_key_works_during_grace(self, key_of: Callable[..., tuple[ApiKey, str]]) -> None:
        row, old_raw = key_of("read", "write")
        issued = key_rotate(key=row, grace_seconds=3600)
        assert bearer(old_raw).get("/auth/whoami").status_code == 200
        new = bearer(issued.raw).get("/auth/whoami")
        assert new.status_code == 200
        assert new.json()["permissions"] == ["read", "write"]

    def test_rotated_key_refused_after_grace(self, key_of: Callable[..., tuple[ApiKey, str]]) -> None:
        row, old_raw = key_of("read")
        issued = key_rotate(key=row, grace_seconds=0)
        assert_401(bearer(old_raw).get("/auth/whoami"), "key_rotated")
        assert bearer(issued.raw).get("/auth/whoami").status_code == 200

    def test_rotation_grace_ends_in_time(self, key_of: Callable[..., tuple[ApiKey, str]]) -> None:
        row, old_raw = key_of("read")
        before = timezone.now()
        key_rotate(key=row, grace_seconds=600)
        row.refresh_from_db()
        assert row.replaced_by is not None
        assert row.expires_at is not None
        assert before + timedelta(seconds=599) <= row.expires_at <= timezone.now() + timedelta(seconds=601)
        # Move the end of the grace period into the past: the old key stops working.
        ApiKey.objects.filter(pk=row.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
        assert_401(bearer(old_raw).get("/auth/whoami"), "key_rotated")

    def test_bad_jwt_signature_is_401(self, key_of: Callable[..., tuple[ApiKey, str]]) -> None:
        row, _ = key_of("read")
        assert_401(bearer(forged_token(key_id=row.pk)).get("/auth/whoami"), "invalid_token")

    def test_tampered_jwt_payload_is_401(self, key_of: Callable[..., tuple[ApiKey, str]]) -> None:
        row, raw = key_of("read")
        token = access_token_for(raw)
        head, _, sig = token.split(".")
        forged_body = jwt.utils.base64url_encode(
            b'{"token_type":"access","exp":9999999999,"jti":"a","kind":"api_key","key_id":%d,'
            b'"permissions":["admin"]}' % row.pk
        ).decode()
        assert_401(bearer(f"{head}.{forged_body}.{sig}").get("/auth/keys"), "invalid_token")

    def test_expired_jwt_is_401(self, key_of: Callable[..., tuple[ApiKey, str]]) -> None:
        row, _ = key_of("read")
        token = AccessToken()
        token["kind"], token["key_id"], token["permissions"] = "api_key", row.pk, ["read"]
        token.set_exp(from_time=timezone.now() - timedelta(hours=2))
        assert_401(bearer(str(token)).get("/auth/whoami"), "token_expired")

    def test_refresh_token_used_as_access_is_401(self, key_of: Callable[..., tuple[ApiKey, str]]) -> None:
        _, raw = key_of("read")
        refresh = APIClient().post("/auth/token", {"api_key": raw}, format="json").json()["refresh"]
        assert_401(bearer(refresh).get("/auth/whoami"), "invalid_token")

    def test_token_of_revoked_key_is_401(self, key_of: Callable[..., tuple[ApiKey, str]]) -> None:
        row, raw = key_of("read")
        access = access_token_for(raw)
        assert bearer(access).get("/auth/whoami").status_code == 200
        key_revoke(key=row)
        assert_401(bearer(access).get("/auth/whoami"), "key_revoked")

    def test_token_of_deleted_key_is_401(self, key_of: Callable[..., tuple[ApiKey, str]]) -> None:
        row, raw = key_of("read")
        access = access_token_for(raw)
        row.delete()
        assert_401(bearer(access).get("/auth/whoami"), "invalid_token")

    @pytest.mark.parametrize("token", ["eyJhbGciOi.broken", "eyJ" + "a" * 5000, "not a token"])
    def test_malformed_tokens_are_401(self, token: str) -> None:
        assert bearer(token).get("/auth/whoami").status_code == 401

    def test_failures_feed_ip_blocking(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from gateway.models import BlockedIP

        monkeypatch.setattr(settings.CONFIG, "IP_BLOCK_THRESHOLD", 3)
        for _ in range(3):
            assert bearer("pk_unknown_key_0123456789").get("/auth/whoami").status_code == 401
        assert BlockedIP.objects.filter(ip="127.0.0.1").exists()

    def test_api_key_disabled_gives_anonymous_read_write(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(settings.CONFIG, "API_KEY_ENABLED", False)
        client = APIClient()
        body = client.get("/auth/whoami").json()
        assert body["kind"] == "anonymous"
        assert body["permissions"] == ["read", "write"]
        assert client.post("/write-only").status_code == 200
        assert client.get("/auth/keys").status_code == 403  # never admin

    def test_api_key_disabled_still_checks_sent_credentials(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(settings.CONFIG, "API_KEY_ENABLED", False)
        assert_401(bearer("pk_unknown_key_0123456789").get("/auth/whoami"), "invalid_token")

    def test_authenticate_bearer_contract(self, key_of: Callable[..., tuple[ApiKey, str]]) -> None:
        row, raw = key_of("write")
        principal = authenticate_bearer(raw, ip="10.0.0.1")
        assert (principal.kind, principal.api_key_id, principal.has("write"), principal.has("admin")) == (
            "api_key",
            row.pk,
            True,
            False,
        )
        with pytest.raises(AuthError) as caught:
            authenticate_bearer("pk_nope_nope_nope_nope", ip="10.0.0.1")
        assert caught.value.code == "invalid_token"
        assert SecurityEvent.objects.get(kind="auth_failed").ip == "10.0.0.1"

    @pytest.mark.django_db(transaction=True)
    async def test_aauthenticate_bearer(self, key_of: Callable[..., tuple[ApiKey, str]]) -> None:
        from asgiref.sync import sync_to_async
        from django.db import connections

        row, raw = await sync_to_async(key_of)("read")
        principal = await aauthenticate_bearer(raw, ip="10.0.0.2")
        assert principal.api_key_id == row.pk
        with pytest.raises(AuthError):
            await aauthenticate_bearer("pk_nope_nope_nope_nope", ip="10.0.0.2")
        # The worker thread's connection would otherwise outlive the test database.
        await sync_to_async(connections.close_all)()


class TestPermissions:
    @pytest.mark.parametrize(
        ("perms", "whoami", "write", "keys"),
        [
            (["read"], 200, 403, 403),
            (["write"], 403, 200, 403),
            (["read", "write"], 200, 200, 403),
            (["admin"], 200, 200, 200),
        ],
    )
    def test_matrix(
        self, key_of: Callable[..., tuple[ApiKey, str]], perms: list[str], whoami: int, write: int, keys: int
    ) -> None:
        _, raw = key_of(*perms)
        client = bearer(raw)
        assert client.get("/auth/whoami").status_code == whoami
        assert client.post("/write-only").status_code == write
        assert client.get("/auth/keys").status_code == keys

    def test_forbidden_is_403_json_and_logged(self, key_of: Callable[..., tuple[ApiKey, str]]) -> None:
        row, raw = key_of("read")
        response = bearer(raw).get("/auth/keys")
        assert response.status_code == 403
        body = response.json()
        assert body["code"] == "permission_denied"
        assert "admin" in body["detail"]
        event = SecurityEvent.objects.get(kind="permission_denied")
        assert event.api_key_id == row.pk
        assert event.detail["needed"] == "admin"

    def test_no_credentials_on_write_endpoint_is_401(self) -> None:
        assert_401(APIClient().post("/write-only"), "not_authenticated", invalid_token=False)


class TestKeys:
    def test_only_the_hash_is_stored(self) -> None:
        issued = key_create(name="k", permissions=["read"])
        assert issued.raw.startswith("pk_")
        assert len(issued.raw) >= 3 + 43  # 256 bits in base64url
        row = ApiKey.objects.get(pk=issued.key.pk)
        assert row.key_hash == hash_key(issued.raw)
        assert issued.raw not in {str(v) for v in ApiKey.objects.values().get(pk=row.pk).values()}

    def test_keys_are_unique(self) -> None:
        raws = {key_create(name=f"k{i}", permissions=["read"]).raw for i in range(20)}
        assert len(raws) == 20

    def test_unknown_permission_refused(self) -> None:
        with pytest.raises(ValueError, match="unknown permission"):
            key_create(name="k", permissions=["read", "root"])
        assert not ApiKey.objects.exists()

    def test_last_used_written_at_most_once_a_minute(self) -> None:
        issued = key_create(name="k", permissions=["read"])
        key_authenticate(issued.raw)
        first = ApiKey.objects.get(pk=issued.key.pk).last_used_at
        assert first is not None
        key_authenticate(issued.raw)
        assert ApiKey.objects.get(pk=issued.key.pk).last_used_at == first
        ApiKey.objects.filter(pk=issued.key.pk).update(last_used_at=first - timedelta(minutes=2))
        key_authenticate(issued.raw)
        refreshed = ApiKey.objects.get(pk=issued.key.pk).last_used_at
        assert refreshed is not None
        assert refreshed >= first

    def test_default_keys_load_idempotently(self) -> None:
        specs = [
            ApiKeySpec(
                name="admin_user",
                key="pk_env_admin_0123456789abcdef",
                permissions=["read", "write", "admin"],
                rate_limit_override=1000,
            ),
            ApiKeySpec(name="reader", key="pk_env_reader_0123456789abcdef", permissions=["read"]),
        ]
        assert keys_load_defaults(specs) == [("admin_user", "created"), ("reader", "created")]
        snapshot = list(ApiKey.objects.order_by("pk").values())
        assert keys_load_defaults(specs) == [("admin_user", "unchanged"), ("reader", "unchanged")]
        assert list(ApiKey.objects.order_by("pk").values()) == snapshot
        principal = authenticate_bearer("pk_env_admin_0123456789abcdef")
        assert principal.rate_limit_override == 1000
        assert principal.is_admin

    def test_changed_default_key_updates_the_row(self) -> None:
        spec = ApiKeySpec(name="svc", key="pk_env_svc_0123456789abcdef", permissions=["read"])
        keys_load_defaults([spec])
        changed = ApiKeySpec(name="svc", key="pk_env_svc_NEW_456789abcdef", permissions=["read", "write"])
        assert keys_load_defaults([changed]) == [("svc", "updated")]
        assert ApiKey.objects.count() == 1
        with pytest.raises(AuthError):
            authenticate_bearer("pk_env_svc_0123456789abcdef")
        assert authenticate_bearer("pk_env_svc_NEW_456789abcdef").has("write")

    def test_default_keys_from_settings(self, monkeypatch: pytest.MonkeyPatch) -> None:
        spec = ApiKeySpec(name="cfg", key="pk_env_cfg_0123456789abcdef", permissions=["read"])
        monkeypatch.setattr(settings.CONFIG, "DEFAULT_API_KEYS", [spec])
        assert keys_load_defaults() == [("cfg", "created")]


class TestKeysApi:
    def test_create_list_revoke_rotate(self, key_of: Callable[..., tuple[ApiKey, str]]) -> None:
        _, admin_raw = key_of("admin")
        admin = bearer(admin_raw)
        created = admin.post(
            "/auth/keys",
            {
                "name": "svc",
                "permissions": ["read", "write"],
                "rate_limit_override": 50,
                "expires_in_days": 30,
            },
            format="json",
        )
        assert created.status_code == 201, created.content
        body = created.json()
        raw = body["key"]
        assert raw.startswith("pk_")
        assert body["prefix"] == raw[:10]
        assert body["permissions"] == ["read", "write"]
        assert body["rate_limit_override"] == 50
        assert body["status"] == "active"
        assert SecurityEvent.objects.filter(kind="key_created", api_key_id=body["id"]).exists()

        listed = admin.get("/auth/keys").json()["keys"]
        assert {k["name"] for k in listed} == {"test", "svc"}
        assert all("key" not in k and "key_hash" not in k for k in listed)
        assert raw not in str(listed)

        rotated = admin.post(f"/auth/keys/{body['id']}/rotate", {"grace_seconds": 60}, format="json")
        assert rotated.status_code == 201
        new_raw = rotated.json()["key"]
        assert rotated.json()["replaces"]["status"] == "rotating"
        assert bearer(raw).get("/auth/whoami").status_code == 200  # in grace
        assert bearer(new_raw).get("/auth/whoami").status_code == 200

        revoked = admin.post(f"/auth/keys/{body['id']}/revoke")
        assert revoked.status_code == 200
        assert revoked.json()["status"] == "revoked"
        assert_401(bearer(raw).get("/auth/whoami"), "key_revoked")
        assert admin.post(f"/auth/keys/{body['id']}/rotate").status_code == 409

    @pytest.mark.parametrize(
        ("payload", "field"),
        [
            ({"permissions": ["read"]}, "name"),
            ({"name": "x", "permissions": ["root"]}, "permissions"),
            ({"name": "x", "permissions": []}, "permissions"),
            ({"name": "x" * 101, "permissions": ["read"]}, "name"),
            ({"name": "bad\x00name", "permissions": ["read"]}, "name"),
            ({"name": "x", "permissions": ["read"], "rate_limit_override": 0}, "rate_limit_override"),
            ({"name": "x", "permissions": ["read"], "expires_in_days": "soon"}, "expires_in_days"),
            ({"name": ["x"], "permissions": ["read"]}, "name"),
        ],
    )
    def test_bad_input_is_400_naming_the_field(
        self, key_of: Callable[..., tuple[ApiKey, str]], payload: dict[str, Any], field: str
    ) -> None:
        _, admin_raw = key_of("admin")
        response = bearer(admin_raw).post("/auth/keys", payload, format="json")
        assert response.status_code == 400
        body = response.json()
        assert body["code"] == "invalid"
        assert field in body["errors"]
        assert field in body["detail"]
        assert ApiKey.objects.count() == 1  # no partial write

    def test_unknown_key_id_is_404_json(self, key_of: Callable[..., tuple[ApiKey, str]]) -> None:
        _, admin_raw = key_of("admin")
        response = bearer(admin_raw).post("/auth/keys/999999/revoke")
        assert response.status_code == 404
        assert response.json()["code"] == "not_found"


class TestJWT:
    def test_key_exchange(self, key_of: Callable[..., tuple[ApiKey, str]]) -> None:
        row, raw = key_of("read", "write")
        response = APIClient().post("/auth/token", {"api_key": raw}, format="json")
        assert response.status_code == 200
        body = response.json()
        assert body["token_type"] == "Bearer"
        assert body["expires_in"] == settings.CONFIG.JWT_ACCESS_TTL
        claims = jwt.decode(body["access"], settings.JWT_SECRET_KEY, algorithms=["HS256"])
        assert claims["permissions"] == ["read", "write"]
        assert claims["key_id"] == row.pk
        who = bearer(body["access"]).get("/auth/whoami").json()
        assert who["kind"] == "api_key"
        assert who["permissions"] == ["read", "write"]

    @pytest.mark.parametrize(
        ("flags", "perms"),
        [
            ({}, ["read"]),
            ({"is_staff": True}, ["read", "write"]),
            ({"is_staff": True, "is_superuser": True}, ["admin", "read", "write"]),
        ],
    )
    def test_user_exchange(self, flags: dict[str, Any], perms: list[str]) -> None:
        user = get_user_model().objects.create_user("alice", password="s3cret-pass", **flags)
        response = APIClient().post(
            "/auth/token", {"username": "alice", "password": "s3cret-pass"}, format="json"
        )
        assert response.status_code == 200
        who = bearer(response.json()["access"]).get("/auth/whoami").json()
        assert who == {
            "kind": "user",
            "name": "alice",
            "owner": f"user:{user.pk}",
            "permissions": perms,
            "key_prefix": None,
            "rate_limit_override": None,
            "quota": None,  # a user's token has no API key, so no daily quota
        }

    def test_inactive_user_token_refused(self) -> None:
        user = get_user_model().objects.create_user("bob", password="s3cret-pass")
        access = (
            APIClient()
            .post("/auth/token", {"username": "bob", "password": "s3cret-pass"}, format="json")
            .json()["access"]
        )
        user.is_active = False
        user.save()
        assert_401(bearer(access).get("/auth/whoami"), "invalid_token")

    def test_wrong_password_is_401(self) -> None:
        get_user_model().objects.create_user("carol", password="s3cret-pass")
        response = APIClient().post("/auth/token", {"username": "carol", "password": "nope"}, format="json")
        assert_401(response, "invalid_credentials")
        assert auth_failures() == 1

    def test_bad_key_exchange_is_401(self, key_of: Callable[..., tuple[ApiKey, str]]) -> None:
        _, raw = key_of("read", revoked_at=timezone.now())
        assert_401(APIClient().post("/auth/token", {"api_key": raw}, format="json"), "key_revoked")
        assert_401(
            APIClient().post("/auth/token", {"api_key": "pk_unknown_012345678"}, format="json"),
            "invalid_token",
        )

    @pytest.mark.parametrize(
        "payload",
        [
            {},
            {"api_key": "pk_x" * 100},
            {"username": "a"},
            {"api_key": "k" * 20, "username": "a", "password": "b"},
            {"api_key": 5},
            {"api_key": "pk_\x07bell_0123456789"},
            {"username": ["a"], "password": "b"},
        ],
    )
    def test_bad_token_requests_are_400(self, payload: dict[str, Any]) -> None:
        response = APIClient().post("/auth/token", payload, format="json")
        assert response.status_code == 400, response.content
        assert response.json()["code"] == "invalid"
        assert response.json()["errors"]

    def test_non_json_bodies_are_4xx_json(self) -> None:
        response = APIClient().post(
            "/auth/token", "api_key=x", content_type="application/x-www-form-urlencoded"
        )
        assert response.status_code == 415
        assert response.json()["code"] == "unsupported_media_type"
        response = APIClient().post("/auth/token", "{not json", content_type="application/json")
        assert response.status_code == 400
        assert response.json()["code"] == "parse_error"

    def test_refresh_rotates_and_blacklists(self, key_of: Callable[..., tuple[ApiKey, str]]) -> None:
        _, raw = key_of("read")
        first = APIClient().post("/auth/token", {"api_key": raw}, format="json").json()
        second = APIClient().post("/auth/token/refresh", {"refresh": first["refresh"]}, format="json")
        assert second.status_code == 200
        pair = second.json()
        assert pair["refresh"] != first["refresh"]
        assert bearer(pair["access"]).get("/auth/whoami").status_code == 200
        again = APIClient().post("/auth/token/refresh", {"refresh": first["refresh"]}, format="json")
        assert_401(again, "invalid_token")
        assert "blacklisted" in again.json()["detail"]

    @requires_postgres
    @pytest.mark.django_db(transaction=True)
    def test_concurrent_refreshes_of_one_token_only_one_wins(
        self, key_of: Callable[..., tuple[ApiKey, str]]
    ) -> None:
        import threading

        from django.db import connection

        _, raw = key_of("read")
        refresh = APIClient().post("/auth/token", {"api_key": raw}, format="json").json()["refresh"]
        barrier = threading.Barrier(4)
        statuses: list[int] = []

        def attempt() -> None:
            barrier.wait()
            try:
                response = APIClient().post("/auth/token/refresh", {"refresh": refresh}, format="json")
                statuses.append(response.status_code)
            finally:
                connection.close()

        threads = [threading.Thread(target=attempt) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(statuses) == [200, 401, 401, 401]

    def test_revoked_refresh_cannot_be_used(self, key_of: Callable[..., tuple[ApiKey, str]]) -> None:
        _, raw = key_of("read")
        pair = APIClient().post("/auth/token", {"api_key": raw}, format="json").json()
        revoked = APIClient().post("/auth/token/revoke", {"refresh": pair["refresh"]}, format="json")
        assert revoked.status_code == 200
        assert revoked.json() == {"revoked": True}
        assert_401(
            APIClient().post("/auth/token/refresh", {"refresh": pair["refresh"]}, format="json"),
            "invalid_token",
        )

    def test_refresh_of_revoked_key_refused(self, key_of: Callable[..., tuple[ApiKey, str]]) -> None:
        row, raw = key_of("read")
        pair = APIClient().post("/auth/token", {"api_key": raw}, format="json").json()
        key_revoke(key=row)
        assert_401(
            APIClient().post("/auth/token/refresh", {"refresh": pair["refresh"]}, format="json"),
            "key_revoked",
        )

    def test_access_token_is_not_a_refresh_token(self, key_of: Callable[..., tuple[ApiKey, str]]) -> None:
        _, raw = key_of("read")
        pair = APIClient().post("/auth/token", {"api_key": raw}, format="json").json()
        assert_401(
            APIClient().post("/auth/token/refresh", {"refresh": pair["access"]}, format="json"),
            "invalid_token",
        )

    def test_token_endpoint_is_limited_per_ip(
        self, monkeypatch: pytest.MonkeyPatch, key_of: Callable[..., tuple[ApiKey, str]]
    ) -> None:
        monkeypatch.setattr(settings.CONFIG, "RATE_LIMITING_ENABLED", True)
        monkeypatch.setattr(settings.CONFIG, "TOKEN_RATE_LIMIT_REQUESTS", 3)
        _, raw = key_of("read")
        statuses = [
            APIClient().post("/auth/token", {"api_key": raw}, format="json").status_code for _ in range(4)
        ]
        assert statuses == [200, 200, 200, 429]
        other_ip = APIClient(REMOTE_ADDR="10.9.8.7").post("/auth/token", {"api_key": raw}, format="json")
        assert other_ip.status_code == 200

    def test_token_a_key_carries_only_its_current_permissions(
        self, key_of: Callable[..., tuple[ApiKey, str]]
    ) -> None:
        row, raw = key_of("admin")
        access = access_token_for(raw)
        ApiKey.objects.filter(pk=row.pk).update(permissions=["read"])
        assert bearer(access).get("/auth/keys").status_code == 403


class TestErrors:
    def test_unexpected_error_is_500_json(self) -> None:
        client = APIClient(raise_request_exception=False)
        response = client.get("/boom")
        assert response.status_code == 500
        assert response.json() == {"detail": "Internal server error.", "code": "server_error"}

    @pytest.mark.urls("polyagents_site.urls")
    @pytest.mark.parametrize("debug", [False, True])
    def test_unknown_path_is_404_json(self, debug: bool, settings: Any) -> None:
        settings.DEBUG = debug  # in DEBUG Django would render its HTML 404 page
        for method in ("get", "post", "delete"):
            response = getattr(APIClient(), method)("/no/such/path")
            assert response.status_code == 404
            assert response.json()["code"] == "not_found"

    @pytest.mark.urls("polyagents_site.urls")
    def test_admin_paths_are_not_swallowed(self) -> None:
        assert APIClient().get("/django-admin").status_code == 301
        assert APIClient().get("/django-admin/").status_code == 302  # to the login page

    def test_error_response_helper(self) -> None:
        import json

        from gateway.errors import error_response

        response = error_response(422, "bad", "Bad thing.", {"x": ["y"]})
        assert response.status_code == 422
        assert json.loads(response.content) == {"detail": "Bad thing.", "code": "bad", "errors": {"x": ["y"]}}


class TestValidation:
    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            ("  hello  ", "hello"),
            ("line\nbreak\ttab\r", "line\nbreak\ttab"),
            ("<b>x</b>' OR 1=1 --", "<b>x</b>' OR 1=1 --"),  # stored inert, escaped where rendered
        ],
    )
    def test_safe_char_field_accepts(self, value: str, expected: str) -> None:
        from gateway.validation import SafeCharField

        assert SafeCharField(max_length=100).run_validation(value) == expected

    @pytest.mark.parametrize(
        "value", ["nul\x00", "esc\x1b[31m", "del\x7f", "x" * 101, ["x"], True, 5, {"a": 1}]
    )
    def test_safe_char_field_refuses(self, value: object) -> None:
        from rest_framework import serializers

        from gateway.validation import SafeCharField

        with pytest.raises(serializers.ValidationError):
            SafeCharField(max_length=100).run_validation(value)

    def test_control_character_message_names_it(self) -> None:
        from rest_framework import serializers

        from gateway.validation import SafeCharField

        with pytest.raises(serializers.ValidationError, match="U\\+0000"):
            SafeCharField(max_length=10).run_validation("a\x00b")

    def test_max_length_is_mandatory(self) -> None:
        from gateway.validation import SafeCharField

        with pytest.raises(TypeError):
            SafeCharField()  # type: ignore[call-arg]

    def test_parse_uuid(self) -> None:
        import uuid

        from rest_framework import serializers

        from gateway.validation import parse_uuid

        value = uuid.uuid4()
        assert parse_uuid(str(value)) == value
        with pytest.raises(serializers.ValidationError) as caught:
            parse_uuid("not-a-uuid", field="conversation_id")
        assert "conversation_id" in caught.value.detail


class TestHostileBodies:
    def test_oversized_body_is_4xx_json(self) -> None:
        huge = '{"api_key": "' + "a" * (settings.DATA_UPLOAD_MAX_MEMORY_SIZE + 10) + '"}'
        response = APIClient().post("/auth/token", huge, content_type="application/json")
        assert response.status_code in (400, 413), response.content
        assert response.json()["code"] in ("invalid", "payload_too_large")
        assert not ApiKey.objects.exists()

    def test_django_body_limit_maps_to_413(self) -> None:
        from django.core.exceptions import RequestDataTooBig

        from gateway.errors import exception_handler

        response = exception_handler(RequestDataTooBig("too big"), {})
        assert response.status_code == 413
        assert response.data == {"detail": "Request body too large.", "code": "payload_too_large"}

    @pytest.mark.parametrize(
        "payload",
        [
            {"api_key": "' OR 1=1 --0123456789"},
            {"api_key": "<script>alert(1)</script>"},
            {"username": "admin'--", "password": "x' OR '1'='1"},
            {"username": "<img src=x onerror=alert(1)>", "password": "p"},
        ],
    )
    def test_sql_and_html_credentials_are_plain_401(self, payload: dict[str, str]) -> None:
        response = APIClient().post("/auth/token", payload, format="json")
        assert response.status_code == 401
        assert response["Content-Type"] == "application/json"
        assert "<script>" not in response.content.decode()

    def test_json_array_body_is_400(self) -> None:
        response = APIClient().post("/auth/token", [1, 2], format="json")
        assert response.status_code == 400
        assert response.json()["code"] == "invalid"

    def test_plain_django_handlers_answer_json(self, rf: Any) -> None:
        import json

        from gateway.errors import handler400, handler403, handler404, handler500

        request = rf.get("/x")
        for handler, status, code in [
            (lambda r: handler400(r, None), 400, "bad_request"),
            (lambda r: handler403(r, None), 403, "permission_denied"),
            (lambda r: handler404(r, None), 404, "not_found"),
            (handler500, 500, "server_error"),
        ]:
            response = handler(request)
            assert response.status_code == status
            assert response["Content-Type"] == "application/json"
            assert json.loads(response.content)["code"] == code
