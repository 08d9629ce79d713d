"""Key management commands: create (and --demo), revoke, rotate, load DEFAULT_API_KEYS."""

from __future__ import annotations

import re
from collections.abc import Callable
from io import StringIO

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command

from gateway.auth import AuthError, authenticate_bearer
from gateway.models import ApiKey, hash_key
from polyagents_site.config import ApiKeySpec

pytestmark = pytest.mark.django_db

KEY_PATTERN = re.compile(r"pk_[A-Za-z0-9_-]{43}")


def run(*args: str) -> str:
    out = StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def test_create_api_key_prints_it_once() -> None:
    output = run(
        "create_api_key",
        "--name",
        "ci",
        "--permissions",
        "read,write",
        "--rate-limit",
        "500",
        "--expires-days",
        "7",
    )
    keys = KEY_PATTERN.findall(output)
    assert len(keys) == 1
    row = ApiKey.objects.get(name="ci")
    assert row.key_hash == hash_key(keys[0])
    assert row.permissions == ["read", "write"]
    assert row.rate_limit_override == 500
    assert row.expires_at is not None
    assert authenticate_bearer(keys[0]).has("write")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--name", "x", "--permissions", "read,root"], "unknown permission"),
        (["--permissions", "read"], "--name is required"),
        (["--name", "x", "--rate-limit", "0"], "--rate-limit"),
        (["--name", "x", "--expires-days", "-1"], "--expires-days"),
    ],
)
def test_create_api_key_refuses_bad_options(args: list[str], message: str) -> None:
    with pytest.raises(CommandError, match=message):
        run("create_api_key", *args)
    assert not ApiKey.objects.exists()


def test_demo_key_replaces_older_demo_keys() -> None:
    first = KEY_PATTERN.findall(run("create_api_key", "--demo"))
    output = run("create_api_key", "--demo")
    second = KEY_PATTERN.findall(output)
    assert len(first) >= 1
    assert second[0] != first[0]
    assert "curl" in output
    assert f"Authorization: Bearer {second[0]}" in output
    assert "Revoked 1 older demo key" in output
    with pytest.raises(AuthError):
        authenticate_bearer(first[0])
    principal = authenticate_bearer(second[0])
    assert principal.permissions == frozenset({"read", "write"})
    assert ApiKey.objects.filter(source="demo", revoked_at__isnull=True).count() == 1


def test_revoke_by_prefix_and_by_id(make_key: Callable[..., tuple[ApiKey, str]]) -> None:
    row, raw = make_key(["read"])
    assert "Revoked" in run("revoke_api_key", row.prefix)
    with pytest.raises(AuthError):
        authenticate_bearer(raw)
    assert "already revoked" in run("revoke_api_key", str(row.pk))


def test_revoke_unknown_key_fails() -> None:
    with pytest.raises(CommandError, match="no API key"):
        run("revoke_api_key", "pk_nothing")


def test_rotate_with_grace(make_key: Callable[..., tuple[ApiKey, str]]) -> None:
    row, old_raw = make_key(["read"])
    output = run("rotate_api_key", str(row.pk), "--grace", "120")
    new_raw = KEY_PATTERN.findall(output)[-1]
    assert new_raw != old_raw
    assert authenticate_bearer(old_raw).api_key_id == row.pk
    assert authenticate_bearer(new_raw).api_key_id == ApiKey.objects.get(replaces=row).pk


def test_rotate_without_grace_ends_the_old_key(make_key: Callable[..., tuple[ApiKey, str]]) -> None:
    row, old_raw = make_key(["read"])
    run("rotate_api_key", row.prefix, "--grace", "0")
    with pytest.raises(AuthError) as caught:
        authenticate_bearer(old_raw)
    assert caught.value.code == "key_rotated"


def test_load_api_keys_is_idempotent(monkeypatch: pytest.MonkeyPatch) -> None:
    specs = [ApiKeySpec(name="ops", key="pk_env_ops_0123456789abcdef", permissions=["read", "admin"])]
    monkeypatch.setattr(settings.CONFIG, "DEFAULT_API_KEYS", specs)
    assert run("load_api_keys").strip() == "ops: created"
    assert run("load_api_keys").strip() == "ops: unchanged"
    assert ApiKey.objects.count() == 1
    specs[0] = ApiKeySpec(name="ops", key="pk_env_ops_0123456789abcdef", permissions=["read"])
    assert run("load_api_keys").strip() == "ops: updated"
    assert authenticate_bearer("pk_env_ops_0123456789abcdef").permissions == frozenset({"read"})


def test_load_api_keys_with_nothing_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settings.CONFIG, "DEFAULT_API_KEYS", [])
    assert "nothing to load" in run("load_api_keys")
