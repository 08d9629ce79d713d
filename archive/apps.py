from typing import Any

from django.apps import AppConfig


class ArchiveConfig(AppConfig):
    """Search over past conversations, export, retention and cleanup."""

    name = "archive"

    def ready(self) -> None:
        from conversations.signals import conversation_completed

        conversation_completed.connect(index_completed, dispatch_uid="archive.index_completed")


async def index_completed(sender: Any, conversation_id: Any, **kwargs: Any) -> None:
    """Index a finished conversation for semantic search (a no-op when Qdrant is not configured)."""
    from archive.vectors import aindex_conversation

    await aindex_conversation(conversation_id)
