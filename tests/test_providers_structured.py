"""Structured replies: the real google-genai and openai clients against the local wire fakes.

The schema must appear in the request body; streamed deltas must be the answer's prose,
never raw JSON; a server that refuses structured output gets the same call as text, and
the model is remembered as text-only.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from google import genai
from google.genai import types

from agents.orchestrator import ANSWER_OUTPUT, REPAIR_OUTPUT, ballot_output, read_reply
from agents.providers.base import GenerationRequest, JsonFieldStream, ProviderError, ResponseSchema
from agents.providers.gemini import GeminiProvider, gemini_schema
from agents.providers.openai_compat import OpenAICompatProvider
from agents.providers.simulated import SimulatedProvider
from consensus import REPLY_INSTRUCTIONS, REPLY_JSON_INSTRUCTIONS
from tests.fakes import gemini_server, openai_server
from tests.fakes.gemini_server import FakeGemini
from tests.fakes.openai_server import FakeOpenAI

# Quotes, a newline, a backslash and non-ASCII text: the stream cuts through escapes.
LONG_ANSWER = (
    'Water "wets" things.\nIt is a liquid \\ solvent; café-grade évidence points one way, twice over.'
)
STRUCTURED_REPLY = json.dumps({"answer": LONG_ANSWER, "position": "Yes", "confidence": 0.9})


def request(model: str, **fields: object) -> GenerationRequest:
    values: dict[str, object] = {"model": model, "prompt": "Is water wet?", "temperature": 0.0}
    values.update(fields)
    return GenerationRequest(**values)  # type: ignore[arg-type]


def ordering(schema: dict[str, object]) -> object:
    return schema.get("propertyOrdering", schema.get("property_ordering"))


class Collector:
    def __init__(self) -> None:
        self.chunks: list[str] = []

    async def __call__(self, chunk: str) -> None:
        self.chunks.append(chunk)


# --- Gemini -------------------------------------------------------------------------------


@pytest.fixture
def gfake() -> Iterator[FakeGemini]:
    with FakeGemini() as server:
        yield server


@pytest.fixture
async def gemini(gfake: FakeGemini) -> AsyncIterator[GeminiProvider]:
    provider = GeminiProvider(api_key="k", base_url=gfake.base_url, timeout=5)
    yield provider
    await provider.aclose()


async def test_gemini_asks_for_json_with_the_answer_schema(gfake: FakeGemini, gemini: GeminiProvider) -> None:
    generation = await gemini.complete(request("gemini-2.5-flash", output=ANSWER_OUTPUT))
    [(_, sent)] = gfake.generate_calls
    config = sent.body["generationConfig"]
    assert config["responseMimeType"] == "application/json"
    schema = config["responseSchema"]
    assert set(schema["properties"]) == {"answer", "position", "confidence"}
    # Prose streams first. google-genai 1.52 writes the proto field name (property_ordering);
    # Google's JSON parser takes both spellings, as proto3 JSON requires.
    assert ordering(schema) == ["answer", "position", "confidence"]
    assert schema["required"] == ["answer", "position", "confidence"]
    prompt = sent.body["contents"][0]["parts"][0]["text"]
    assert prompt.endswith(REPLY_JSON_INSTRUCTIONS)
    assert "FINAL POSITION" not in prompt
    assert generation.structured is True
    assert generation.data == {"answer": "The evidence points one way.", "position": "Yes", "confidence": 0.8}
    answer, proposal, source = read_reply("a", generation)
    assert (answer, source) == ("The evidence points one way.", "structured")
    assert proposal is not None
    assert (proposal.position, proposal.confidence) == ("Yes", 0.8)


async def test_gemini_ballot_schema_restricts_the_vote_to_the_labels(
    gfake: FakeGemini, gemini: GeminiProvider
) -> None:
    generation = await gemini.complete(request("gemini-2.5-flash", output=ballot_output(["A", "B"])))
    schema = gfake.generate_calls[0][1].body["generationConfig"]["responseSchema"]
    assert schema["properties"]["vote"]["enum"] == ["A", "B"]
    assert ordering(schema) == ["reason", "vote", "confidence"]
    assert generation.data is not None
    assert generation.data["vote"] == "A"


@pytest.mark.parametrize("stream", [False, True])
async def test_gemini_sends_the_body_the_sdk_builds_from_the_full_config(
    gfake: FakeGemini, gemini: GeminiProvider, stream: bool
) -> None:
    """The provider sends each shape's config fields as the SDK wrote them once (extra_body):
    the body on the wire is the one google-genai builds from the full config, field for field."""
    call = request(
        "gemini-2.5-flash",
        system_instruction="You are terse.",
        temperature=0.3,
        max_output_tokens=321,
        response_schema=ResponseSchema("panel_answer", ANSWER_OUTPUT.schema),
    )
    if stream:
        await gemini.stream(call, Collector())
    else:
        await gemini.generate(call)
    http = httpx.AsyncClient()
    options = types.HttpOptions(base_url=gfake.base_url, httpx_async_client=http)
    direct = genai.Client(api_key="k", http_options=options).aio.models
    full = types.GenerateContentConfig(
        system_instruction="You are terse.",
        temperature=0.3,
        max_output_tokens=321,
        response_mime_type="application/json",
        response_schema=gemini_schema(ANSWER_OUTPUT.schema),
    )
    if stream:
        async for _ in await direct.generate_content_stream(
            model=call.model, contents=call.prompt, config=full
        ):
            pass
    else:
        await direct.generate_content(model=call.model, contents=call.prompt, config=full)
    ours, sdk = (sent.body for _, sent in gfake.generate_calls)
    assert ours == sdk
    assert ours["generationConfig"]["maxOutputTokens"] == 321
    assert ours["systemInstruction"]["parts"][0]["text"] == "You are terse."


async def test_gemini_builds_a_config_once_per_shape_and_each_ballot_gets_its_labels(
    gfake: FakeGemini, gemini: GeminiProvider
) -> None:
    """Configs are kept per shape, the schema keyed by identity: one object per label set."""
    assert ballot_output(["A", "B"]) is ballot_output(("A", "B"))
    for labels in (["A", "B"], ["A", "B"], ["A", "B", "C"]):
        await gemini.complete(request("gemini-2.5-flash", output=ballot_output(labels)))
    await gemini.complete(request("gemini-2.5-flash", output=ANSWER_OUTPUT))
    sent = [call.body["generationConfig"]["responseSchema"] for _, call in gfake.generate_calls]
    assert [s["properties"].get("vote", {}).get("enum") for s in sent] == [
        ["A", "B"],
        ["A", "B"],
        ["A", "B", "C"],
        None,
    ]
    assert len(gemini._bodies) == 3
    # At the provider's timeout a call passes no config: its body is in a client of its shape.
    clients = gemini._clients.get()
    assert (len(clients._by_shape), len(gemini._configs)) == (3, 0)
    # A timeout shortened by the conversation's deadline makes a config, not a new body.
    await gemini.complete(request("gemini-2.5-flash", output=ANSWER_OUTPUT, timeout=1.234))
    assert (len(gemini._bodies), len(clients._by_shape), len(gemini._configs)) == (3, 3, 1)
    (_, at_timeout), (_, shortened) = gfake.generate_calls[-2:]
    assert shortened.body == at_timeout.body
    assert (shortened.headers["x-server-timeout"], at_timeout.headers["x-server-timeout"]) == ("2", "5")


async def test_gemini_stream_sends_readable_answer_text_not_json(
    gfake: FakeGemini, gemini: GeminiProvider
) -> None:
    gfake.script(gemini_server.ok(STRUCTURED_REPLY))
    deltas = Collector()
    generation = await gemini.complete(request("gemini-2.5-flash", output=ANSWER_OUTPUT), deltas)
    assert len(deltas.chunks) >= 2  # it streamed, in pieces
    assert "".join(deltas.chunks) == LONG_ANSWER
    assert not any("{" in chunk or '"position"' in chunk for chunk in deltas.chunks)
    assert generation.text == STRUCTURED_REPLY  # the raw reply is kept whole
    assert generation.data is not None
    assert generation.data["position"] == "Yes"
    assert gfake.generate_calls[0][1].path.endswith(":streamGenerateContent")


async def test_gemini_refusing_json_mode_falls_back_to_text_and_is_remembered(
    gfake: FakeGemini, gemini: GeminiProvider
) -> None:
    gfake.reject_schema(model="gemini-2.0-flash")
    first = await gemini.complete(request("gemini-2.0-flash", output=ANSWER_OUTPUT))
    calls = gfake.generate_calls
    assert len(calls) == 2  # the refused JSON call, then the same call as text
    assert calls[0][1].body["generationConfig"]["responseMimeType"] == "application/json"
    assert "responseMimeType" not in calls[1][1].body["generationConfig"]
    assert calls[1][1].body["contents"][0]["parts"][0]["text"].endswith(REPLY_INSTRUCTIONS)
    assert first.structured is False
    assert first.data is None
    assert "FINAL POSITION: Yes" in first.text
    assert "gemini-2.0-flash" in gemini.text_only_models

    await gemini.complete(request("gemini-2.0-flash", output=ANSWER_OUTPUT))
    assert len(gfake.generate_calls) == 3  # remembered: straight to text, no second refusal
    assert "responseMimeType" not in gfake.generate_calls[2][1].body["generationConfig"]

    other = await gemini.complete(request("gemini-2.5-flash", output=ANSWER_OUTPUT))
    assert other.structured is True  # per model: the other model keeps structured output


async def test_gemini_other_bad_requests_are_not_taken_for_a_schema_refusal(
    gfake: FakeGemini, gemini: GeminiProvider
) -> None:
    gfake.script(
        gemini_server.http_error(400, "API key not valid. Please pass a valid API key."),
        gemini_server.http_error(400, "API key not valid. Please pass a valid API key."),
    )
    with pytest.raises(ProviderError) as caught:
        await gemini.complete(request("gemini-2.5-flash", output=ANSWER_OUTPUT))
    assert caught.value.kind == "bad_request"
    assert gemini.text_only_models == set()  # the text call failed too: structured output was not the cause


async def test_gemini_without_an_output_format_sends_no_schema(
    gfake: FakeGemini, gemini: GeminiProvider
) -> None:
    generation = await gemini.complete(request("gemini-2.5-flash"))
    assert "responseMimeType" not in gfake.generate_calls[0][1].body["generationConfig"]
    assert generation.structured is False


# --- OpenAI-compatible ----------------------------------------------------------------------


@pytest.fixture
def ofake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


@pytest.fixture
async def compat(ofake: FakeOpenAI) -> AsyncIterator[OpenAICompatProvider]:
    provider = OpenAICompatProvider(base_url=ofake.api_url, api_key="sk-test", timeout=5)
    yield provider
    await provider.aclose()


async def test_openai_sends_response_format_json_schema(
    ofake: FakeOpenAI, compat: OpenAICompatProvider
) -> None:
    generation = await compat.complete(request("llama3.2", output=ANSWER_OUTPUT))
    body = ofake.requests[-1].body
    response_format = body["response_format"]
    assert response_format["type"] == "json_schema"
    assert response_format["json_schema"]["name"] == "panel_answer"
    assert response_format["json_schema"]["strict"] is True
    schema = response_format["json_schema"]["schema"]
    assert list(schema["properties"]) == ["answer", "position", "confidence"]
    assert schema["additionalProperties"] is False
    assert body["messages"][-1]["content"].endswith(REPLY_JSON_INSTRUCTIONS)
    assert generation.data == {
        "answer": "On balance the answer is clear.",
        "position": "Yes",
        "confidence": 0.75,
    }


async def test_openai_stream_sends_readable_answer_text(
    ofake: FakeOpenAI, compat: OpenAICompatProvider
) -> None:
    ofake.script(openai_server.ok(STRUCTURED_REPLY))
    deltas = Collector()
    generation = await compat.complete(request("llama3.2", output=ANSWER_OUTPUT), deltas)
    assert "".join(deltas.chunks) == LONG_ANSWER
    assert not any("{" in chunk for chunk in deltas.chunks)
    assert generation.data is not None
    assert generation.data["confidence"] == 0.9
    assert ofake.requests[-1].body["stream"] is True


@pytest.mark.parametrize("status", [400, 422])
async def test_openai_refusing_response_format_falls_back_to_text_and_is_remembered(
    ofake: FakeOpenAI, compat: OpenAICompatProvider, status: int
) -> None:
    ofake.reject_response_format(status)
    deltas = Collector()
    first = await compat.complete(request("llama3.2", output=ANSWER_OUTPUT), deltas)
    assert len(ofake.requests) == 2
    assert "response_format" in ofake.requests[0].body
    assert "response_format" not in ofake.requests[1].body
    assert ofake.requests[1].body["messages"][-1]["content"].endswith(REPLY_INSTRUCTIONS)
    assert first.data is None
    assert "FINAL POSITION: Yes" in first.text
    assert "".join(deltas.chunks) == first.text  # a text reply streams as it comes
    assert compat.text_only_models == {"llama3.2"}

    await compat.complete(request("llama3.2", output=REPAIR_OUTPUT))
    assert len(ofake.requests) == 3
    assert "response_format" not in ofake.requests[2].body


async def test_openai_server_ignoring_the_schema_still_reads_as_text(
    ofake: FakeOpenAI, compat: OpenAICompatProvider
) -> None:
    ofake.script(openai_server.ok("Plainly yes.\nFINAL POSITION: Yes\nCONFIDENCE: 0.6"))
    deltas = Collector()
    generation = await compat.complete(request("llama3.2", output=ANSWER_OUTPUT), deltas)
    assert "".join(deltas.chunks) == generation.text  # not JSON: passed through
    answer, proposal, source = read_reply("a", generation)
    assert (answer, source) == ("Plainly yes.", "text")
    assert proposal is not None
    assert proposal.position == "Yes"


async def test_a_truncated_structured_reply_keeps_what_arrived(
    ofake: FakeOpenAI, compat: OpenAICompatProvider
) -> None:
    ofake.script(openai_server.ok('{"answer": "Long reasoning that was cut', finish_reason="length"))
    generation = await compat.complete(request("llama3.2", output=ANSWER_OUTPUT))
    answer, proposal, source = read_reply("a", generation)
    assert (answer, proposal, source) == ("Long reasoning that was cut", None, "structured")


# --- the stream filter and the simulator ----------------------------------------------------


@pytest.mark.parametrize("size", [1, 2, 3, 7])
async def test_json_field_stream_reassembles_the_answer_from_any_chunking(size: int) -> None:
    deltas = Collector()
    stream = JsonFieldStream("answer", deltas)
    fenced = f"```json\n{STRUCTURED_REPLY}\n```"
    for start in range(0, len(fenced), size):
        await stream(fenced[start : start + size])
    assert "".join(deltas.chunks) == LONG_ANSWER


async def test_the_simulator_answers_structured_requests_in_the_same_shape() -> None:
    provider = SimulatedProvider(latency=0)
    meta = {"agent_id": "agent_0", "turn": 1, "kind": "answer", "question": "Is water wet?"}
    deltas = Collector()
    generation = await provider.complete(request("sim", output=ANSWER_OUTPUT, metadata=meta), deltas)
    assert generation.structured is True
    assert generation.data is not None
    assert set(generation.data) == {"answer", "position", "confidence"}
    assert "".join(deltas.chunks) == generation.data["answer"]
    provider.supports_structured = False
    text = await provider.complete(request("sim", output=ANSWER_OUTPUT, metadata=meta))
    assert text.data is None
    assert f"FINAL POSITION: {generation.data['position']}" in text.text


async def test_gemini_a_shape_whose_body_was_evicted_gets_a_client_for_its_new_body(
    gfake: FakeGemini, gemini: GeminiProvider
) -> None:
    """A shape's client is kept with the body it sends: once the body is built again (its cache
    was cleared; a schema's id may then name another schema), the client is built again too."""
    call = request("gemini-2.5-flash", output=ANSWER_OUTPUT)
    await gemini.complete(call)
    clients = gemini._clients.get()
    ((shape, (body, client)),) = clients._by_shape.items()
    gemini._bodies.clear()
    await gemini.complete(call)
    new_body, new_client = clients._by_shape[shape]
    assert new_body is not body
    assert new_body == body
    assert new_client is not client
    assert gfake.generate_calls[-1][1].body == gfake.generate_calls[-2][1].body


async def test_gemini_a_shortened_timeout_is_hinted_after_the_models_were_listed(
    gfake: FakeGemini, gemini: GeminiProvider
) -> None:
    """Listing the models (the health check) leaves the loop's base client's headers as they
    were: a later call with a timeout shortened by the deadline still sends its own
    X-Server-Timeout, not the provider's."""
    await gemini.list_models()
    await gemini.complete(request("gemini-2.5-flash", output=ANSWER_OUTPUT, timeout=1.234))
    assert gfake.generate_calls[-1][1].headers["x-server-timeout"] == "2"
