"""What a conversation service refuses, as errors a view turns into a status and a code."""

from __future__ import annotations

from conversations import budget as admission


class ConversationError(Exception):
    code = "conversation_error"
    status_code = 400


class ConversationNotFound(ConversationError):
    code = "not_found"
    status_code = 404


class ConversationBusy(ConversationError):
    code = "conversation_running"
    status_code = 409


class ConversationRefused(ConversationError):
    """Refused before it starts: a budget too small for one round (422), a used-up quota (429)."""

    def __init__(self, refusal: admission.AdmissionRefused) -> None:
        super().__init__(str(refusal))
        self.code = refusal.code
        self.status_code = refusal.status_code
        self.extra = refusal.extra
