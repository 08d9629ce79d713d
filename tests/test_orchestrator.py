"""POST /chat and the orchestrator, end to end through the real stack (simulated agents)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from io import StringIO
from typing import Any

import pytest
from django.conf import settings
from django.core.management import call_command

from agents.orchestrator import AgentResult, Orchestrator, panel_shapes, quorum_size
from agents.profiles import build_panel
from agents.providers.base import Usage
from agents.providers.registry import reset_providers
from agents.providers.simulated import SimulatedProvider
from consensus import parse_reply
from conversations.models import ConsensusResult, Conversation, Event, Message, Vote
from conversations.services import conversation_run, conversation_start
from gateway.principal import Principal
from polyagents_site.config import AgentSpec
from telemetry.models import ErrorRecord

QUESTION = "Should a small team write its own retry library or use tenacity?"


@pytest.fixture
def config(monkeypatch):
    """The live configuration; attributes patched per test are restored afterwards."""
    reset_providers()
    yield settings.CONFIG
    reset_providers()


@pytest.fixture
def writer(client_with):
    return client_with("read", "write")


def chat(client, **body):
    return client.post("/chat", {"message": QUESTION, **body}, format="json")


@pytest.mark.django_db(transaction=True)
class TestIntegration:
    def test_chat_answers_in_the_briefs_shape(self, writer, config):
        response = chat(writer, num_agents=3, turns=2)
        assert response.status_code == 200, response.content
        body = response.json()
        assert uuid.UUID(body["conversation_id"])
        assert {a["agent_id"] for a in body["agent_responses"]} == {"agent_0", "agent_1", "agent_2"}
        for agent in body["agent_responses"]:
            assert agent["response"]
            assert agent["model"]
            assert agent["temperature"] == config.GEMINI_TEMPERATURE
            assert agent["simulated"] is True
        meta = body["metadata"]
        assert meta["status"] in ("completed", "no_consensus")
        assert meta["turns_completed"] in (1, 2)
        assert meta["duration"] >= 0
        assert 0.0 <= body["confidence"] <= 1.0
        assert len(body["votes"]) == 3
        assert body["usage"]["total"] > 0

    def test_chat_persists_messages_votes_and_result(self, writer, config):
        body = chat(writer, num_agents=3, turns=2).json()
        conversation = Conversation.objects.get(pk=body["conversation_id"])
        turns = conversation.turns_completed
        assert Message.objects.filter(conversation=conversation, role="user").count() == 1
        assert Message.objects.filter(conversation=conversation, role="agent").count() == 3 * turns
        assert Vote.objects.filter(conversation=conversation).count() == 3
        result = ConsensusResult.objects.get(conversation=conversation)
        assert result.confidence == pytest.approx(body["confidence"])
        assert conversation.prompt_tokens > 0
        assert conversation.status == body["metadata"]["status"]
        if conversation.status == "completed":
            assert conversation.consensus_result == body["consensus_result"]

    def test_every_event_is_stored_in_sequence(self, writer, config):
        body = chat(writer, num_agents=2, turns=2).json()
        events = list(Event.objects.filter(conversation_id=body["conversation_id"]).order_by("seq"))
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        assert Conversation.objects.get(pk=body["conversation_id"]).last_seq == len(events)
        types = [e.type for e in events]
        assert types[0] == "conversation_started"
        assert types[-1] == "conversation_completed"
        assert "consensus_reached" in types
        assert types.count("agent_response") == 2 * body["metadata"]["turns_completed"]
        for event in events:
            assert event.data["conversation_id"] == body["conversation_id"]
            assert event.data["timestamp"].endswith("Z")

    def test_read_only_key_cannot_start_a_chat(self, client_with, config):
        response = chat(client_with("read"))
        assert response.status_code == 403
        assert Conversation.objects.count() == 0

    def test_missing_credentials_are_refused(self, api_client, config):
        response = chat(api_client)
        assert response.status_code == 401
        assert Conversation.objects.count() == 0

    def test_continuing_a_conversation_shows_the_agents_earlier_exchanges(self, writer, config):
        first = chat(writer, num_agents=2, turns=1).json()
        second = writer.post(
            "/chat",
            {
                "message": "And for a large team?",
                "conversation_id": first["conversation_id"],
                "num_agents": 2,
                "turns": 1,
            },
            format="json",
        )
        assert second.status_code == 200, second.content
        assert second.json()["exchange"] == 2
        conversation = Conversation.objects.get(pk=first["conversation_id"])
        assert conversation.exchanges == 2
        assert Message.objects.filter(conversation=conversation, role="user").count() == 2
        # The second exchange's prompt carried the first question (checked on the orchestrator).
        assert conversation.metadata  # the second exchange ran
        from asgiref.sync import async_to_sync

        from conversations.services import _abegin

        Conversation.objects.filter(pk=conversation.pk).update(status="running")
        history = async_to_sync(_abegin)(conversation.pk, 2).history
        assert history[0][0] == QUESTION

    def test_unknown_conversation_id_is_404(self, writer, config):
        response = chat(writer, conversation_id=str(uuid.uuid4()))
        assert response.status_code == 404
        assert response.json()["code"] == "not_found"

    def test_someone_elses_conversation_is_404(self, writer, client_with, config):
        body = chat(writer, num_agents=1, turns=1).json()
        other = client_with("read", "write")
        response = chat(other, conversation_id=body["conversation_id"])
        assert response.status_code == 404

    def test_running_conversation_refuses_a_second_run(self, writer, config):
        body = chat(writer, num_agents=1, turns=1).json()
        Conversation.objects.filter(pk=body["conversation_id"]).update(status="running")
        response = chat(writer, conversation_id=body["conversation_id"])
        assert response.status_code == 409
        assert Message.objects.filter(conversation_id=body["conversation_id"], role="user").count() == 1

    def test_no_agent_answering_is_a_503_with_a_retry_hint_and_no_invented_answer(
        self, writer, config, monkeypatch
    ):
        monkeypatch.setattr(config, "SIMULATED_FAILURE_RATE", 1.0)
        monkeypatch.setattr(config, "RETRY_MAX_ATTEMPTS", 1)
        reset_providers()
        response = chat(writer, num_agents=3, turns=2)
        assert response.status_code == 503
        body = response.json()
        assert body["code"] == "agents_unavailable"
        assert int(response["Retry-After"]) > 0
        conversation = Conversation.objects.get(pk=body["conversation_id"])
        assert conversation.status == "failed"
        assert conversation.consensus_result == ""
        assert not ConsensusResult.objects.filter(conversation=conversation).exists()
        assert set(
            Message.objects.filter(conversation=conversation, role="agent").values_list("status", flat=True)
        ) == {"failed"}
        assert Event.objects.filter(conversation=conversation, type="conversation_failed").exists()

    def test_temperature_zero_stays_zero(self, writer, config, monkeypatch):
        monkeypatch.setattr(
            config,
            "AGENT_MODELS_CONFIG",
            [AgentSpec(agent_id="cold", model="m-a", temperature=0.0, personality="analytical")],
        )
        panel = build_panel(2)
        assert panel[0].temperature == 0.0
        assert panel[0].personality == "analytical"
        assert panel[1].agent_id == "agent_0"
        body = chat(writer, num_agents=1, turns=1).json()
        assert body["agent_responses"][0]["temperature"] == 0.0

    def test_bounds_on_agents_and_turns(self, writer, config):
        assert chat(writer, num_agents=config.MAX_AGENTS + 1).status_code == 400
        assert chat(writer, turns=config.MAX_TURNS + 1).status_code == 400
        assert chat(writer, num_agents=0).status_code == 400
        assert Conversation.objects.count() == 0

    def test_chat_command_prints_the_consensus(self, config):
        out = StringIO()
        call_command("chat", QUESTION, "--agents", "3", "--turns", "1", stdout=out)
        text = out.getvalue()
        assert "Votes" in text
        assert "conversation" in text
        assert Conversation.objects.count() == 1


@pytest.mark.django_db(transaction=True)
class TestResume:
    @staticmethod
    async def resume_after_a_stored_first_turn(answer: Callable[[int], dict[str, Any]]) -> Conversation:
        """Run a 3-agent, 2-turn exchange whose turn 1 a worker stored before it died."""
        principal = Principal(kind="api_key", permissions=frozenset({"read", "write"}), api_key_id=None)
        conversation, exchange = await conversation_start(
            principal=principal, message=QUESTION, num_agents=3, turns=2
        )
        for index in range(3):
            await Message.objects.acreate(
                conversation=conversation,
                exchange=exchange,
                role="agent",
                agent_id=f"agent_{index}",
                turn=1,
                **answer(index),
            )
        await Conversation.objects.filter(pk=conversation.pk).aupdate(status="running")
        return await conversation_run(conversation_id=conversation.pk, exchange=exchange)

    async def test_a_crashed_run_resumes_after_the_last_complete_turn_without_duplicates(self, config):
        done = await self.resume_after_a_stored_first_turn(
            lambda index: {
                "content": f"Reasoning {index}.\nFINAL POSITION: Option {'AB'[index % 2]}\nCONFIDENCE: 0.6",
                "position": f"Option {'AB'[index % 2]}",
            }
        )
        conversation = done
        assert done.status in ("completed", "no_consensus")
        assert done.turns_completed == 2
        turn1 = [m async for m in Message.objects.filter(conversation=conversation, turn=1)]
        assert len(turn1) == 3
        assert {m.content for m in turn1 if m.agent_id == "agent_0"} == {
            "Reasoning 0.\nFINAL POSITION: Option A\nCONFIDENCE: 0.6"
        }
        assert await Message.objects.filter(conversation=conversation, turn=2).acount() == 3
        started = await Event.objects.filter(conversation=conversation, type="conversation_started").afirst()
        assert started is not None
        assert started.data["resumed"] is True

    async def test_a_resumed_run_still_counts_the_repair_calls_of_stored_turns(self, config):
        # Each stored answer of turn 1 needed a repair call.
        done = await self.resume_after_a_stored_first_turn(
            lambda index: {
                "content": "Blue, all things considered.",
                "raw_content": "Blue, all things considered.",
                "position": "Blue",
                "position_source": "repair",
                "repair_calls": 1,
                "prompt_tokens": 30,
                "completion_tokens": 12,
                "repair_prompt_tokens": 5,
                "repair_completion_tokens": 3,
            }
        )
        assert done.metadata["extra_calls"]["repair"] == 3
        assert done.metadata["extra_tokens"]["repair"] == {"prompt": 15, "completion": 9, "total": 24}

    async def test_running_a_finished_exchange_again_changes_nothing(self, config):
        principal = Principal(kind="api_key", permissions=frozenset({"read", "write"}), api_key_id=None)
        conversation, exchange = await conversation_start(
            principal=principal, message=QUESTION, num_agents=2, turns=1
        )
        await conversation_run(conversation_id=conversation.pk, exchange=exchange)
        before = await Message.objects.filter(conversation=conversation).acount()
        events = await Event.objects.filter(conversation=conversation).acount()
        again = await conversation_run(conversation_id=conversation.pk, exchange=exchange)
        assert again.is_terminal
        assert await Message.objects.filter(conversation=conversation).acount() == before
        assert await Event.objects.filter(conversation=conversation).acount() == events

    async def test_cancel_requested_stops_the_run(self, config, monkeypatch):
        import conversations.services as services

        monkeypatch.setattr(config, "SIMULATED_LATENCY", 0.5)
        reset_providers()
        principal = Principal(kind="api_key", permissions=frozenset({"read", "write"}), api_key_id=None)
        conversation, exchange = await conversation_start(
            principal=principal, message=QUESTION, num_agents=2, turns=3
        )
        run = asyncio.ensure_future(conversation_run(conversation_id=conversation.pk, exchange=exchange))
        await asyncio.sleep(0.2)
        await services.conversation_cancel(conversation_id=conversation.pk)
        done = await asyncio.wait_for(run, timeout=10)
        assert done.status == "cancelled"
        assert await Event.objects.filter(conversation=conversation, type="conversation_failed").aexists()


class TestOrchestratorUnit:
    """The orchestrator alone, with the simulated provider and an in-memory emit."""

    async def test_turn_agents_run_in_parallel(self, config, monkeypatch):
        monkeypatch.setattr(config, "SIMULATED_LATENCY", 0.3)
        reset_providers()
        events: list[tuple[str, dict]] = []

        async def emit(type: str, **data):
            events.append((type, data))

        panel = build_panel(4)
        orchestrator = Orchestrator(panel=panel, question=QUESTION, turns=1, emit=emit, stream=False)
        loop = asyncio.get_running_loop()
        start = loop.time()
        outcome = await orchestrator.run()
        elapsed = loop.time() - start
        # Four agents at 0.3 s each, plus a vote round: sequential would be >= 1.2 s for the turn alone.
        assert elapsed < 1.0, elapsed
        assert outcome.turns_completed == 1
        assert sum(1 for t, _ in events if t == "agent_response") == 4

    async def test_later_turns_show_each_agent_the_others_answers(self, config):
        async def emit(type: str, **data):
            return None

        panel = build_panel(3)
        orchestrator = Orchestrator(panel=panel, question=QUESTION, turns=2, emit=emit, stream=False)
        text = "Because.\nFINAL POSITION: Use tenacity\nCONFIDENCE: 0.9"
        orchestrator.results[1] = {
            p.agent_id: AgentResult(
                agent_id=p.agent_id,
                turn=1,
                ok=True,
                text=f"{p.agent_id} says. " + text,
                proposal=parse_reply(p.agent_id, text),
                usage=Usage(1, 1),
            )
            for p in panel
        }
        prompt = orchestrator.answer_prompt(panel[0], 2)
        assert "[agent_1, creative]" in prompt
        assert "[agent_2, critical]" in prompt
        assert "[agent_0," not in prompt
        assert "Your previous answer (turn 1)" in prompt
        # Peers read each other's clean answers and the position read from them, not the machine lines;
        # the reply format itself is appended by Provider.complete.
        assert "agent_1 says. Because.\nFinal position: Use tenacity (confidence 0.9)" in prompt
        assert "FINAL POSITION" not in prompt

    async def test_every_call_of_a_run_has_a_shape_warm_up_prepares(self, config, monkeypatch):
        """panel_shapes lists what a run sends (answers, repairs, ballots), so the warm-up's
        prepare covers the first run's calls; a call of another shape would be missed."""
        sent = []
        complete = SimulatedProvider.complete

        async def recorded(provider, request, on_delta=None):
            sent.append(request)
            return await complete(provider, request, on_delta)

        monkeypatch.setattr(SimulatedProvider, "complete", recorded)

        async def emit(type: str, **data):
            return None

        panel = build_panel(3)
        orchestrator = Orchestrator(
            panel=panel, question=QUESTION, turns=2, emit=emit, stream=False, max_output_tokens=321
        )
        await orchestrator.run()

        def shape(r):
            return (r.model, r.system_instruction, r.temperature, r.max_output_tokens, id(r.output))

        prepared = {shape(r) for _, r in panel_shapes(panel, 321)}
        assert len(sent) >= 3  # at least the first turn's answers
        assert {shape(r) for r in sent} <= prepared

    def test_quorum_is_a_strict_majority(self):
        assert [quorum_size(n) for n in (1, 2, 3, 4, 5)] == [1, 2, 2, 3, 3]


@pytest.mark.django_db(transaction=True)
def test_failed_agents_feed_the_error_statistics(client_with, config, monkeypatch):
    monkeypatch.setattr(config, "SIMULATED_FAILURE_RATE", 1.0)
    monkeypatch.setattr(config, "RETRY_MAX_ATTEMPTS", 1)
    reset_providers()
    assert chat(client_with("read", "write"), num_agents=2, turns=1).status_code == 503
    kinds = set(ErrorRecord.objects.values_list("kind", flat=True))
    assert {"agent_call", "chat_conversation"} <= kinds
    stats = client_with("read").get("/statistics").json()
    assert stats["errors"]["agent_call"]["total_24h"] >= 2
    assert stats["errors"]["chat_conversation"]["total_24h"] == 1
