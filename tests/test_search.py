"""POST /conversations/search: full text (PostgreSQL FTS or SQLite substring), Qdrant, rank fusion."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from archive import vectors
from archive.search import rrf
from conversations.models import Conversation, Message
from gateway.models import ApiKey, generate_key, hash_key
from tests.conftest import requires_postgres

pytestmark = pytest.mark.django_db


@pytest.fixture
def reader(api_client):
    raw = generate_key()
    row = ApiKey.objects.create(name="r", prefix=raw[:10], key_hash=hash_key(raw), permissions=["read"])
    api_client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    api_client.owner = f"key:{row.pk}"
    return api_client


@pytest.fixture
def qdrant(settings) -> Iterator[None]:
    """Embedded in-memory Qdrant, no Gemini key: the local hashing embedder."""
    settings.CONFIG = settings.CONFIG.model_copy(
        update={"QDRANT_LOCAL_PATH": ":memory:", "QDRANT_URL": None, "GEMINI_API_KEY": None}
    )
    vectors.reset_client()
    yield
    vectors.reset_client()


def _conversation(owner: str, question: str, answer: str = "") -> Conversation:
    conversation = Conversation.objects.create(
        owner=owner, title=question[:50], status="completed", consensus_result=answer
    )
    Message.objects.create(conversation=conversation, role=Message.Role.USER, content=question)
    if answer:
        Message.objects.create(
            conversation=conversation, role=Message.Role.AGENT, agent_id="agent_0", turn=1, content=answer
        )
    return conversation


def test_fulltext_finds_question_and_answers(reader):
    solar = _conversation(reader.owner, "What are the benefits of renewable energy?", "Lower emissions.")
    _conversation(reader.owner, "How do I bake bread?", "Knead the dough.")
    theirs = _conversation("key:other", "Is renewable energy cheap?", "Often.")
    response = reader.post("/conversations/search", {"query": "renewable energy"}, format="json")
    assert response.status_code == 200
    body = response.json()
    assert [r["conversation_id"] for r in body["results"]] == [str(solar.pk)]
    assert str(theirs.pk) not in json.dumps(body)
    assert body["results"][0]["matched_by"] == ["fulltext"]
    assert body["results"][0]["question"] == "What are the benefits of renewable energy?"
    answer_hit = reader.post("/conversations/search", {"query": "knead"}, format="json").json()
    assert answer_hit["count"] == 1


@requires_postgres
def test_postgres_ranks_by_relevance_and_stems(reader):
    weak = _conversation(reader.owner, "Energy prices in winter", "Heating costs.")
    strong = _conversation(reader.owner, "Renewable energy and energy storage", "Renewables need storage.")
    body = reader.post("/conversations/search", {"query": "renewables energy"}, format="json").json()
    ids = [r["conversation_id"] for r in body["results"]]
    assert ids[0] == str(strong.pk)  # "renewables" stems to "renewabl": both words match
    assert str(weak.pk) not in ids  # websearch syntax ANDs the terms


@requires_postgres
def test_postgres_search_index_exists():
    with connection.cursor() as cursor:
        cursor.execute("SELECT indexdef FROM pg_indexes WHERE indexname = 'conv_message_fts_idx'")
        (indexdef,) = cursor.fetchone()
    assert "gin" in indexdef.lower()
    assert "to_tsvector" in indexdef


@requires_postgres
def test_postgres_search_query_can_use_the_index(reader):
    """The ORM's SearchVector compiles to the indexed expression (checked with seq scans off)."""
    from archive.search import fulltext
    from gateway.principal import Principal

    _conversation(reader.owner, "renewable energy")
    admin = Principal(kind="api_key", permissions=frozenset({"admin"}), api_key_id=1)
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_seqscan = off")
    with CaptureQueriesContext(connection) as queries:
        assert len(fulltext(admin, "renewable", 5)) == 1
    with connection.cursor() as cursor:
        cursor.execute("EXPLAIN " + queries.captured_queries[-1]["sql"])
        plan = "\n".join(row[0] for row in cursor.fetchall())
    assert "conv_message_fts_idx" in plan


def test_search_validation(reader):
    for body in (
        {},
        {"query": ""},
        {"query": "   "},
        {"query": "x", "limit": 0},
        {"query": "x", "limit": 101},
        {"query": 5},
        {"query": "a\x00b"},
        {"query": "x" * 501},
        {"query": "x", "extra": 1},
    ):
        response = reader.post("/conversations/search", body, format="json")
        assert response.status_code == 400, body
        assert response.json()["code"] == "invalid"


def test_search_survives_operators_and_quotes(reader):
    _conversation(reader.owner, 'Quotes "and" operators: a | b & !c')
    for query in ['"unclosed', "a | b & !c", "-", "' OR 1=1 --", "%_", "\\"]:
        response = reader.post("/conversations/search", {"query": query}, format="json")
        assert response.status_code == 200, query


def test_semantic_search_in_embedded_qdrant(reader, qdrant):
    windmills = _conversation(reader.owner, "Should towns build more wind turbines?", "Yes, wind is cheap.")
    bread = _conversation(reader.owner, "How long should bread dough rise?", "About two hours.")
    theirs = _conversation("key:other", "Wind turbines near schools?", "Fine.")
    for conversation in (windmills, bread, theirs):
        assert vectors.index_conversation(conversation.pk) is True
    assert vectors.stats()["vectors"] == 3
    # "turbines wind" shares no phrase with the question as typed, so substring search misses it.
    body = reader.post("/conversations/search", {"query": "turbines wind", "limit": 5}, format="json").json()
    assert body["semantic"] is True
    ids = [r["conversation_id"] for r in body["results"]]
    assert ids[0] == str(windmills.pk)
    assert str(theirs.pk) not in ids  # the owner filter applies in Qdrant too
    assert "semantic" in body["results"][0]["matched_by"]


def test_indexing_failure_is_logged_not_raised(settings, caplog):
    settings.CONFIG = settings.CONFIG.model_copy(
        update={"QDRANT_URL": "http://127.0.0.1:1", "GEMINI_API_KEY": None}
    )
    vectors.reset_client()
    conversation = _conversation("key:x", "anything")
    try:
        assert vectors.index_conversation(conversation.pk) is False
        assert vectors.search("anything", 5) == []
    finally:
        vectors.reset_client()
    assert "could not index conversation" in caplog.text


def test_rrf_merges_rankings():
    merged = rrf(["a", "b", "c"], ["c", "a"])
    assert [item for item, _ in merged] == ["a", "c", "b"]
    assert merged[0][1] == pytest.approx(1 / 61 + 1 / 62)


class _FakeGemini(BaseHTTPRequestHandler):
    """Speaks Gemini's batchEmbedContents wire format; vectors from the hashing embedder, padded."""

    seen: list[dict] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert self.path == f"/v1beta/models/{vectors.GEMINI_EMBEDDING_MODEL}:batchEmbedContents"
        assert self.headers["x-goog-api-key"] == "test-gemini-key-123456"
        type(self).seen.append(body)
        hashing = vectors.HashingEmbedder()
        embeddings = []
        for request in body["requests"]:
            values = hashing.embed([request["content"]["parts"][0]["text"]])[0]
            values = (values + [0.0] * request["outputDimensionality"])[: request["outputDimensionality"]]
            embeddings.append({"values": values})
        payload = json.dumps({"embeddings": embeddings}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


def test_gemini_embeddings_over_the_wire(reader, settings):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeGemini)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    settings.CONFIG = settings.CONFIG.model_copy(
        update={
            "QDRANT_LOCAL_PATH": ":memory:",
            "QDRANT_URL": None,
            "GEMINI_API_KEY": "test-gemini-key-123456",
            "GEMINI_BASE_URL": f"http://127.0.0.1:{server.server_address[1]}",
        }
    )
    vectors.reset_client()
    try:
        conversation = _conversation(reader.owner, "Wind turbines or solar panels?", "Both.")
        assert vectors.index_conversation(conversation.pk) is True
        assert vectors.stats()["conversation_collections"] == ["polyagents_conversations_gemini768"]
        hits = vectors.search("solar panels", 3, owner=reader.owner)
        assert hits[0][0] == str(conversation.pk)
        assert _FakeGemini.seen[0]["requests"][0]["model"] == f"models/{vectors.GEMINI_EMBEDDING_MODEL}"
    finally:
        vectors.reset_client()
        server.shutdown()
