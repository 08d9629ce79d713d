"""Semantic index of conversations in Qdrant (a server at QDRANT_URL, or embedded at QDRANT_LOCAL_PATH).

Embeddings come from Gemini's embedding API when GEMINI_API_KEY is set, else from a
local hashing embedder. The hashing embedder is lexical (it matches shared words and
word pairs, not meaning); it needs no model download, so it works offline.
Qdrant being down or misconfigured never fails a caller: it is logged and skipped.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import re
import threading
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Protocol

import httpx
from django.conf import settings

from conversations.models import Conversation, Message

logger = logging.getLogger("polyagents.vectors")

GEMINI_EMBEDDING_MODEL = "gemini-embedding-001"
GEMINI_EMBEDDING_DIM = 768
GEMINI_DEFAULT_BASE = "https://generativelanguage.googleapis.com"
HASH_DIM = 512
MAX_TEXT = 8000
_TOKEN = re.compile(r"\w+", re.UNICODE)

_lock = threading.Lock()
_client: Any = None
_client_key: tuple[str | None, str | None] | None = None


class Embedder(Protocol):
    name: str
    dim: int

    def embed(self, texts: Sequence[str]) -> list[list[float]]: ...


class HashingEmbedder:
    """Signed feature hashing of words and word pairs, L2-normalised: deterministic and offline."""

    name = f"hash{HASH_DIM}"
    dim = HASH_DIM

    def _vector(self, text: str) -> list[float]:
        tokens = [t.lower() for t in _TOKEN.findall(text[:MAX_TEXT])]
        features = tokens + [f"{a} {b}" for a, b in itertools.pairwise(tokens)]
        vector = [0.0] * self.dim
        for feature in features:
            digest = hashlib.blake2b(feature.encode(), digest_size=8).digest()
            index = int.from_bytes(digest[:4], "little") % self.dim
            vector[index] += 1.0 if digest[4] & 1 else -1.0
        norm = math.sqrt(sum(v * v for v in vector))
        return [v / norm for v in vector] if norm else [0.0] * self.dim

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        return [self._vector(text) for text in texts]


class GeminiEmbedder:
    """Gemini's batchEmbedContents REST call (the wire format, over httpx)."""

    name = f"gemini{GEMINI_EMBEDDING_DIM}"
    dim = GEMINI_EMBEDDING_DIM

    def __init__(self, api_key: str, base_url: str | None = None, timeout: float = 10.0) -> None:
        self.api_key = api_key
        self.base_url = (base_url or GEMINI_DEFAULT_BASE).rstrip("/")
        self.timeout = timeout

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        model = f"models/{GEMINI_EMBEDDING_MODEL}"
        body = {
            "requests": [
                {
                    "model": model,
                    "content": {"parts": [{"text": text[:MAX_TEXT]}]},
                    "outputDimensionality": self.dim,
                }
                for text in texts
            ]
        }
        response = httpx.post(
            f"{self.base_url}/v1beta/{model}:batchEmbedContents",
            json=body,
            headers={"x-goog-api-key": self.api_key},
            timeout=self.timeout,
        )
        response.raise_for_status()
        vectors = [item["values"] for item in response.json()["embeddings"]]
        if len(vectors) != len(texts) or any(len(v) != self.dim for v in vectors):
            raise ValueError("unexpected embedding response shape")
        return vectors


def is_enabled() -> bool:
    return bool(settings.CONFIG.QDRANT_URL or settings.CONFIG.QDRANT_LOCAL_PATH)


def get_embedder() -> Embedder:
    config = settings.CONFIG
    if config.GEMINI_API_KEY:
        return GeminiEmbedder(config.GEMINI_API_KEY, config.GEMINI_BASE_URL)
    return HashingEmbedder()


def get_client() -> Any:
    """One Qdrant client per process (embedded mode allows only one per path)."""
    global _client, _client_key
    from qdrant_client import QdrantClient

    key = (settings.CONFIG.QDRANT_URL, settings.CONFIG.QDRANT_LOCAL_PATH)
    with _lock:
        if _client is None or _client_key != key:
            if _client is not None:
                _client.close()
            if key[0]:
                _client = QdrantClient(url=key[0], timeout=int(settings.CONFIG.HEALTH_CHECK_TIMEOUT) or 5)
            elif key[1] == ":memory:":
                _client = QdrantClient(location=":memory:")
            else:
                _client = QdrantClient(path=key[1])
            _client_key = key
        return _client


def reset_client() -> None:
    """Close the cached client (tests, configuration changes)."""
    global _client, _client_key
    with _lock:
        if _client is not None:
            _client.close()
        _client, _client_key = None, None


def collection_name(embedder: Embedder) -> str:
    return f"polyagents_conversations_{embedder.name}"


def _ensure_collection(client: Any, embedder: Embedder) -> str:
    from qdrant_client import models

    name = collection_name(embedder)
    if not client.collection_exists(name):
        client.create_collection(
            name, vectors_config=models.VectorParams(size=embedder.dim, distance=models.Distance.COSINE)
        )
        if settings.CONFIG.QDRANT_URL:  # payload indexes exist only on a Qdrant server
            client.create_payload_index(name, "owner", models.PayloadSchemaType.KEYWORD)
            client.create_payload_index(name, "created_at", models.PayloadSchemaType.FLOAT)
    return name


def conversation_text(conversation: Conversation) -> str:
    """What is embedded: title, questions, and the consensus answer."""
    questions = Message.objects.filter(conversation=conversation, role=Message.Role.USER).values_list(
        "content", flat=True
    )
    parts = [conversation.title, *questions, conversation.consensus_result]
    return "\n".join(p for p in parts if p)[:MAX_TEXT]


def index_conversation(conversation_id: uuid.UUID | str) -> bool:
    """Embed and upsert one conversation; False (logged) when Qdrant or the embedder fails."""
    if not is_enabled():
        return False
    from qdrant_client import models

    try:
        conversation = Conversation.objects.get(pk=conversation_id)
        text = conversation_text(conversation)
        if not text:
            return False
        embedder = get_embedder()
        client = get_client()
        name = _ensure_collection(client, embedder)
        client.upsert(
            name,
            points=[
                models.PointStruct(
                    id=str(conversation.pk),
                    vector=embedder.embed([text])[0],
                    payload={
                        "conversation_id": str(conversation.pk),
                        "owner": conversation.owner,
                        "status": conversation.status,
                        "created_at": conversation.created_at.timestamp(),
                    },
                )
            ],
        )
        return True
    except Exception:
        logger.exception("could not index conversation", extra={"conversation_id": str(conversation_id)})
        return False


async def aindex_conversation(conversation_id: uuid.UUID | str) -> bool:
    """Async twin of `index_conversation` (runs in a worker thread, when there is an index)."""
    from asgiref.sync import sync_to_async

    if not is_enabled():
        return False  # without a thread hop: every finished conversation comes here

    return await sync_to_async(index_conversation, thread_sensitive=False)(conversation_id)


def search(query: str, limit: int, owner: str | None = None) -> list[tuple[str, float]]:
    """Conversation ids nearest to the query, best first; [] when disabled or failing."""
    if not is_enabled():
        return []
    from qdrant_client import models

    try:
        embedder = get_embedder()
        client = get_client()
        name = collection_name(embedder)
        if not client.collection_exists(name):
            return []
        query_filter = None
        if owner is not None:
            query_filter = models.Filter(
                must=[models.FieldCondition(key="owner", match=models.MatchValue(value=owner))]
            )
        hits = client.query_points(
            name, query=embedder.embed([query])[0], query_filter=query_filter, limit=limit, with_payload=False
        ).points
        return [(str(hit.id), float(hit.score)) for hit in hits]
    except Exception:
        logger.exception("semantic search failed")
        return []


def delete_older_than(cutoff: datetime, *, dry_run: bool = False) -> dict[str, Any]:
    """Delete (or count) points of conversations created before `cutoff`, in every collection."""
    if not is_enabled():
        return {"enabled": False, "deleted_points": 0}
    from qdrant_client import models

    older = models.Filter(
        must=[models.FieldCondition(key="created_at", range=models.Range(lt=cutoff.timestamp()))]
    )
    try:
        client = get_client()
        total = 0
        for collection in client.get_collections().collections:
            if not collection.name.startswith("polyagents_conversations_"):
                continue
            total += client.count(collection.name, count_filter=older, exact=True).count
            if not dry_run:
                client.delete(collection.name, points_selector=models.FilterSelector(filter=older))
        return {"enabled": True, "deleted_points": total}
    except Exception as exc:
        logger.exception("qdrant cleanup failed")
        return {"enabled": True, "deleted_points": 0, "error": f"{type(exc).__name__}: {exc}"[:200]}


def stats() -> dict[str, Any]:
    """Collections and vector counts, for the health check (raises when Qdrant is down)."""
    client = get_client()
    collections = [c.name for c in client.get_collections().collections]
    ours = [c for c in collections if c.startswith("polyagents_conversations_")]
    vectors = sum(client.count(c, exact=True).count for c in ours)
    return {"collections": len(collections), "vectors": vectors, "conversation_collections": ours}
