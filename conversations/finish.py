"""A run's end: its decision, its spend charged, its conversation's final state stored with its
terminal event."""

from __future__ import annotations

import uuid
from typing import Any

from django.utils import timezone

from agents.orchestrator import RunOutcome, extra_calls, usage_dict
from conversations import budget as admission
from conversations.assessment import aassess
from conversations.models import Conversation
from conversations.recorder import RunRecorder
from conversations.signals import conversation_completed, run_finished, send_later
from conversations.threads import in_pool_thread
from telemetry.errors import arecord_error
from telemetry.metrics import CONVERSATIONS


async def _finish_cancelled(
    conversation_id: uuid.UUID, exchange: int, recorder: RunRecorder, duration: float
) -> Conversation:
    reservation = await admission.asettle_stored(recorder.conversation, exchange)
    if reservation:
        metadata = {**recorder.conversation.metadata, "quota": reservation}
        await Conversation.objects.filter(pk=conversation_id).aupdate(metadata=metadata)
    await Conversation.objects.filter(pk=conversation_id).aupdate(
        status=Conversation.Status.CANCELLED,
        error="cancelled by request",
        completed_at=timezone.now(),
        duration=round(duration, 3),
    )
    CONVERSATIONS.labels("cancelled").inc()
    await recorder(
        "conversation_failed", status="cancelled", reason="cancelled by request", duration=round(duration, 3)
    )
    conversation = await Conversation.objects.aget(pk=conversation_id)
    send_later(run_finished, conversation=conversation, exchange=exchange)
    return conversation


# What a finished run sets on its conversation (the event log keeps `last_seq` current meanwhile).
FINAL_FIELDS = (
    "status", "turns_completed", "consensus_result", "confidence", "error", "duration",
    "completed_at", "prompt_tokens", "completion_tokens", "metadata", "updated_at", "cost_usd",
)  # fmt: skip


def _settle_and_save(conversation: Conversation, tokens: int, usd: float) -> None:
    """Charge the exchange's spend to the key's quota, then store the finished conversation."""
    admission.settle(conversation, tokens=tokens, usd=usd)  # settles metadata["quota"] in place
    conversation.save(update_fields=list(FINAL_FIELDS))


def _result_row(outcome: RunOutcome, assessment: Any) -> dict[str, Any] | None:
    """The exchange's ConsensusResult fields (None without a decision)."""
    decision = outcome.decision
    if decision is None or assessment is None:
        return None
    details = decision.to_dict()
    return {
        "method": decision.method,
        "reached": decision.reached,
        "winner": decision.winner or "",
        "answer": outcome.answer if decision.reached else "",
        "confidence": assessment.confidence,
        "tie_break": decision.tie_break or "",
        "tallies": decision.tallies,
        "dissent": details.get("dissent", []),
        "details": {
            **details,
            "position": decision.winner_position,
            "options": outcome.options,
            "leading_answer": outcome.answer,
            "synthesis": outcome.synthesis,
            "confidence": assessment.confidence,
            "agreement": assessment.agreement,
            "margin": assessment.margin,
            "calibration": assessment.details,
        },
    }


async def _announce_decision(recorder: RunRecorder, outcome: RunOutcome, assessment: Any) -> None:
    decision = outcome.decision
    if decision is None or assessment is None:
        return
    await recorder(
        "consensus_reached",
        consensus=outcome.answer if decision.reached else None,
        position=decision.winner_position,
        reached=decision.reached,
        confidence=round(assessment.confidence, 4),
        confidence_source=assessment.source,
        agreement=round(assessment.agreement, 4),
        share=round(assessment.share, 4),
        margin=round(assessment.margin, 4),
        method=decision.method,
        winner=decision.winner,
        tallies=decision.tallies,
        tie_break=decision.tie_break,
        dissent=decision.to_dict().get("dissent", []),
        synthesis=outcome.synthesis.get("mode"),
    )


def _final_state(conversation: Conversation, outcome: RunOutcome, assessment: Any, duration: float) -> None:
    """Set the finished run's fields on its conversation (not saved)."""
    status = outcome.status
    conversation.status = status
    conversation.turns_completed = outcome.turns_completed
    conversation.consensus_result = outcome.answer if status == "completed" else ""
    conversation.confidence = assessment.confidence if assessment is not None else None
    conversation.error = outcome.reason
    conversation.duration = duration
    conversation.completed_at = timezone.now()
    conversation.prompt_tokens += outcome.usage.prompt_tokens
    conversation.completion_tokens += outcome.usage.completion_tokens
    conversation.cost_usd += outcome.cost.usd
    conversation.metadata = {
        **conversation.metadata,
        "early_stop": outcome.early_stop,
        "vote_round": outcome.vote_round,
        "tokens": usage_dict(outcome.usage),
        "synthesis_used": outcome.synthesis,
        "extra_calls": extra_calls(outcome.results, outcome.synthesis),
        "extra_tokens": {
            "repair": usage_dict(outcome.repair_usage),
            "synthesis": usage_dict(outcome.synthesis_usage),
        },
        "no_consensus_reason": outcome.cause or None,
        **({"retry_after": outcome.retry_after} if outcome.retry_after else {}),
        "cost": outcome.cost.fields(),
        "stopped": outcome.stopped,
        "stop_estimate": outcome.stop_estimate,
        "quota": conversation.metadata.get("quota"),
    }


async def _announce_end(recorder: RunRecorder, outcome: RunOutcome, duration: float) -> None:
    """The run's terminal event; then (completed) the completion signal, in the background."""
    conversation, status, tokens = recorder.conversation, outcome.status, usage_dict(outcome.usage)
    if status == "failed":
        await arecord_error("chat_conversation", outcome.reason, conversation_id=str(conversation.pk))
        await recorder(
            "conversation_failed",
            status=status,
            reason=outcome.reason,
            retry_after=outcome.retry_after,
            duration=duration,
            turns_completed=outcome.turns_completed,
            tokens=tokens,
            **outcome.cost.fields(),
        )
        return
    await recorder(
        "conversation_completed",
        status=status,
        duration=duration,
        turns_completed=outcome.turns_completed,
        early_stop=outcome.early_stop,
        tokens=tokens,
        confidence=conversation.confidence,
        reason=outcome.reason or None,
        no_consensus_reason=outcome.cause or None,
        **outcome.cost.fields(),
        stopped=outcome.stopped,
    )
    # After the terminal event: its batch stored the conversation's final state.
    send_later(conversation_completed, conversation_id=conversation.pk, status=status)


async def _finish(
    conversation_id: uuid.UUID, exchange: int, recorder: RunRecorder, outcome: RunOutcome, duration: float
) -> Conversation:
    duration = round(duration, 3)
    assessment = await aassess(outcome)
    result = _result_row(outcome, assessment)
    if result is not None:
        # Written with the consensus_reached event below, in that batch's transaction.
        recorder.log.stage_result({"exchange": exchange, **result})
    await _announce_decision(recorder, outcome, assessment)
    # The instance the run began with: only this run writes its final fields.
    conversation = recorder.conversation
    _final_state(conversation, outcome, assessment, duration)
    usd = outcome.cost.usd
    if not admission.holds_reservation(conversation):
        # No quota to charge in the database: the finished conversation is written with its
        # terminal event, in that batch's transaction (no separate save).
        admission.settle(conversation, tokens=outcome.usage.total_tokens, usd=usd)  # counters only
        conversation.updated_at = timezone.now()
        recorder.log.stage_conversation(**{name: getattr(conversation, name) for name in FINAL_FIELDS})
    else:
        await in_pool_thread(_settle_and_save, conversation, outcome.usage.total_tokens, usd)
    CONVERSATIONS.labels(outcome.status).inc()
    await _announce_end(recorder, outcome, duration)
    agreement = assessment.agreement if assessment is not None else None
    send_later(run_finished, conversation=conversation, exchange=exchange, agreement=agreement)
    conversation.last_seq = recorder.log.last_seq
    return conversation
