"""Admission of an exchange (its budget and the key's daily quota) and settling what it spent.

Before an exchange starts, its first round (turn 1 and the vote) is estimated
(`agents.budget`). A request budget smaller than that estimate is refused (422
`budget_too_small`); a key with a daily quota reserves the estimate, or is refused (429
`quota_exceeded`, Retry-After to the next UTC midnight). When the run ends, the actual
usage replaces the reservation (`settle`). See gateway.quota for the counters.
"""

from __future__ import annotations

from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db.models import Sum

from agents.budget import Budget, Estimate, first_round_estimate
from agents.orchestrator import Orchestrator
from agents.profiles import build_panel
from conversations.models import ConsensusResult, Conversation, Message
from gateway import quota
from gateway.principal import Principal


class AdmissionRefused(Exception):
    """An exchange refused before it starts; `extra` goes into the JSON error body."""

    def __init__(self, status_code: int, code: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.code = code
        self.extra = extra


async def _no_events(*args: Any, **kwargs: Any) -> None:
    return None


def history_of(conversation: Conversation) -> list[tuple[str, str]]:
    """The earlier questions and answers the agents will see, as the run builds them."""
    if not conversation.exchanges:
        return []
    questions = dict(
        Message.objects.filter(conversation=conversation, role=Message.Role.USER).values_list(
            "exchange", "content"
        )
    )
    answers = dict(
        ConsensusResult.objects.filter(conversation=conversation).values_list("exchange", "answer")
    )
    return [(questions[n], answers.get(n, "")) for n in sorted(questions)]


def estimate_first_round(conversation: Conversation, message: str, num_agents: int) -> Estimate:
    panel = build_panel(num_agents)
    prompts = Orchestrator(
        panel=panel, question=message, turns=1, emit=_no_events, history=history_of(conversation)
    )
    return first_round_estimate(
        panel, lambda p: prompts.answer_prompt(p, 1), settings.CONFIG.MAX_OUTPUT_TOKENS
    )


# What `admit` returns when there is nothing to check or reserve (no budget, no quota).
NOTHING_ADMITTED: dict[str, Any] = {"budget": None, "quota": None, "stopped": None}


def admit(
    *, conversation: Conversation, principal: Principal, message: str, num_agents: int, budget: Budget | None
) -> dict[str, Any]:
    """Check the budget and reserve the quota of a new exchange; returns its metadata entries.

    Runs inside the transaction that starts the exchange; the caller releases the
    reservation (`quota.release`) if that transaction fails afterwards.
    """
    needs_quota = quota.quota_of(principal.api_key_id) is not None
    if budget is None and not needs_quota:
        return dict(NOTHING_ADMITTED)
    estimate = estimate_first_round(conversation, message, num_agents)
    if budget is not None and not budget.allows(estimate.tokens, estimate.usd):
        raise AdmissionRefused(
            422,
            "budget_too_small",
            "The budget cannot pay for one round of this panel (the first turn and the vote): "
            f"estimated {estimate.tokens} tokens, ${estimate.usd:.6f}. Raise max_cost or max_tokens, "
            "or ask fewer agents.",
            estimate=estimate.to_dict(),
            budget=budget.to_dict(),
        )
    try:
        reservation = quota.reserve(principal.api_key_id, tokens=estimate.tokens, usd=estimate.usd)
    except quota.QuotaExceeded as exc:
        raise AdmissionRefused(
            429,
            "quota_exceeded",
            str(exc),
            retry_after=exc.state.retry_after(),
            quota=exc.state.to_dict(),
            estimate=estimate.to_dict(),
        ) from None
    return {
        "budget": budget.to_dict() if budget is not None else None,
        "quota": reservation,
        "stopped": None,
    }


def run_budget(metadata: dict[str, Any]) -> Budget | None:
    """The cap of a run: the request's budget, and what the key's quota left when it started."""
    budget = Budget.from_dict(metadata.get("budget"))
    reservation = metadata.get("quota")
    if reservation and reservation.get("room") is not None:
        budget = (budget or Budget()).with_quota(reservation.get("unit", "tokens"), reservation["room"])
    return budget


def _exchange_spend(conversation_id: Any, exchange: int) -> tuple[int, float]:
    """Tokens and USD of the stored answers of an exchange (a cancelled run has no totals)."""
    agg = Message.objects.filter(conversation_id=conversation_id, exchange=exchange).aggregate(
        prompt=Sum("prompt_tokens"), completion=Sum("completion_tokens"), usd=Sum("cost_usd")
    )
    return (agg["prompt"] or 0) + (agg["completion"] or 0), float(agg["usd"] or 0.0)


def holds_reservation(conversation: Conversation) -> bool:
    """Whether settling the exchange charges a key's quota (a reservation not settled yet)."""
    reservation = conversation.metadata.get("quota")
    return bool(reservation and not reservation.get("settled"))


def settle(conversation: Conversation, *, tokens: int, usd: float) -> dict[str, Any] | None:
    """Charge what the exchange spent: Prometheus counters, and the key's quota if it has one."""
    quota.record_spend(conversation.owner or "anonymous", tokens, usd)
    reservation = conversation.metadata.get("quota")
    if holds_reservation(conversation):
        quota.settle(reservation, tokens=tokens, usd=usd)
    return reservation


async def asettle(conversation: Conversation, *, tokens: int, usd: float) -> dict[str, Any] | None:
    return await sync_to_async(settle)(conversation, tokens=tokens, usd=usd)


async def asettle_stored(conversation: Conversation, exchange: int) -> dict[str, Any] | None:
    """Settle from the stored answers (a cancelled run)."""
    tokens, usd = await sync_to_async(_exchange_spend)(conversation.pk, exchange)
    return await asettle(conversation, tokens=tokens, usd=usd)
