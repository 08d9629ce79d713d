"""Signals that apps above `conversations` connect to, so it never imports them.

`conversation_completed` is sent (in the background, after the result is stored) when an
exchange ends completed or without consensus; `archive` connects its search indexer to it
in `ArchiveConfig.ready`. `run_finished` is sent for every end of a run (failed and cancelled
too) and `agent_turn` for each agent reply of a run whose metadata asks for `notify_turns`;
`webhooks` connects to both.
"""

from django.dispatch import Signal

# Arguments: conversation_id (uuid.UUID), status (str).
conversation_completed = Signal()
# Arguments: conversation (the final Conversation), exchange (int), agreement (float | None).
run_finished = Signal()
# Arguments: conversation, exchange, data (the agent_response event's fields).
agent_turn = Signal()
