"""Cost control: the price table, estimated cost everywhere, request budgets, daily quotas."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command
from django.db import connections
from prometheus_client import REGISTRY

from agents.budget import Budget, next_turn_estimate, vote_estimate
from agents.pricing import Cost, call_cost, price_for
from agents.profiles import build_panel
from agents.providers.base import Usage
from agents.providers.registry import reset_providers
from conversations.budget import estimate_first_round
from conversations.models import Conversation, Event, Message
from gateway import quota
from gateway.keys import keys_load_defaults
from gateway.models import ApiKey, QuotaUsage
from polyagents_site.config import ApiKeySpec, ModelPrice
from tests.conftest import requires_postgres, requires_redis
from tests.fakes.gemini_server import FakeGemini, ok

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "Should a small team adopt PostgreSQL or MongoDB for a new product?"
FLASH_IN, FLASH_OUT = 0.30, 2.50  # built-in gemini-2.5-flash prices, USD per million tokens


def answer(position: str) -> str:
    return f"Weighing the options.\n\nFINAL POSITION: {position}\nCONFIDENCE: 0.8"


BALLOT = "VOTE: A\nCONFIDENCE: 0.9\nREASON: best supported"


# --- the price table ---------------------------------------------------------------------
def test_price_math_for_the_named_gemini_models() -> None:
    million = Usage(1_000_000, 1_000_000)
    assert call_cost("gemini-2.5-flash", million).usd == pytest.approx(0.30 + 2.50)
    assert call_cost("gemini-2.5-pro", million).usd == pytest.approx(1.25 + 10.00)
    assert call_cost("gemini-2.5-flash-lite", million).usd == pytest.approx(0.10 + 0.40)
    assert call_cost("gemini-2.0-flash", million).usd == pytest.approx(0.10 + 0.40)
    cost = call_cost("gemini-2.5-pro", Usage(2000, 500), provider="gemini")
    assert cost.usd == pytest.approx(2000 * 1.25 / 1e6 + 500 * 10.0 / 1e6)  # 0.0075
    assert cost.estimated
    assert cost.fields() == {"cost_usd": 0.0075, "cost_estimated": True}


def test_versioned_names_unknown_models_and_the_simulator() -> None:
    lite = price_for("gemini-2.5-flash-lite-preview-06-17")
    assert lite is not None
    assert (lite.input, lite.output) == (0.10, 0.40)  # longest name wins
    flash = price_for("models/gemini-2.5-flash-001")
    assert flash is not None
    assert (flash.input, flash.output) == (FLASH_IN, FLASH_OUT)
    assert price_for("gemini-2.5-flashy") is None  # a name is extended with "-" only
    unknown = call_cost("llama3.1", Usage(1000, 1000), provider="openai")
    assert (unknown.usd, unknown.estimated) == (0.0, False)
    simulated = call_cost("gemini-2.5-flash", Usage(1000, 1000), provider="simulated", simulated=True)
    assert (simulated.usd, simulated.estimated) == (0.0, False)
    # A total is an estimate only when every call in it was priced.
    priced = call_cost("gemini-2.5-flash", Usage(100, 100))
    assert (priced + simulated).estimated is False
    assert (priced + priced).estimated is True
    assert Cost().estimated is False


def test_model_prices_override_and_extend_the_table(settings: Any) -> None:
    settings.CONFIG = settings.CONFIG.model_copy(
        update={
            "MODEL_PRICES": {
                "gemini-2.5-flash": ModelPrice(input=1.0, output=2.0),
                "llama3.1": ModelPrice(input=0.0, output=0.0),
            }
        }
    )
    assert call_cost("gemini-2.5-flash", Usage(1_000_000, 500_000)).usd == pytest.approx(2.0)
    free = call_cost("llama3.1", Usage(10, 10), provider="openai")
    assert (free.usd, free.estimated) == (0.0, True)  # priced at 0 on purpose: an estimate
    assert call_cost("gemini-2.5-pro", Usage(1_000_000, 0)).usd == pytest.approx(1.25)  # untouched


def _start(env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    code = (
        "import django; django.setup(); from django.conf import settings; "
        "t = settings.CONFIG.price_table; print(t['my-model'].input, t['gemini-2.5-pro'].output)"
    )
    full = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(ROOT),
        "DJANGO_SETTINGS_MODULE": "polyagents_site.settings",
        "DEBUG": "true",
        **env,
    }
    return subprocess.run(
        [sys.executable, "-c", code], env=full, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )


def test_model_prices_env_variable_is_read_and_validated(tmp_path: Path) -> None:
    good = _start({"MODEL_PRICES": '{"my-model": {"input": 0.5, "output": 1.5}}'}, tmp_path)
    assert good.returncode == 0, good.stderr
    assert good.stdout.split() == ["0.5", "10.0"]
    for bad in (
        '{"my-model": {"input": -1, "output": 1}}',
        '{"my-model": {"input": 1}}',
        '{"my-model": {"input": 1, "output": 1, "cached": 0.1}}',
        '{"my-model": ',
        '{"": {"input": 1, "output": 1}}',
    ):
        result = _start({"MODEL_PRICES": bad}, tmp_path)
        assert result.returncode != 0
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith("PolyAgents configuration error: MODEL_PRICES"), lines[0]


# --- estimates ---------------------------------------------------------------------------
def test_next_turn_is_estimated_from_the_previous_turns_usage(settings: Any) -> None:
    panel = build_panel(2)
    ids = [p.agent_id for p in panel]
    first = {ids[0]: Usage(100, 50), ids[1]: Usage(120, 400)}
    last = {ids[0]: Usage(300, 60), ids[1]: Usage(330, 500)}
    turn = next_turn_estimate(panel, first, last)
    # Each agent resends its turn-1 prompt plus every previous answer (cut to 300) and 80
    # tokens of labels, and answers as long as it did last time.
    quoted = 60 + 300 + 80
    assert turn.prompt_tokens == (100 + quoted) + (120 + quoted)
    assert turn.completion_tokens == 60 + 500
    vote = vote_estimate(panel, first, last)
    assert vote.tokens == (100 + 360 + 60) + (120 + 360 + 60)
    if panel[0].provider == "simulated":
        assert turn.usd == 0.0
    budget = Budget(max_tokens=1000)
    assert budget.allows(1000, 99.0)
    assert not budget.allows(1001, 0.0)
    assert not Budget(max_cost=0.01).allows(0, 0.0100001)


# --- end to end with a priced model (the fake Gemini server) ------------------------------
@pytest.fixture
def gemini(settings: Any) -> Iterator[FakeGemini]:
    """Every agent on gemini-2.5-flash, served by the fake Gemini server."""
    with FakeGemini() as fake:
        settings.CONFIG = settings.CONFIG.model_copy(
            update={
                "GEMINI_API_KEY": "test-gemini-key",
                "GEMINI_BASE_URL": fake.base_url,
                "GEMINI_MODEL": "gemini-2.5-flash",
                "LLM_PROVIDER": None,
                "AGENT_MODELS_CONFIG": [],
            }
        )
        reset_providers()
        yield fake
        reset_providers()


def _script_split_panel(fake: FakeGemini) -> None:
    """Turn 1: two Yes and a No, each 400 prompt and 900 output tokens; then three ballots for A."""
    fake.script(
        *(ok(answer(p), prompt_tokens=400, output_tokens=900) for p in ("Yes", "Yes", "No")),
        *(ok(BALLOT) for _ in range(3)),  # 11 prompt and 7 output tokens each
    )


def _sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


ANSWER_USD = (400 * FLASH_IN + 900 * FLASH_OUT) / 1e6  # 0.00237
BALLOT_USD = (11 * FLASH_IN + 7 * FLASH_OUT) / 1e6


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("field", ["max_tokens", "max_cost"])
def test_budget_stops_the_conversation_after_turn_1(
    field: str, gemini: FakeGemini, make_key: Any, api_client: Any
) -> None:
    row, raw = make_key(["read", "write"])
    api_client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    panel = build_panel(3)
    admission = estimate_first_round(Conversation(), QUESTION, 3)
    used = {p.agent_id: Usage(400, 900) for p in panel}
    after_turn_1 = next_turn_estimate(panel, used, used) + vote_estimate(panel, used, used)
    if field == "max_tokens":
        budget: float = admission.tokens + 10
        assert budget < 3 * 1300 + after_turn_1.tokens  # turn 2 cannot fit
    else:
        budget = round(admission.usd * 1.01, 8)
        assert budget < 3 * ANSWER_USD + after_turn_1.usd
    _script_split_panel(gemini)
    llm_before = _sample("polyagents_llm_cost_usd_total", {"provider": "gemini", "model": "gemini-2.5-flash"})
    key_label = {"api_key": f"key:{row.pk}"}
    key_before = _sample("polyagents_api_key_cost_usd_total", key_label)

    response = api_client.post(
        "/chat", {"message": QUESTION, "num_agents": 3, "turns": 3, field: budget}, format="json"
    )

    assert response.status_code == 200, response.content
    body = response.json()
    meta = body["metadata"]
    assert meta["stopped"] == "budget"
    assert (meta["turns_completed"], meta["turns_requested"]) == (1, 3)
    assert meta["budget"][field] == budget
    assert meta["status"] == "completed"  # the panel still voted, within the budget
    assert len(gemini.generate_calls) == 6  # three answers, three ballots, no turn 2
    stop = body["cost"]["stop_estimate"]
    assert (stop["turn"], stop["spent_tokens"]) == (2, 3 * 1300)  # before the vote
    # Estimated cost per agent, per turn and in total (ballots included).
    for agent in body["agent_responses"]:
        assert agent["tokens"] == {"prompt": 400, "completion": 900, "total": 1300}
        assert agent["cost_usd"] == pytest.approx(ANSWER_USD)
        assert agent["cost_estimated"] is True
    assert body["cost"]["turns"] == [
        {"turn": 1, "tokens": 3900, "cost_usd": pytest.approx(3 * ANSWER_USD), "cost_estimated": True}
    ]
    total = 3 * ANSWER_USD + 3 * BALLOT_USD
    assert body["cost"]["total_usd"] == pytest.approx(total)
    assert body["cost"]["estimated"] is True
    assert body["usage"]["total"] == 3 * 1300 + 3 * 18
    # Stored: the conversation, each answer, and the events.
    conversation = Conversation.objects.get(pk=body["conversation_id"])
    assert conversation.cost_usd == pytest.approx(total)
    assert conversation.metadata["stopped"] == "budget"
    assert all(m.cost_usd == pytest.approx(ANSWER_USD) for m in Message.objects.filter(role="agent"))
    events = {e.type: e.data for e in Event.objects.filter(conversation=conversation)}
    assert events["agent_response"]["cost_usd"] == pytest.approx(ANSWER_USD)
    assert events["turn_completed"]["cost_usd"] == pytest.approx(3 * ANSWER_USD)
    done = events["conversation_completed"]
    assert (done["stopped"], done["cost_estimated"]) == ("budget", True)
    assert done["cost_usd"] == pytest.approx(total)
    # Prometheus: by model and by key.
    llm_after = _sample("polyagents_llm_cost_usd_total", {"provider": "gemini", "model": "gemini-2.5-flash"})
    assert llm_after - llm_before == pytest.approx(total)
    assert _sample("polyagents_api_key_cost_usd_total", key_label) - key_before == pytest.approx(total)
    # /statistics reports cost next to tokens.
    stats = api_client.get("/statistics").json()["costs"]
    assert stats["total_usd"] == pytest.approx(total)
    assert stats["by_model"]["gemini-2.5-flash"] == {
        "cost_usd": pytest.approx(3 * ANSWER_USD),
        "tokens": 3900,
    }


@pytest.mark.django_db(transaction=True)
def test_the_daily_quota_caps_a_running_conversation_too(
    gemini: FakeGemini, make_key: Any, api_client: Any
) -> None:
    admission = estimate_first_round(Conversation(), QUESTION, 3)
    row, raw = make_key(["read", "write"], daily_quota=admission.tokens + 10)
    api_client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    _script_split_panel(gemini)
    response = api_client.post("/chat", {"message": QUESTION, "num_agents": 3, "turns": 3}, format="json")
    assert response.status_code == 200, response.content
    meta = response.json()["metadata"]
    assert (meta["stopped"], meta["turns_completed"], meta["budget"]) == ("quota", 1, None)
    state = quota.usage(row.pk)
    assert state is not None
    assert (state.used, state.reserved) == (3 * 1300 + 3 * 18, 0)  # settled: the actual usage


@pytest.mark.django_db(transaction=True)
def test_without_a_budget_every_turn_runs(gemini: FakeGemini, client_with: Any) -> None:
    gemini.always(ok(answer("Yes"), prompt_tokens=400, output_tokens=900))
    body = (
        client_with("read", "write")
        .post("/chat", {"message": QUESTION, "num_agents": 3, "turns": 1}, format="json")
        .json()
    )
    assert body["metadata"]["stopped"] is None
    assert body["metadata"]["budget"] is None
    assert body["cost"]["total_usd"] == pytest.approx(3 * ANSWER_USD)  # unanimous: no ballot calls


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("path", ["/chat", "/stream/0b6f3c52-6d1e-4f6e-9a57-3f0d2b1c4a11"])
def test_a_budget_too_small_for_one_round_is_refused(path: str, gemini: FakeGemini, client_with: Any) -> None:
    client = client_with("read", "write")
    estimate = estimate_first_round(Conversation(), QUESTION, 3)
    for field, value in (("max_tokens", estimate.tokens - 1), ("max_cost", estimate.usd * 0.99)):
        response = client.post(path, {"message": QUESTION, "num_agents": 3, field: value}, format="json")
        assert response.status_code == 422, response.content
        body = response.json()
        assert body["code"] == "budget_too_small"
        assert body["estimate"] == {"tokens": estimate.tokens, "cost_usd": pytest.approx(estimate.usd)}
        assert body["budget"][field] == value
    assert Conversation.objects.count() == 0
    assert gemini.generate_calls == []


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("field", "raw"),
    [
        ("max_cost", "0"),
        ("max_cost", "-0.5"),
        ("max_cost", '"1.5"'),
        ("max_cost", "true"),
        ("max_cost", "[1]"),
        ("max_cost", "1e400"),
        ("max_cost", "10000000"),
        ("max_tokens", "0"),
        ("max_tokens", "-3"),
        ("max_tokens", "2.5"),
        ("max_tokens", '"100"'),
        ("max_tokens", "false"),
        ("max_tokens", "1000000000000"),
    ],
)
def test_hostile_budgets_get_a_400_naming_the_field(field: str, raw: str, client_with: Any) -> None:
    body = f'{{"message": "ok", "{field}": {raw}}}'
    response = client_with("read", "write").post("/chat", body, content_type="application/json")
    assert response.status_code == 400, response.content
    assert field in response.json()["errors"]
    assert Conversation.objects.count() == 0


@pytest.mark.django_db
def test_a_nan_budget_is_refused_by_the_json_parser(client_with: Any) -> None:
    body = '{"message": "ok", "max_cost": NaN}'
    response = client_with("read", "write").post("/chat", body, content_type="application/json")
    assert response.status_code == 400
    assert response.json()["code"] == "parse_error"


# --- daily quotas ------------------------------------------------------------------------
def seconds_to_midnight() -> int:
    now = datetime.now(UTC)
    midnight = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), tzinfo=UTC)
    return math.ceil((midnight - now).total_seconds())


@pytest.mark.django_db(transaction=True)
def test_quota_is_charged_then_refuses_with_429_and_retry_after(make_key: Any, api_client: Any) -> None:
    estimate = estimate_first_round(Conversation(), QUESTION, 2)
    row, raw = make_key(["read", "write"], daily_quota=estimate.tokens + 100)
    api_client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")

    first = api_client.post("/chat", {"message": QUESTION, "num_agents": 2, "turns": 1}, format="json")
    assert first.status_code == 200, first.content
    spent = first.json()["usage"]["total"]
    assert spent > 0  # the simulator: tokens counted, cost 0 and not an estimate
    cost = first.json()["cost"]
    assert (cost["total_usd"], cost["estimated"]) == (0.0, False)
    assert [(t["turn"], t["tokens"], t["cost_usd"], t["cost_estimated"]) for t in cost["turns"]] == [
        (1, sum(a["tokens"]["total"] for a in first.json()["transcript"]), 0.0, False)
    ]
    whoami = api_client.get("/auth/whoami").json()["quota"]
    assert whoami["daily_quota"] == estimate.tokens + 100
    assert (whoami["unit"], whoami["used"], whoami["reserved"]) == ("tokens", spent, 0)
    assert whoami["remaining"] == estimate.tokens + 100 - spent
    assert whoami["resets_at"] == f"{(datetime.now(UTC).date() + timedelta(days=1)).isoformat()}T00:00:00Z"
    assert QuotaUsage.objects.get(api_key=row).used == spent  # the durable record

    refused = api_client.post("/chat", {"message": QUESTION, "num_agents": 2, "turns": 1}, format="json")
    assert refused.status_code == 429, refused.content
    body = refused.json()
    assert body["code"] == "quota_exceeded"
    assert abs(int(refused["Retry-After"]) - seconds_to_midnight()) <= 2
    assert body["retry_after"] == int(refused["Retry-After"])
    assert body["quota"]["used"] == spent
    assert body["estimate"]["tokens"] == estimate.tokens
    assert Conversation.objects.count() == 1


@pytest.mark.django_db(transaction=True)
def test_stream_is_refused_by_the_quota_too(make_key: Any, api_client: Any) -> None:
    _, raw = make_key(["read", "write"], daily_quota=1)
    api_client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    response = api_client.post(
        "/stream/5a1d7e2c-0c44-4b8e-9d8a-2f6b1e3c9d70", {"message": QUESTION}, format="json"
    )
    assert response.status_code == 429
    assert response.json()["code"] == "quota_exceeded"
    assert int(response["Retry-After"]) >= 1
    assert Conversation.objects.count() == 0


@pytest.fixture
def dead_redis(settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    monkeypatch.setattr(quota, "_down_until", {})
    monkeypatch.setattr(quota, "_last_warning", 0.0)


@pytest.mark.django_db
def test_database_fallback_when_redis_is_down(make_key: Any, dead_redis: None) -> None:
    row, _ = make_key(["write"], daily_quota=0.05, daily_quota_unit="usd")
    errors_before = _sample("polyagents_quota_backend_errors_total", {})
    held = quota.reserve(row.pk, tokens=10**9, usd=0.03)
    assert held is not None
    assert held["backend"] == "database"
    assert _sample("polyagents_quota_backend_errors_total", {}) == errors_before + 1  # then backs off
    with pytest.raises(quota.QuotaExceeded) as refused:
        quota.reserve(row.pk, tokens=0, usd=0.03)  # 0.03 held + 0.03 > 0.05
    assert refused.value.state.backend == "database"
    assert refused.value.state.retry_after() == pytest.approx(seconds_to_midnight(), abs=2)
    quota.settle(held, tokens=12345, usd=0.01)
    usage = QuotaUsage.objects.get(api_key=row)
    assert (usage.used, usage.reserved) == (pytest.approx(0.01), 0.0)
    assert quota.reserve(row.pk, tokens=0, usd=0.03) is not None  # 0.01 + 0.03 fits
    quota.settle(held, tokens=1, usd=1.0)  # settling twice charges once
    assert QuotaUsage.objects.get(api_key=row).used == pytest.approx(0.01)
    assert quota.reserve(None, tokens=1, usd=1) is None  # no key (a user's token): no quota


@requires_redis
@pytest.mark.django_db
def test_redis_counter_starts_from_the_database_record(make_key: Any) -> None:
    row, _ = make_key(["write"], daily_quota=100)
    QuotaUsage.objects.create(api_key=row, day=quota.today(), used=70)
    with pytest.raises(quota.QuotaExceeded):
        quota.reserve(row.pk, tokens=31, usd=0)
    held = quota.reserve(row.pk, tokens=30, usd=0)
    assert held is not None
    assert held["backend"] == "redis"
    state = quota.usage(row.pk)
    assert state is not None
    assert (state.used, state.reserved, state.remaining) == (70, 30, 0)
    quota.settle(held, tokens=10, usd=0)
    state = quota.usage(row.pk)
    assert state is not None
    assert (state.used, state.reserved) == (80, 0)
    assert QuotaUsage.objects.get(api_key=row).used == 80


WORKER = """
import os, sys, time
import django
django.setup()
from gateway import quota
key_id, attempts, go = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
quota.reserve(key_id, tokens=0, usd=0)  # connect (and load the script) before the start
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.005)
allowed = 0
for _ in range(attempts):
    try:
        quota.reserve(key_id, tokens=1, usd=0)
        allowed += 1
    except quota.QuotaExceeded:
        pass
print("allowed", allowed, quota.usage(key_id).backend, flush=True)
"""


def _run_two_processes(key_id: int, redis_url: str | None, tmp_path: Path) -> list[tuple[int, str]]:
    """Two OS processes reserving 1 token 60 times each from one quota; (allowed, backend) of each."""
    db = connections["default"].settings_dict
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL", "TEST_DB_SUFFIX")}
    env.update(
        DJANGO_SETTINGS_MODULE="polyagents_site.test_settings",
        PYTHONPATH=str(ROOT),
        DATABASE_URL=f"postgresql://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
        REDIS_KEY_PREFIX=settings.REDIS_KEY_PREFIX,
    )
    if redis_url:
        env["REDIS_URL"] = redis_url
    go = tmp_path / "go"
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(key_id), "60", str(go)],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        for worker in workers:
            assert worker.stdout is not None
            line = worker.stdout.readline()
            assert line.strip() == "ready", (line, worker.stderr.read() if worker.stderr else "")
        go.touch()
        results = []
        for worker in workers:
            out, err = worker.communicate(timeout=120)
            assert worker.returncode == 0, err
            _, allowed, backend = out.split()
            results.append((int(allowed), backend))
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    return results


@requires_redis
@requires_postgres
@pytest.mark.django_db(transaction=True)
def test_two_processes_share_one_quota_in_redis(make_key: Any, tmp_path: Path) -> None:
    row, _ = make_key(["write"], daily_quota=50)
    results = _run_two_processes(row.pk, str(settings.REDIS_URL), tmp_path)
    print(f"\nquota 50 tokens, 2 processes x 60 reservations: allowed {[a for a, _ in results]}")
    assert {backend for _, backend in results} == {"redis"}
    assert sum(allowed for allowed, _ in results) == 50  # never more, never fewer
    state = quota.usage(row.pk)
    assert state is not None
    assert state.reserved == 50


@requires_postgres
@pytest.mark.django_db(transaction=True)
def test_two_processes_share_one_quota_in_the_database(make_key: Any, tmp_path: Path) -> None:
    row, _ = make_key(["write"], daily_quota=50)
    results = _run_two_processes(row.pk, None, tmp_path)
    print(f"\nquota 50 tokens, 2 processes x 60 reservations (database): allowed {[a for a, _ in results]}")
    assert {backend for _, backend in results} == {"database"}
    assert sum(allowed for allowed, _ in results) == 50
    assert QuotaUsage.objects.get(api_key=row).reserved == 50


# --- keys: command, DEFAULT_API_KEYS, admin, whoami --------------------------------------
@pytest.mark.django_db
def test_create_api_key_with_a_daily_quota() -> None:
    out = StringIO()
    call_command(
        "create_api_key",
        "--name",
        "metered",
        "--permissions",
        "read,write",
        "--daily-quota",
        "250000",
        stdout=out,
    )
    key = ApiKey.objects.get(name="metered")
    assert (key.daily_quota, key.daily_quota_unit) == (250000, "tokens")
    assert "Daily quota: 250000 tokens per UTC day." in out.getvalue()
    call_command(
        "create_api_key",
        "--name",
        "dollars",
        "--daily-quota",
        "2.5",
        "--quota-unit",
        "usd",
        stdout=StringIO(),
    )
    assert ApiKey.objects.get(name="dollars").daily_quota_unit == "usd"
    for bad in ("0", "-1", "nan", "inf"):
        with pytest.raises(CommandError, match="--daily-quota"):
            call_command("create_api_key", "--name", "x", "--daily-quota", bad, stdout=StringIO())


@pytest.mark.django_db
def test_default_api_keys_carry_their_quota() -> None:
    spec = ApiKeySpec(
        name="svc", key="pk_" + "q" * 40, permissions=["read", "write"], daily_quota=5, daily_quota_unit="usd"
    )
    assert keys_load_defaults([spec]) == [("svc", "created")]
    key = ApiKey.objects.get(name="svc")
    assert (key.daily_quota, key.daily_quota_unit) == (5, "usd")
    changed = spec.model_copy(update={"daily_quota": 7.5})
    assert keys_load_defaults([changed]) == [("svc", "updated")]
    assert ApiKey.objects.get(name="svc").daily_quota == 7.5
    with pytest.raises(ValueError, match="daily_quota"):
        ApiKeySpec(name="svc", key="pk_" + "q" * 40, permissions=["read"], daily_quota=0)
    with pytest.raises(ValueError, match="daily_quota_unit"):
        ApiKeySpec.model_validate(
            {
                "name": "svc",
                "key": "pk_" + "q" * 40,
                "permissions": ["read"],
                "daily_quota": 1,
                "daily_quota_unit": "eur",
            }
        )


@pytest.mark.django_db
def test_whoami_without_a_quota(client_with: Any) -> None:
    assert client_with("read").get("/auth/whoami").json()["quota"] is None


@pytest.mark.django_db
@pytest.mark.urls("tests.test_admin")
def test_admin_sets_the_quota_and_shows_todays_usage(admin_client: Any, make_key: Any) -> None:
    response = admin_client.post(
        "/django-admin/gateway/apikey/add/",
        {
            "name": "metered",
            "permissions": ["read", "write"],
            "daily_quota": "1000",
            "daily_quota_unit": "tokens",
            "expires_at_0": "",
            "expires_at_1": "",
        },
        follow=True,
    )
    assert response.status_code == 200
    key = ApiKey.objects.get(name="metered")
    assert (key.daily_quota, key.daily_quota_unit) == (1000, "tokens")
    held = quota.reserve(key.pk, tokens=300, usd=0)
    quota.settle(held, tokens=120, usd=0)
    listing = admin_client.get("/django-admin/gateway/apikey/").content.decode()
    assert "120 of 1000 tokens" in listing
    page = admin_client.get(f"/django-admin/gateway/apikey/{key.pk}/change/").content.decode()
    assert "120 of 1000 tokens" in page
    refused = admin_client.post(
        "/django-admin/gateway/apikey/add/",
        {
            "name": "bad",
            "permissions": ["read"],
            "daily_quota": "-5",
            "daily_quota_unit": "tokens",
            "expires_at_0": "",
            "expires_at_1": "",
        },
    )
    assert refused.status_code == 200
    assert not ApiKey.objects.filter(name="bad").exists()
    assert "positive number" in refused.content.decode()
    usage_page = admin_client.get("/django-admin/gateway/quotausage/").content.decode()
    assert "metered" in usage_page


@pytest.mark.django_db
def test_keys_api_creates_a_key_with_a_quota(client_with: Any) -> None:
    admin = client_with("admin")
    body = {
        "name": "api-metered",
        "permissions": ["read", "write"],
        "daily_quota": 2.5,
        "daily_quota_unit": "usd",
    }
    created = admin.post("/auth/keys", body, format="json")
    assert created.status_code == 201, created.content
    assert (created.json()["daily_quota"], created.json()["daily_quota_unit"]) == (2.5, "usd")
    assert ApiKey.objects.get(name="api-metered").daily_quota == 2.5
    for bad in (0, -1, "2", True):
        refused = admin.post("/auth/keys", {**body, "daily_quota": bad}, format="json")
        assert refused.status_code == 400
        assert "daily_quota" in refused.json()["errors"]


def test_quota_state_resets_at_utc_midnight() -> None:
    state = quota.QuotaState(
        quota=10, unit="tokens", used=4, reserved=3, day=datetime(2026, 3, 1).date(), backend="redis"
    )
    assert state.remaining == 3
    assert state.to_dict()["resets_at"] == "2026-03-02T00:00:00Z"
    assert state.retry_after(datetime(2026, 3, 1, 23, 59, 30, tzinfo=UTC)) == 30
    assert state.retry_after(datetime(2026, 3, 2, 0, 0, 1, tzinfo=UTC)) == 1
