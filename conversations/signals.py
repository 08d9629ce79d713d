"""Signals that apps above `conversations` connect to, so it never imports them.

`conversation_completed` is sent (in the background, after the result is stored) when an
exchange ends completed or without consensus; `archive` connects its search indexer to it
in `ArchiveConfig.ready`. `run_finished` is sent for every end of a run (failed and cancelled
too) and `agent_turn` for each agent reply of a run whose metadata asks for `notify_turns`;
`webhooks` connects to both.
"""

import asyncio
from typing import Any

from django.dispatch import Signal

from conversations.models import Conversation

# Arguments: conversation_id (uuid.UUID), status (str).
conversation_completed = Signal()
# Arguments: conversation (the final Conversation), exchange (int), agreement (float | None).
run_finished = Signal()
# Arguments: conversation, exchange, data (the agent_response event's fields).
agent_turn = Signal()

# Sends in flight are kept referenced until they finish.
_SENDING: set[asyncio.Task[Any]] = set()


def send_later(signal: Signal, **kwargs: Any) -> None:
    """Send `signal` to its async and sync receivers in the background (a receiver's error is
    logged by `asend_robust`, never raised into the run)."""
    task = asyncio.ensure_future(signal.asend_robust(sender=Conversation, **kwargs))
    _SENDING.add(task)
    task.add_done_callback(_SENDING.discard)
