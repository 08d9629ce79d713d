"""Signals that apps above `conversations` connect to, so it never imports them.

`conversation_completed` is sent (in the background, after the result is stored) when an
exchange ends completed or without consensus; `archive` connects its search indexer to it
in `ArchiveConfig.ready`.
"""

from django.dispatch import Signal

# Arguments: conversation_id (uuid.UUID), status (str).
conversation_completed = Signal()
