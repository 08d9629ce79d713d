"""Replies end to end through POST /chat and /stream: repair before abstaining, the causes of
no answer, a clean consensus_result, and the chairman's synthesis.

Agents run on the real google-genai client against the local Gemini wire fake (what a new
user with a key sees), or on the simulated provider where the content does not matter.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.test import AsyncClient

from agents.providers.registry import reset_providers
from agents.resilience import reset_breakers
from consensus import REPAIR_INSTRUCTIONS
from conversations.models import ConsensusResult, Conversation, Event, Message
from polyagents_site.asgi import application
from telemetry.metrics import EXTRA_CALLS
from tests.fakes.gemini_server import FakeGemini, ok
from tests.test_stream import drain_runs

QUESTION = "What is six times seven?"
PROSE = "I multiplied six by seven and checked it twice, so my answer is 42."
# Long enough that its final sentence is no last resort, and no "answer is" in it.
RAMBLE = " ".join(["Multiplication is repeated addition, and there are many ways to see it."] * 12)

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def config(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    reset_providers()
    reset_breakers()
    config = settings.CONFIG
    monkeypatch.setattr(config, "RETRY_BASE_DELAY", 0.01)
    monkeypatch.setattr(config, "RETRY_MAX_DELAY", 0.05)
    yield config
    reset_providers()
    reset_breakers()


@pytest.fixture
def gemini(config: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeGemini]:
    """Agents on Gemini, served by the local wire fake."""
    with FakeGemini() as fake:
        monkeypatch.setattr(config, "GEMINI_API_KEY", "test-gemini-key")
        monkeypatch.setattr(config, "GEMINI_BASE_URL", fake.base_url)
        monkeypatch.setattr(config, "LLM_PROVIDER", "gemini")
        reset_providers()
        yield fake


@pytest.fixture
def writer(client_with: Any) -> Any:
    return client_with("read", "write")


def prompt_of(body: dict[str, Any]) -> str:
    return str(body["contents"][0]["parts"][0]["text"])


def is_repair(body: dict[str, Any]) -> bool:
    return REPAIR_INSTRUCTIONS in prompt_of(body)


def chat(client: Any, **body: Any) -> Any:
    return client.post("/chat", {"message": QUESTION, **body}, format="json")


class TestRepair:
    def test_prose_replies_get_one_repair_call_each_and_it_is_counted(
        self, writer: Any, gemini: FakeGemini
    ) -> None:
        # A server without JSON mode, and a model that answers in prose, ignoring the text format.
        gemini.reject_schema()
        gemini.respond(
            lambda model, body: ok("FINAL POSITION: 42\nCONFIDENCE: 0.7") if is_repair(body) else ok(PROSE)
        )
        repairs_before = EXTRA_CALLS.labels("repair")._value.get()
        response = chat(writer, num_agents=3, turns=1)
        assert response.status_code == 200, response.content
        assert EXTRA_CALLS.labels("repair")._value.get() - repairs_before == 3  # /metrics counts them
        body = response.json()
        assert body["metadata"]["status"] == "completed"
        for agent in body["agent_responses"]:
            assert agent["position"] == "42"
            assert agent["confidence"] == 0.7
            assert agent["position_source"] == "repair"
            assert agent["repair_calls"] == 1
            assert agent["abstained"] is False
            assert agent["response"] == PROSE
            # Answer call + repair call, 11 prompt and 7 output tokens each on the fake.
            assert agent["tokens"] == {"prompt": 22, "completion": 14, "total": 36}
        repairs = [b for _, r in gemini.generate_calls if (b := r.body) and is_repair(b)]
        assert len(repairs) == 3
        assert PROSE in prompt_of(repairs[0])  # the agent is shown its own reply
        meta = body["metadata"]
        assert meta["extra_calls"] == {"repair": 3, "synthesis": 0}
        assert meta["extra_tokens"]["repair"] == {"prompt": 33, "completion": 21, "total": 54}
        assert body["usage"]["total"] == 3 * 36  # unanimous: no ballot calls
        assert body["consensus_result"] == PROSE
        stored = Message.objects.filter(conversation_id=body["conversation_id"], role="agent")
        assert {(m.position_source, m.repair_calls) for m in stored} == {("repair", 1)}
        # The repair call's own tokens are kept, so a resumed run counts them again.
        assert {(m.repair_prompt_tokens, m.repair_completion_tokens) for m in stored} == {(11, 7)}

    def test_a_short_reply_whose_repair_fails_falls_back_to_its_final_sentence(
        self, writer: Any, gemini: FakeGemini
    ) -> None:
        gemini.reject_schema()
        gemini.respond(lambda model, body: ok("I already said it.") if is_repair(body) else ok(PROSE))
        body = chat(writer, num_agents=3, turns=1).json()
        assert body["metadata"]["status"] == "completed"
        assert {a["position"] for a in body["agent_responses"]} == {"42"}
        assert {a["position_source"] for a in body["agent_responses"]} == {"final_sentence"}
        assert {a["confidence"] for a in body["agent_responses"]} == {None}
        assert body["metadata"]["extra_calls"]["repair"] == 3

    def test_structured_replies_without_a_position_are_repaired_with_the_position_schema(
        self, writer: Any, gemini: FakeGemini
    ) -> None:
        def respond(model: str, body: dict[str, Any]) -> Any:
            if is_repair(body):
                return ok(json.dumps({"position": "42", "confidence": 0.9}))
            return ok(json.dumps({"answer": "Six sevens make forty-two.", "position": "", "confidence": 0.9}))

        gemini.respond(respond)
        body = chat(writer, num_agents=3, turns=1).json()
        assert body["metadata"]["status"] == "completed"
        assert {a["position_source"] for a in body["agent_responses"]} == {"repair"}
        repair = next(r.body for _, r in gemini.generate_calls if is_repair(r.body))
        schema = repair["generationConfig"]["responseSchema"]
        assert set(schema["properties"]) == {"position", "confidence"}
        assert body["consensus_result"] == "Six sevens make forty-two."


class TestCauses:
    def test_agents_that_answer_without_a_usable_position_give_no_consensus_not_503(
        self, writer: Any, gemini: FakeGemini
    ) -> None:
        gemini.reject_schema()
        gemini.respond(lambda model, body: ok(RAMBLE))
        response = chat(writer, num_agents=3, turns=2)
        assert response.status_code == 200, response.content
        body = response.json()
        meta = body["metadata"]
        assert meta["status"] == "no_consensus"
        assert meta["no_consensus_reason"] == "no_usable_positions"
        assert "usable position" in meta["error"]
        assert "0 of 3 agents answered" not in meta["error"]
        assert body["consensus_result"] is None
        assert body["consensus"] is None
        assert meta["turns_completed"] == 1  # no second turn without positions
        assert meta["extra_calls"]["repair"] == 3
        assert {a["abstained"] for a in body["agent_responses"]} == {True}
        assert body["synthesis"]["mode"] is None
        conversation = Conversation.objects.get(pk=body["conversation_id"])
        assert conversation.status == "no_consensus"
        assert not ConsensusResult.objects.filter(conversation=conversation).exists()
        completed = Event.objects.get(conversation=conversation, type="conversation_completed")
        assert completed.data["no_consensus_reason"] == "no_usable_positions"

    def test_providers_failing_stay_a_503(
        self, writer: Any, gemini: FakeGemini, config: Any, monkeypatch: Any
    ) -> None:
        from tests.fakes.gemini_server import http_error

        monkeypatch.setattr(config, "RETRY_MAX_ATTEMPTS", 1)
        gemini.always(http_error(503))
        response = chat(writer, num_agents=3, turns=1)
        assert response.status_code == 503
        assert response.json()["code"] == "agents_unavailable"
        assert "0 of 3 agents answered" in response.json()["detail"]

    def test_thirty_percent_of_replies_ignoring_the_format_still_answer(
        self, writer: Any, gemini: FakeGemini
    ) -> None:
        # Structured output is on, but 3 of every 10 answers ignore it (prose): each gets a repair.
        counter = itertools.count()
        lock = threading.Lock()

        def respond(model: str, body: dict[str, Any]) -> Any:
            if is_repair(body):
                return None  # the default: a JSON object fitting the position schema ("Yes")
            with lock:
                n = next(counter)
            return ok("Having weighed it all, I think yes.") if n % 10 in (0, 3, 6) else None

        gemini.respond(respond)
        response = chat(writer, num_agents=10, turns=2)
        assert response.status_code == 200, response.content
        body = response.json()
        assert body["metadata"]["status"] == "completed"
        assert body["consensus"]["position"] == "Yes"
        assert body["metadata"]["extra_calls"]["repair"] == 3  # turn 1 was unanimous: early stop
        assert sum(a["abstained"] for a in body["transcript"]) == 0
        sources = [a["position_source"] for a in body["transcript"]]
        assert (sources.count("repair"), sources.count("structured")) == (3, 7)


class TestCallCount:
    def test_structured_output_adds_no_call(self, writer: Any, gemini: FakeGemini) -> None:
        body = chat(writer, num_agents=3, turns=2).json()
        assert body["metadata"]["status"] == "completed"
        assert body["metadata"]["early_stop"] is True  # unanimous after turn 1: no second turn, no vote round
        assert len(gemini.generate_calls) == 3  # one call per agent, the schema rides along
        assert all("responseSchema" in r.body["generationConfig"] for _, r in gemini.generate_calls)
        assert {a["position_source"] for a in body["agent_responses"]} == {"structured"}
        assert body["metadata"]["extra_calls"] == {"repair": 0, "synthesis": 0}

    def test_a_split_panel_votes_with_structured_ballots(self, writer: Any, gemini: FakeGemini) -> None:
        answers = itertools.cycle(["42", "42", "24"])
        lock = threading.Lock()

        def respond(model: str, body: dict[str, Any]) -> Any:
            if "vote" in body["generationConfig"]["responseSchema"]["properties"]:
                return None  # the default ballot: the first label
            with lock:
                position = next(answers)
            return ok(json.dumps({"answer": f"It is {position}.", "position": position, "confidence": 0.8}))

        gemini.respond(respond)
        body = chat(writer, num_agents=3, turns=1).json()
        ballots = [
            r.body
            for _, r in gemini.generate_calls
            if "vote" in r.body["generationConfig"]["responseSchema"]["properties"]
        ]
        assert len(ballots) == 3  # 3 answers + 3 ballots, nothing more
        assert len(gemini.generate_calls) == 6
        assert ballots[0]["generationConfig"]["responseSchema"]["properties"]["vote"]["enum"] == ["A", "B"]
        assert {v["choice"] for v in body["votes"]} == {"A"}
        assert {v["reason"] for v in body["votes"]} == {"It is the best supported proposal."}
        assert body["consensus"]["position"] == "24"  # label A: the fake's default ballot
        assert body["consensus_result"] == "It is 24."


class TestCleanAnswer:
    def test_consensus_result_is_the_clean_answer_and_the_raw_reply_is_kept(
        self, writer: Any, config: Any
    ) -> None:
        body = chat(writer, num_agents=3, turns=2).json()
        assert body["synthesis"] == {"mode": "representative", "requested": "representative"}
        for agent in body["transcript"]:
            raw = json.loads(agent["raw_response"])  # the simulator answers structured requests in JSON
            assert agent["response"] == raw["answer"]
            assert agent["position"] == raw["position"]
        if body["metadata"]["status"] == "completed":
            result = body["consensus_result"]
            assert "FINAL POSITION" not in result
            assert "CONFIDENCE" not in result
            assert not result.lstrip().startswith("{")
            assert result in {a["response"] for a in body["agent_responses"]}
        conversation = Conversation.objects.get(pk=body["conversation_id"])
        stored = Message.objects.filter(conversation=conversation, role="agent").first()
        assert stored is not None
        assert json.loads(stored.raw_content)["answer"] == stored.content
        assert body["metadata"]["extra_calls"] == {"repair": 0, "synthesis": 0}

    def test_text_replies_lose_their_machine_lines(self, writer: Any, gemini: FakeGemini) -> None:
        gemini.reject_schema()
        body = chat(writer, num_agents=3, turns=1).json()
        assert body["consensus_result"] == "The evidence points one way."
        agent = body["agent_responses"][0]
        assert agent["response"] == "The evidence points one way."
        assert agent["raw_response"].endswith("FINAL POSITION: Yes\nCONFIDENCE: 0.8")
        assert agent["position_source"] == "text"


class TestSynthesis:
    def test_chairman_writes_the_answer_in_one_counted_call(self, writer: Any, config: Any) -> None:
        chairs_before = EXTRA_CALLS.labels("chairman")._value.get()
        response = chat(writer, num_agents=3, turns=1, synthesis="chairman")
        assert response.status_code == 200, response.content
        assert EXTRA_CALLS.labels("chairman")._value.get() - chairs_before == 1
        body = response.json()
        assert body["metadata"]["status"] == "completed"
        synthesis = body["synthesis"]
        assert synthesis["mode"] == "chairman"
        assert synthesis["requested"] == "chairman"
        assert synthesis["provider"] == "simulated"
        assert synthesis["tokens"]["total"] > 0
        position = body["consensus"]["position"]
        assert body["consensus_result"].startswith(f"The panel's answer is {position}.")
        assert body["metadata"]["extra_calls"] == {"repair": 0, "synthesis": 1}
        assert body["metadata"]["extra_tokens"]["synthesis"] == synthesis["tokens"]
        agents_total = sum(a["tokens"]["total"] for a in body["transcript"])
        # Agents' answers (no ballots: the simulator's 3 agents often agree) plus the chairman.
        assert body["usage"]["total"] >= agents_total + synthesis["tokens"]["total"]
        events = list(Event.objects.filter(conversation_id=body["conversation_id"]).order_by("seq"))
        types = [e.type for e in events]
        # Nobody watched this /chat run, so the chairman's call was not streamed.
        assert "synthesis_delta" not in types
        final = next(e for e in events if e.type == "synthesis")
        assert final.data["content"] == body["consensus_result"]
        assert types.index("synthesis") < types.index("consensus_reached")
        reached = next(e for e in events if e.type == "consensus_reached")
        assert reached.data["consensus"] == body["consensus_result"]
        assert reached.data["synthesis"] == "chairman"

    def test_the_chairman_sees_the_winning_arguments_and_the_dissent(
        self, writer: Any, gemini: FakeGemini, config: Any, monkeypatch: Any
    ) -> None:
        answers = itertools.cycle(["42", "42", "24"])
        lock = threading.Lock()

        def respond(model: str, body: dict[str, Any]) -> Any:
            if model == "chair-model" or "responseSchema" not in body["generationConfig"]:
                return None
            if "vote" in body["generationConfig"]["responseSchema"]["properties"]:
                label = re.search(r"Proposal (\w+): 42\n", prompt_of(body))
                assert label is not None
                return ok(json.dumps({"reason": "Six sevens are 42.", "vote": label[1], "confidence": 0.9}))
            with lock:
                position = next(answers)
            return ok(json.dumps({"answer": f"Surely {position}.", "position": position, "confidence": 0.8}))

        gemini.respond(respond)
        monkeypatch.setattr(config, "SYNTHESIS_MODEL", "chair-model")
        gemini.script(ok("Forty-two: six sevens.\nFINAL POSITION: 42\nCONFIDENCE: 0.9"), model="chair-model")
        body = chat(writer, num_agents=3, turns=1, synthesis="chairman").json()
        assert body["consensus"]["position"] == "42"
        assert body["consensus_result"] == "Forty-two: six sevens."  # cleaned of machine lines too
        [(_, sent)] = [(m, r) for m, r in gemini.generate_calls if m == "chair-model"]
        prompt = prompt_of(sent.body)
        assert "Surely 42." in prompt
        assert "Other positions held in the panel" in prompt
        assert "Surely 24." in prompt
        assert "responseSchema" not in sent.body["generationConfig"]  # free prose

    def test_a_failing_chairman_falls_back_to_the_representative(
        self, writer: Any, gemini: FakeGemini, config: Any, monkeypatch: Any
    ) -> None:
        from tests.fakes.gemini_server import http_error

        monkeypatch.setattr(config, "RETRY_MAX_ATTEMPTS", 1)
        monkeypatch.setattr(config, "SYNTHESIS_MODEL", "chair-model")
        gemini.always(http_error(500), model="chair-model")
        body = chat(writer, num_agents=3, turns=1, synthesis="chairman").json()
        assert body["metadata"]["status"] == "completed"
        assert body["synthesis"]["mode"] == "representative"
        assert body["synthesis"]["requested"] == "chairman"
        assert body["synthesis"]["error"].startswith("server")
        assert body["consensus_result"] == "The evidence points one way."

    def test_the_default_comes_from_synthesis_mode(self, writer: Any, config: Any, monkeypatch: Any) -> None:
        monkeypatch.setattr(config, "SYNTHESIS_MODE", "chairman")
        body = chat(writer, num_agents=2, turns=1).json()
        assert body["synthesis"]["requested"] == "chairman"
        explicit = chat(writer, num_agents=2, turns=1, synthesis="representative").json()
        assert explicit["synthesis"]["requested"] == "representative"
        assert explicit["metadata"]["extra_calls"]["synthesis"] == 0

    @pytest.mark.parametrize("value", ["Chairman", "best", "", None, 1, ["chairman"]])
    def test_synthesis_is_validated_strictly(self, writer: Any, config: Any, value: Any) -> None:
        response = chat(writer, synthesis=value)
        assert response.status_code == 400
        assert "synthesis" in response.json()["errors"]
        assert Conversation.objects.count() == 0


async def test_stream_with_a_chairman_emits_synthesis_events_over_websocket(
    make_key: Any, config: Any
) -> None:
    from tests.test_stream import new_key, post_stream

    _, raw = await new_key(make_key)
    conversation_id = uuid.uuid4()
    response = await post_stream(
        raw,
        conversation_id,
        {"message": "Tea or coffee?", "num_agents": 3, "turns": 1, "synthesis": "chairman"},
    )
    assert response.status_code == 202
    comm = WebsocketCommunicator(application, f"{response.json()['websocket_url']}?token={raw}")
    assert (await comm.connect())[0]
    runner = asyncio.ensure_future(drain_runs())
    received: list[dict[str, Any]] = []
    while not received or received[-1]["type"] not in ("conversation_completed", "conversation_failed"):
        received.append(await comm.receive_json_from(timeout=30))
    await runner
    await comm.disconnect()
    types = [e["type"] for e in received]
    assert received[-1]["status"] == "completed"
    assert "synthesis_delta" in types
    synthesis = next(e for e in received if e["type"] == "synthesis")
    assert synthesis["mode"] == "chairman"
    streamed = "".join(e["delta"] for e in received if e["type"] == "synthesis_delta")
    assert streamed.strip() == synthesis["content"]
    reached = next(e for e in received if e["type"] == "consensus_reached")
    assert reached["consensus"] == synthesis["content"]
    for event in received:
        if event["type"] == "agent_response":
            assert "FINAL POSITION" not in event["content"]
            assert not event["content"].startswith("{")
            assert json.loads(event["raw_content"])["answer"] == event["content"]
        if event["type"] == "agent_delta":
            assert "{" not in event["delta"]  # readable text, not JSON
    conversation = await Conversation.objects.aget(pk=conversation_id)
    assert conversation.consensus_result == synthesis["content"]
    assert conversation.metadata["extra_calls"] == {"repair": 0, "synthesis": 1}
    body = await AsyncClient().get(
        f"/conversations/{conversation_id}", headers={"Authorization": f"Bearer {raw}"}
    )
    assert body.status_code == 200
    messages = [m for m in body.json()["messages"] if m["role"] == "agent"]
    assert all(m["raw_content"] and m["position_source"] == "structured" for m in messages)
    await sync_to_async(reset_providers)()
