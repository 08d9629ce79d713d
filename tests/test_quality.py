"""Calibrated confidence through the real stack, reliabilities from stored history, and feedback."""

from __future__ import annotations

import uuid

import pytest
from asgiref.sync import async_to_sync

from agents.providers.registry import reset_providers
from consensus import Reliabilities, normalize_answer, parse_reply, posterior
from conversations import assessment
from conversations.models import ConsensusResult, Conversation, Event, Feedback, Message
from conversations.services import conversation_run, conversation_start
from gateway.principal import Principal

QUESTION = "What is 17 + 25?"


@pytest.fixture(autouse=True)
def _providers():
    reset_providers()
    assessment.forget_fits()
    yield
    reset_providers()


def first_turn_answers(conversation_id: str) -> list[tuple[str, str]]:
    rows = Message.objects.filter(conversation_id=conversation_id, role="agent", turn=1, status="ok")
    return [(f"{m.provider}:{m.model}", normalize_answer(m.position)) for m in rows.order_by("agent_id")]


@pytest.mark.django_db(transaction=True)
def test_chat_reports_the_calibrated_confidence_and_the_agreement(client_with):
    response = client_with("read", "write").post(
        "/chat", {"message": QUESTION, "num_agents": 3, "turns": 1}, format="json"
    )
    assert response.status_code == 200, response.content
    body = response.json()
    result = ConsensusResult.objects.get(conversation_id=body["conversation_id"])
    # The offline simulator outside quiz mode knows nothing: its answers carry no evidence,
    # so the confidence is the prior's, one in 1/s + 1 plausible values.
    models = frozenset(m for m, _ in first_turn_answers(body["conversation_id"]))
    expected = posterior(first_turn_answers(body["conversation_id"]), Reliabilities(uninformed=models)).of(
        result.details["winner_key"]
    )
    assert expected == pytest.approx(1 / (1 / Reliabilities().coincidence + 1))
    assert body["confidence"] == pytest.approx(expected)
    assert body["consensus"]["confidence"] == pytest.approx(expected)
    assert result.confidence == pytest.approx(expected)
    assert result.details["calibration"]["raw"] == pytest.approx(expected, abs=1e-6)
    assert result.details["calibration"]["history_panels"] == 0
    assert result.details["calibration"]["confidence_source"] == "prior"
    assert body["consensus"]["confidence_source"] == "prior"
    # The old figure, under its own name.
    assert body["agreement"] == pytest.approx(result.details["agreement"])
    assert body["consensus"]["agreement"] == body["agreement"]
    assert 0 <= body["consensus"]["margin"] <= body["consensus"]["share"] <= 1
    event = Event.objects.get(conversation_id=body["conversation_id"], type="consensus_reached")
    assert event.data["confidence"] == pytest.approx(expected, abs=1e-4)
    assert event.data["agreement"] == pytest.approx(body["agreement"], abs=1e-4)
    assert {"share", "margin"} <= set(event.data)
    assert event.data["confidence_source"] == "prior"


@pytest.mark.django_db(transaction=True)
def test_a_streamed_run_stores_the_same_confidence():
    principal = Principal(kind="user", permissions=frozenset({"read", "write"}), name="t", user_id=1)
    conversation, exchange = async_to_sync(conversation_start)(
        principal=principal, message=QUESTION, num_agents=3, turns=2, create_with_id=True
    )
    done = async_to_sync(conversation_run)(conversation_id=conversation.pk, exchange=exchange)
    result = ConsensusResult.objects.get(conversation=conversation)
    assert done.confidence == pytest.approx(result.confidence)
    completed = Event.objects.get(conversation=conversation, type="conversation_completed")
    assert completed.data["confidence"] == pytest.approx(result.confidence)
    reached = Event.objects.get(conversation=conversation, type="consensus_reached")
    assert reached.data["agreement"] == pytest.approx(result.details["agreement"], abs=1e-4)


def store_panel(answers: dict[str, str], model_of: dict[str, str]) -> None:
    conversation = Conversation.objects.create(owner="user:1", status="completed", num_agents=len(answers))
    for agent, position in answers.items():
        Message.objects.create(
            conversation=conversation,
            role="agent",
            agent_id=agent,
            turn=1,
            content=f"FINAL POSITION: {position}",
            position=position,
            provider="simulated",
            model=model_of[agent],
        )


@pytest.mark.django_db
def test_reliabilities_are_fitted_from_stored_first_turn_answers():
    models = {"a0": "good", "a1": "good", "a2": "poor"}
    for index in range(60):
        truth = str(index)
        poor = truth if index % 3 == 0 else f"{index}{index % 4}x"
        store_panel({"a0": truth, "a1": truth, "a2": poor}, models)
    fitted = assessment.reliabilities()
    assert fitted.panels == 60
    assert fitted.of("simulated:good") > 0.85 > 0.5 > fitted.of("simulated:poor")
    # Cached: a new panel does not change the figure until the cache expires.
    store_panel({"a0": "x", "a1": "y", "a2": "z"}, models)
    assert assessment.reliabilities().panels == 60
    assessment.forget_fits()
    assert assessment.reliabilities().panels == 61


@pytest.mark.django_db(transaction=True)
def test_the_fit_follows_the_history_within_the_cache_time():
    models = {"a0": "good", "a1": "good", "a2": "poor"}
    fitted = assessment.reliabilities()
    assert fitted.panels == 0
    assert fitted.source == "prior"
    for index in range(assessment.REFIT_MIN):
        store_panel({"a0": str(index), "a1": str(index), "a2": "x"}, models)
    started = [assessment.refits.note(assessment.reliabilities()) for _ in range(assessment.REFIT_MIN)]
    # One refit, on the exchange that made REFIT_MIN new ones; none before it.
    assert started[:-1] == [None] * (assessment.REFIT_MIN - 1)
    thread = started[-1]
    assert thread is not None
    thread.join(timeout=30)
    refitted = assessment.reliabilities()  # from this process's memory, before the cache expires
    assert refitted.panels == assessment.REFIT_MIN
    assert refitted.source == "history"
    assert assessment.refit_interval(0) == assessment.REFIT_MIN
    assert assessment.refit_interval(500) == 50


def test_the_source_of_the_confidence_is_named():
    from consensus import PlattScaling

    assert assessment.confidence_source(Reliabilities(), PlattScaling()) == "prior"
    assert assessment.confidence_source(Reliabilities(panels=3), PlattScaling(labelled=29)) == "history"
    assert assessment.confidence_source(Reliabilities(), PlattScaling(labelled=30)) == "feedback"


# --- feedback ------------------------------------------------------------------------------------


@pytest.fixture
def owned(make_key):
    """A finished conversation owned by a fresh read+write key, and that key's client."""
    from rest_framework.test import APIClient

    row, raw = make_key(["read", "write"])
    conversation = Conversation.objects.create(owner=f"key:{row.pk}", status="completed", exchanges=1)
    ConsensusResult.objects.create(
        conversation=conversation, method="majority", reached=True, winner="A", confidence=0.8,
        details={"calibration": {"raw": 0.8}},
    )  # fmt: skip
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    return conversation, client


def feedback(client, conversation_id, body):
    return client.post(f"/conversations/{conversation_id}/feedback", body, format="json")


@pytest.mark.django_db
def test_the_owner_stores_and_replaces_feedback(owned):
    conversation, client = owned
    first = feedback(client, conversation.pk, {"correct": True, "note": "checked"})
    assert first.status_code == 201, first.content
    assert first.json()["correct"] is True
    assert first.json()["exchange"] == 1
    second = feedback(client, conversation.pk, {"correct": False})
    assert second.status_code == 200
    row = Feedback.objects.get(conversation=conversation)
    assert (row.correct, row.note, row.exchange) == (False, "", 1)
    assert row.author == conversation.owner


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "correct"),
        ({"correct": "true"}, "correct"),
        ({"correct": 1}, "correct"),
        ({"correct": None}, "correct"),
        ({"correct": True, "note": "x" * 2001}, "note"),
        ({"correct": True, "note": "bad\x00"}, "note"),
        ({"correct": True, "note": 5}, "note"),
        ({"correct": True, "exchange": 0}, "exchange"),
        ({"correct": True, "verdict": "yes"}, "verdict"),
    ],
)
def test_bad_feedback_is_a_400_naming_the_field(owned, body, field):
    conversation, client = owned
    response = feedback(client, conversation.pk, body)
    assert response.status_code == 400, response.content
    assert field in response.json()["errors"]
    assert not Feedback.objects.exists()


@pytest.mark.django_db
def test_a_body_that_is_not_an_object_is_a_400(owned):
    conversation, client = owned
    response = client.post(
        f"/conversations/{conversation.pk}/feedback", "[true]", content_type="application/json"
    )
    assert response.status_code == 400
    assert response.json()["code"]


@pytest.mark.django_db
@pytest.mark.parametrize("ident", ["unknown", "not-a-uuid", "12345"])
def test_unknown_or_foreign_conversations_are_a_404(owned, client_with, ident):
    conversation, _ = owned
    target = {"unknown": uuid.uuid4(), "not-a-uuid": "not-a-uuid", "12345": "12345"}[ident]
    response = feedback(client_with("read", "write"), target, {"correct": True})
    assert response.status_code == 404
    foreign = feedback(client_with("read", "write"), conversation.pk, {"correct": True})
    assert foreign.status_code == 404
    assert foreign.json()["code"] == "not_found"


@pytest.mark.django_db
def test_an_admin_may_judge_anyones_answer(owned, client_with):
    conversation, _ = owned
    assert (
        feedback(client_with("read", "write", "admin"), conversation.pk, {"correct": True}).status_code == 201
    )


@pytest.mark.django_db
def test_credentials_and_the_write_permission_are_needed(owned, api_client, client_with):
    conversation, _ = owned
    assert feedback(api_client, conversation.pk, {"correct": True}).status_code == 401
    assert feedback(client_with("read"), conversation.pk, {"correct": True}).status_code == 403


@pytest.mark.django_db
def test_an_exchange_without_an_answer_is_a_409(owned):
    conversation, client = owned
    assert feedback(client, conversation.pk, {"correct": True, "exchange": 2}).status_code == 409
    Conversation.objects.filter(pk=conversation.pk).update(status="running")
    assert feedback(client, conversation.pk, {"correct": True}).status_code == 409


@pytest.mark.django_db
def test_enough_feedback_recalibrates_the_confidence():
    for index in range(40):
        conversation = Conversation.objects.create(owner="user:1", status="completed", exchanges=1)
        ConsensusResult.objects.create(
            conversation=conversation, method="majority", reached=True, winner="A", confidence=0.9,
            details={"calibration": {"raw": 0.9}},
        )  # fmt: skip
        Feedback.objects.create(conversation=conversation, exchange=1, correct=index % 2 == 0)
    scaling = assessment.recalibration()
    assert scaling.labelled == 40
    assert scaling(0.9) == pytest.approx(0.5, abs=0.1)
    assert assessment.recalibration() == scaling  # cached


# --- manage.py evaluate ----------------------------------------------------------------------------


def write_questions(tmp_path, lines: list[str]):
    path = tmp_path / "questions.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


QUESTIONS = [
    '{"question": "What is 17 + 25?", "answer": "42"}',
    '{"question": "What is the capital of France?", "answer": "Paris"}',
    "",
    '{"question": "Is 91 a prime number?", "answer": "No"}',
]


@pytest.mark.django_db(transaction=True)
def test_evaluate_on_the_simulator_that_knows_nothing_reports_so(tmp_path):
    from io import StringIO

    from django.core.management import call_command

    out = StringIO()
    call_command(
        "evaluate", str(write_questions(tmp_path, QUESTIONS)), "--agents", "3", "--turns", "1", stdout=out
    )
    text = out.getvalue()
    assert "no evidence from simulated:" in text
    stored = next(line for line in text.splitlines() if "stored history, source prior" in line)
    mean = float(stored.split("mean ")[1].split(",")[0])
    assert mean <= 1 / (1 / Reliabilities().coincidence + 1) + 1e-3


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(("accuracy", "shown"), [(1.0, "100.0%"), (0.0, "0.0%")])
def test_evaluate_scores_single_agents_and_the_panel(tmp_path, accuracy, shown):
    from io import StringIO

    from django.core.management import call_command

    out = StringIO()
    path = write_questions(tmp_path, QUESTIONS)
    call_command(
        "evaluate", str(path), "--agents", "3", "--turns", "1", "--quiz-accuracy", str(accuracy), stdout=out
    )
    text = out.getvalue()
    assert "3 questions, 3 agents, 1 turns" in text
    singles = [line for line in text.splitlines() if line.strip().startswith("single")]
    assert len(singles) == 3
    assert all(line.endswith(shown) for line in singles)
    panel = next(line for line in text.splitlines() if line.strip().startswith("panel"))
    assert panel.endswith(shown)
    assert "failed runs 0" in text


def test_the_shipped_question_set_is_well_formed():
    from pathlib import Path

    from conversations.management.commands.evaluate import read_items

    items = read_items(Path(__file__).resolve().parent.parent / "bench" / "questions.jsonl")
    assert len(items) >= 30
    assert len({i.question for i in items}) == len(items)
    for item in items:
        # Every expected answer survives the reply parser (no "n/a"-like or one-letter answers).
        assert parse_reply("a", f"FINAL POSITION: {item.answer}") is not None, item.answer


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (["not json"], ":1: not JSON"),
        (['{"question": "q"}'], ':1: expected an object with exactly "question" and "answer"'),
        (['{"question": "q", "answer": "a", "x": 1}'], ":1: expected an object"),
        (['{"question": "", "answer": "a"}'], ":1: question must be"),
        (['{"question": "q", "answer": true}'], ":1: answer must be"),
        (['{"question": "q", "answer": "a"}', '{"question": "q", "answer": "..."}'], ":2: answer must be"),
        ([""], "holds no questions"),
    ],
)
def test_evaluate_refuses_a_malformed_file_naming_the_line(tmp_path, lines, message):
    from django.core.management import call_command
    from django.core.management.base import CommandError

    path = write_questions(tmp_path, lines)
    with pytest.raises(CommandError, match=message.replace("(", r"\(")):
        call_command("evaluate", str(path), "--quiz-accuracy", "1")


def test_evaluate_refuses_a_missing_file(tmp_path):
    from django.core.management import call_command
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="cannot read"):
        call_command("evaluate", str(tmp_path / "absent.jsonl"))
