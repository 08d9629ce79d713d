"""The simulated provider: deterministic, labelled, in the consensus formats."""

from __future__ import annotations

import re
import time

import pytest
from django.conf import settings

from agents.providers.base import GenerationRequest, ProviderError
from agents.providers.registry import get_provider, reset_providers
from agents.providers.simulated import SimulatedProvider, candidate_positions

REPLY = re.compile(r"\n\nFINAL POSITION: (?P<position>[^\n]+)\nCONFIDENCE: (?P<confidence>[0-9.]+)$")


def answer_request(question: str, agent_id: str, turn: int = 1, **meta: object) -> GenerationRequest:
    return GenerationRequest(
        model="sim-1",
        prompt=f"Question: {question}",
        metadata={"agent_id": agent_id, "turn": turn, "kind": "answer", "question": question, **meta},
    )


async def test_same_prompt_agent_and_turn_give_the_same_answer() -> None:
    question = "Is Python good for data science?"
    first = await SimulatedProvider(latency=0).generate(answer_request(question, "a1"))
    second = await SimulatedProvider(latency=0).generate(answer_request(question, "a1"))
    assert first.text == second.text
    assert first.simulated is True
    assert first.provider == "simulated"
    assert first.model == "sim-1"


async def test_answers_follow_the_reply_format_with_a_candidate_position() -> None:
    provider = SimulatedProvider(latency=0)
    question = "Should a small team use Postgres or MongoDB?"
    for agent in ("a1", "a2", "a3", "a4"):
        generation = await provider.generate(answer_request(question, agent))
        match = REPLY.search(generation.text)
        assert match, generation.text
        assert match["position"] in {"Postgres", "MongoDB"}
        assert 0 <= float(match["confidence"]) <= 1
        assert generation.usage.completion_tokens == -(-len(generation.text) // 4)
        assert generation.usage.prompt_tokens > 0


async def test_different_agents_do_not_all_say_the_same_text() -> None:
    provider = SimulatedProvider(latency=0)
    texts = {(await provider.generate(answer_request("Is coffee healthy?", f"a{i}"))).text for i in range(6)}
    assert len(texts) > 1


def test_candidates_follow_the_question_shape() -> None:
    assert candidate_positions("Is the sky blue?") == ["Yes", "No", "It depends"]
    assert candidate_positions("Tea or coffee?") == ["Tea", "coffee"]
    assert candidate_positions("What is 2 + 2?")[0] == "4"


async def test_from_turn_two_agents_mostly_join_the_majority() -> None:
    provider = SimulatedProvider(latency=0)
    joined = 0
    for i in range(40):
        generation = await provider.generate(
            answer_request(f"Is option {i} wise?", f"agent{i}", turn=2, peer_positions=["No", "No"])
        )
        match = REPLY.search(generation.text)
        assert match
        joined += match["position"] == "No"
    assert 30 <= joined < 40  # with high probability, not always (deterministic per seed)


async def test_ballot_votes_for_its_own_position() -> None:
    provider = SimulatedProvider(latency=0)
    options = [{"label": "A", "position": "No"}, {"label": "B", "position": "Yes"}]
    request = GenerationRequest(
        model="sim-1",
        prompt="vote",
        metadata={"agent_id": "a1", "turn": 3, "kind": "ballot", "options": options, "own_position": "yes"},
    )
    text = (await provider.generate(request)).text
    assert text.startswith("VOTE: B\nCONFIDENCE: ")
    assert "\nREASON: " in text


async def test_ballot_without_own_match_votes_for_the_most_supported() -> None:
    provider = SimulatedProvider(latency=0)
    options = [
        {"label": "A", "position": "No", "supporters": ["x"]},
        {"label": "B", "position": "Yes", "supporters": ["y", "z"]},
    ]
    request = GenerationRequest(
        model="sim-1", prompt="vote", metadata={"agent_id": "a9", "kind": "ballot", "options": options}
    )
    assert (await provider.generate(request)).text.startswith("VOTE: B\n")


async def test_failure_rate_one_always_raises_a_server_error() -> None:
    provider = SimulatedProvider(latency=0, failure_rate=1.0)
    with pytest.raises(ProviderError) as caught:
        await provider.generate(answer_request("Is it?", "a1"))
    assert caught.value.kind == "server"
    assert caught.value.retryable


async def test_failures_are_deterministic_and_a_retry_can_succeed() -> None:
    async def outcomes() -> list[bool]:
        provider = SimulatedProvider(latency=0, failure_rate=0.5)
        results = []
        for _ in range(12):
            try:
                await provider.generate(answer_request("Is it?", "a1"))
                results.append(True)
            except ProviderError:
                results.append(False)
        return results

    first = await outcomes()
    assert first == await outcomes()
    assert True in first
    assert False in first


async def test_stream_sends_the_text_in_chunks_over_the_latency() -> None:
    provider = SimulatedProvider(latency=0.1)
    chunks: list[str] = []

    async def on_delta(text: str) -> None:
        chunks.append(text)

    started = time.monotonic()
    generation = await provider.stream(answer_request("Is it?", "a1"), on_delta)
    elapsed = time.monotonic() - started
    assert len(chunks) > 2
    assert "".join(chunks) == generation.text
    assert 0.09 <= elapsed < 0.5
    assert generation.latency_ms >= 90


async def test_generate_waits_the_configured_latency() -> None:
    started = time.monotonic()
    await SimulatedProvider(latency=0.05).generate(answer_request("Is it?", "a1"))
    assert time.monotonic() - started >= 0.05


def test_registry_builds_the_simulated_provider_from_config() -> None:
    reset_providers()
    provider = get_provider("simulated")
    assert isinstance(provider, SimulatedProvider)
    assert provider.latency == settings.CONFIG.SIMULATED_LATENCY
    assert get_provider("simulated") is provider
    reset_providers()
    assert get_provider("simulated") is not provider


def test_registry_refuses_gemini_without_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    reset_providers()
    monkeypatch.setattr(settings, "CONFIG", settings.CONFIG.model_copy(update={"GEMINI_API_KEY": None}))
    with pytest.raises(ProviderError) as caught:
        get_provider("gemini")
    assert caught.value.kind == "auth"


def test_registry_refuses_an_unknown_name() -> None:
    with pytest.raises(ProviderError) as caught:
        get_provider("nope")
    assert caught.value.kind == "bad_request"


async def test_a_simulated_panel_usually_converges_by_turn_two() -> None:
    provider = SimulatedProvider(latency=0)
    agents = ("a1", "a2", "a3")
    split_at_first, unanimous_at_second = 0, 0
    for i in range(30):
        question = f"Should city {i} build more bike lanes?"
        first = {}
        for agent in agents:
            match = REPLY.search((await provider.generate(answer_request(question, agent))).text)
            assert match
            first[agent] = match["position"]
        split_at_first += len(set(first.values())) > 1
        second = set()
        for agent in agents:
            peers = [p for other, p in first.items() if other != agent]
            reply = await provider.generate(answer_request(question, agent, turn=2, peer_positions=peers))
            match = REPLY.search(reply.text)
            assert match
            second.add(match["position"])
        unanimous_at_second += len(second) == 1
    assert split_at_first >= 5  # panels do not always agree at once
    assert unanimous_at_second >= 22  # but discussion brings most of them together (24 of 30 now)


def test_registry_builds_gemini_and_openai_from_config(monkeypatch: pytest.MonkeyPatch) -> None:
    from agents.providers.gemini import GeminiProvider
    from agents.providers.openai_compat import OpenAICompatProvider

    reset_providers()
    monkeypatch.setattr(
        settings,
        "CONFIG",
        settings.CONFIG.model_copy(
            update={
                "GEMINI_API_KEY": "g-key",
                "OPENAI_BASE_URL": "http://127.0.0.1:9/v1",
                "AGENT_CALL_TIMEOUT": 7.0,
            }
        ),
    )
    gemini = get_provider("gemini")
    assert isinstance(gemini, GeminiProvider)
    assert gemini.timeout == 7.0
    assert isinstance(get_provider("openai"), OpenAICompatProvider)
    reset_providers()


def test_registry_refuses_openai_without_a_base_url(monkeypatch: pytest.MonkeyPatch) -> None:
    reset_providers()
    monkeypatch.setattr(settings, "CONFIG", settings.CONFIG.model_copy(update={"OPENAI_BASE_URL": None}))
    with pytest.raises(ProviderError) as caught:
        get_provider("openai")
    assert caught.value.kind == "auth"


# --- quiz mode -------------------------------------------------------------------------------------


async def quiz_answers(quiz, questions: int, agent: str = "a1", model: str = "sim-1") -> list[str]:
    from consensus import normalize_answer, parse_reply

    provider = SimulatedProvider(latency=0, quiz=quiz)
    keys = []
    for index in range(questions):
        request = answer_request(f"Quiz {index}: what is {index} + 1000?", agent)
        request = GenerationRequest(model=model, prompt=request.prompt, metadata=request.metadata)
        proposal = parse_reply(agent, (await provider.generate(request)).text)
        keys.append(normalize_answer(proposal.position) if proposal else "")
    return keys


def truths(quiz, questions: int) -> list[str]:
    from consensus import normalize_answer

    return [
        normalize_answer(quiz.truth(f"Quiz {index}: what is {index} + 1000?")) for index in range(questions)
    ]


async def test_quiz_agents_are_right_with_their_accuracy() -> None:
    from agents.providers.simulated import QuizConfig

    quiz = QuizConfig(accuracy=0.7, skills={"strong": 0.95})
    expected = truths(quiz, 400)
    weak = await quiz_answers(quiz, 400)
    strong = await quiz_answers(quiz, 400, model="strong")
    assert sum(a == t for a, t in zip(weak, expected, strict=True)) / 400 == pytest.approx(0.7, abs=0.06)
    assert sum(a == t for a, t in zip(strong, expected, strict=True)) / 400 == pytest.approx(0.95, abs=0.04)
    assert quiz.truth("What is 17 + 25?") == "42"


async def test_shared_errors_are_one_wrong_value_and_spread_errors_several() -> None:
    from agents.providers.simulated import QuizConfig

    shared = QuizConfig(accuracy=0.0, shared=1.0)
    spread = QuizConfig(accuracy=0.0, wrong_values=3)
    expected = truths(shared, 60)
    first = await quiz_answers(shared, 60, agent="a1")
    second = await quiz_answers(shared, 60, agent="a2")
    assert first == second
    assert all(a != t for a, t in zip(first, expected, strict=True))
    spread_first = await quiz_answers(spread, 60, agent="a1")
    spread_second = await quiz_answers(spread, 60, agent="a2")
    assert spread_first != spread_second
    assert all(a != t for a, t in zip(spread_first, expected, strict=True))


def position_in(text: str) -> str:
    match = REPLY.search(text)
    assert match is not None, text
    return match["position"]


async def test_quiz_positions_are_paraphrased_but_normalise_alike() -> None:
    from agents.providers.simulated import QuizConfig

    provider = SimulatedProvider(latency=0, quiz=QuizConfig(accuracy=1.0))
    positions = set()
    for agent in range(12):
        text = (await provider.generate(answer_request("What is 17 + 25?", f"a{agent}"))).text
        positions.add(position_in(text))
    assert {"42", "42.0", "**42**", "The answer is 42", "42 (final)"} <= positions
    from consensus import normalize_answer

    assert {normalize_answer(p) for p in positions} == {"42"}


async def test_a_share_of_quiz_replies_ignores_the_format() -> None:
    from agents.providers.simulated import QuizConfig

    provider = SimulatedProvider(latency=0, quiz=QuizConfig(accuracy=1.0, ignore_format=0.3))
    texts = [(await provider.generate(answer_request(f"What is {i} + 5?", "a1"))).text for i in range(200)]
    prose = [t for t in texts if "FINAL POSITION" not in t]
    assert 0.2 < len(prose) / 200 < 0.4
    assert all(re.search(r"\d+", t) for t in prose)


async def test_quiz_agents_herd_toward_a_strict_plurality() -> None:
    from agents.providers.simulated import QuizConfig

    always = SimulatedProvider(latency=0, quiz=QuizConfig(accuracy=1.0, herding=1.0, paraphrase=False))
    never = SimulatedProvider(latency=0, quiz=QuizConfig(accuracy=1.0, herding=0.0, paraphrase=False))
    request = answer_request(
        "What is 17 + 25?", "a1", turn=2, previous_position="41", peer_positions=["43", "43"]
    )
    assert position_in((await always.generate(request)).text) == "43"
    assert position_in((await never.generate(request)).text) == "41"
    tie = answer_request(
        "What is 17 + 25?", "a1", turn=2, previous_position="41", peer_positions=["43", "44"]
    )
    assert position_in((await always.generate(tie)).text) == "41"


async def test_agents_of_one_model_share_their_draw_with_the_correlation() -> None:
    from agents.providers.simulated import QuizConfig

    quiz = QuizConfig(accuracy=0.3, correlation=1.0)
    first = await quiz_answers(quiz, 80, agent="a1")
    assert first == await quiz_answers(quiz, 80, agent="a2")  # one model: one draw
    assert first != await quiz_answers(quiz, 80, agent="a1", model="other")
    independent = QuizConfig(accuracy=0.3)
    assert await quiz_answers(independent, 80, agent="a1") != await quiz_answers(independent, 80, agent="a2")


async def test_drift_is_set_per_agent() -> None:
    from agents.providers.simulated import QuizConfig

    quiz = QuizConfig(accuracy=1.0, herding=1.0, drift={"a1": 0.0}, paraphrase=False)
    provider = SimulatedProvider(latency=0, quiz=quiz)
    for agent, expected in (("a1", "41"), ("a2", "43")):
        request = answer_request(
            "What is 17 + 25?", agent, turn=2, previous_position="41", peer_positions=["43", "43"]
        )
        assert position_in((await provider.generate(request)).text) == expected
    assert quiz.drift_of("m", "a1") == 0.0
    assert quiz.drift_of("m", "a9") == 1.0
    assert not SimulatedProvider(latency=0).knows_answers
    assert provider.knows_answers


def test_quiz_settings_refuse_unknown_keys() -> None:
    from agents.providers.simulated import QuizConfig

    assert QuizConfig.from_dict({"accuracy": 0.9}).accuracy == 0.9
    with pytest.raises(ValueError, match="bogus"):
        QuizConfig.from_dict({"bogus": 1})
    assert QuizConfig(wrong_values=2).wrong("Paris") == ["Paris b", "Paris c"]
    assert QuizConfig(wrong_values=3).wrong("42") == ["43", "41", "44"]
