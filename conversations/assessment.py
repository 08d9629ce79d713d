"""The calibrated confidence of a finished run, from the stored history (see consensus/calibration.py).

Reliabilities: every model's (``"<provider>:<model>"``) reliability and correlation are
fitted without labels on the first-turn answers of the last ``HISTORY_EXCHANGES``
exchanges, and cached for ``CACHE_SECONDS`` in the Django cache (Redis when configured).
The fit follows the history as it grows: after every ``refit_interval`` exchanges a
process has assessed (``REFIT_MIN`` at first, a tenth of the history once it is larger,
so the work per exchange stays bounded), it refits in a worker thread, off the event
loop and after the run's answer, and publishes the new fit to the cache and its own
memory; the runs in between read the previous fit. Recalibration:
once ``MIN_LABELLED`` exchanges carry feedback, a Platt map from the raw model probability
to the observed hit rate is fitted and cached the same way (a new feedback clears it).
Each process also keeps what it read for ``LOCAL_SECONDS``, so a run reads neither cache
nor database on the hot path (they cost a thread hop and a Redis round trip each, and a
run asks three times); a new fit reaches the other processes within that time.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from asgiref.sync import sync_to_async
from django.core.cache import cache
from django.db import connections

from agents.orchestrator import AgentResult, RunOutcome
from agents.profiles import AgentProfile
from agents.providers.base import ProviderError
from agents.providers.registry import get_provider
from consensus import (
    PlattScaling,
    Reliabilities,
    answer_keys,
    fit_reliabilities,
    posterior,
    vote_weights,
)
from consensus.calibration import MIN_LABELLED, is_binary
from consensus.records import Decision
from conversations.models import ConsensusResult, Feedback, Message

logger = logging.getLogger("polyagents.quality")
T = TypeVar("T")

HISTORY_EXCHANGES = 500
CACHE_SECONDS = 300
LOCAL_SECONDS = 10.0
REFIT_MIN = 5
REFIT_FRACTION = 10
RELIABILITY_KEY = "quality:reliabilities:v2"
PLATT_KEY = "quality:platt:v1"


def model_key(provider: str, model: str) -> str:
    return f"{provider}:{model}"


def load_reliabilities() -> Reliabilities:
    """EM fit over the first-turn answers of the latest exchanges (no labels)."""
    rows = (
        Message.objects.filter(role=Message.Role.AGENT, turn=1, status=Message.Status.OK)
        .exclude(position="")
        .order_by("-created_at")
        .values_list("conversation_id", "exchange", "provider", "model", "position")[: HISTORY_EXCHANGES * 10]
    )
    panels: dict[tuple[Any, int], list[tuple[str, str]]] = defaultdict(list)
    for conversation_id, exchange, provider, model, position in rows:
        key = (conversation_id, exchange)
        if key not in panels and len(panels) >= HISTORY_EXCHANGES:
            continue
        panels[key].append((model_key(provider, model), position))
    return fit_reliabilities(answer_keys(panel) for panel in panels.values())


def _reliabilities_from(data: Mapping[str, Any]) -> Reliabilities:
    return Reliabilities(
        by_model=dict(data["by_model"]),
        coincidence=float(data["coincidence"]),
        default=float(data["default"]),
        panels=int(data["panels"]),
        correlation=dict(data["correlation"]),
        default_correlation=float(data["default_correlation"]),
    )


# key -> (monotonic expiry, fit): what this process last read from the shared cache.
_local: dict[str, tuple[float, Any]] = {}


def _local_fit(key: str) -> Any:
    found = _local.get(key)
    if found is not None and found[0] > time.monotonic():
        return found[1]
    return None


def _remembered(key: str, shared: Callable[[], T]) -> T:
    """This process's fit under `key` while fresh, else the shared one (kept for LOCAL_SECONDS)."""
    fit = _local_fit(key)
    if fit is None:
        fit = shared()
        _local[key] = (time.monotonic() + LOCAL_SECONDS, fit)
    return fit


def reliabilities() -> Reliabilities:
    """The cached fit (recomputed at most every CACHE_SECONDS)."""
    return _remembered(RELIABILITY_KEY, _shared_reliabilities)


def _shared_reliabilities() -> Reliabilities:
    cached = cache.get(RELIABILITY_KEY)
    if isinstance(cached, dict):
        try:
            return _reliabilities_from(cached)
        except (KeyError, TypeError, ValueError):
            logger.warning("ignoring a malformed cached reliability fit")
    fitted = load_reliabilities()
    cache.set(RELIABILITY_KEY, fitted.to_dict(), CACHE_SECONDS)
    return fitted


def refit_interval(panels: int) -> int:
    """New exchanges between two refits: REFIT_MIN, or a tenth of the history once that is more."""
    return max(REFIT_MIN, panels // REFIT_FRACTION)


class _Refits:
    """Counts the exchanges this process assessed and refits in a thread when enough are new."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.since = 0
        self.running: threading.Thread | None = None

    def note(self, fitted: Reliabilities) -> threading.Thread | None:
        """One more exchange; starts (and returns) a refit when one is due and none is running."""
        with self.lock:
            self.since += 1
            if self.since < refit_interval(fitted.panels) or (self.running and self.running.is_alive()):
                return None
            self.since = 0
            self.running = threading.Thread(target=_refit, name="quality-refit", daemon=True)
        self.running.start()
        return self.running

    def reset(self) -> None:
        with self.lock:
            self.since = 0


refits = _Refits()


def _refit() -> None:
    """Fit the reliabilities afresh and publish them (shared cache and this process)."""
    try:
        fitted = load_reliabilities()
        cache.set(RELIABILITY_KEY, fitted.to_dict(), CACHE_SECONDS)
        _local[RELIABILITY_KEY] = (time.monotonic() + LOCAL_SECONDS, fitted)
    except Exception:  # a refit that fails leaves the previous fit in place
        logger.warning("refitting the reliabilities failed", exc_info=True)
    finally:
        connections.close_all()  # this thread's connections: it does not serve requests


def load_recalibration() -> PlattScaling:
    """Platt fit on (raw probability, feedback) of every exchange with feedback."""
    labels = {(f.conversation_id, f.exchange): f.correct for f in Feedback.objects.all()[:10_000]}
    if len(labels) < MIN_LABELLED:
        return PlattScaling(labelled=len(labels))
    conversations = {c for c, _ in labels}
    outcomes = []
    for result in ConsensusResult.objects.filter(conversation_id__in=conversations):
        label = labels.get((result.conversation_id, result.exchange))
        raw = (result.details.get("calibration") or {}).get("raw")
        if label is not None and isinstance(raw, int | float) and math.isfinite(raw):
            outcomes.append((float(raw), label))
    return PlattScaling.fit(outcomes)


def recalibration() -> PlattScaling:
    return _remembered(PLATT_KEY, _shared_recalibration)


def _shared_recalibration() -> PlattScaling:
    cached = cache.get(PLATT_KEY)
    if isinstance(cached, dict):
        return PlattScaling(a=cached["a"], b=cached["b"], labelled=cached["labelled"])
    fitted = load_recalibration()
    cache.set(PLATT_KEY, {"a": fitted.a, "b": fitted.b, "labelled": fitted.labelled}, CACHE_SECONDS)
    return fitted


def forget_recalibration() -> None:
    cache.delete(PLATT_KEY)
    _local.pop(PLATT_KEY, None)


def forget_fits() -> None:
    """Drop both fits, shared and local: the next read fits them afresh."""
    cache.delete_many([RELIABILITY_KEY, PLATT_KEY])
    _local.clear()
    refits.reset()


@dataclass(frozen=True)
class Assessment:
    """How likely the panel's answer is right (confidence) and how much the panel agreed (agreement)."""

    confidence: float
    raw: float
    agreement: float
    share: float
    margin: float
    details: dict[str, Any]

    @property
    def source(self) -> str:
        """ "prior", "history" or "feedback": what the confidence rests on."""
        return str(self.details["confidence_source"])


def margin_of(decision: Decision) -> float:
    """Winner's share of the electorate minus the runner-up's (the agreement formula's margin)."""
    tallies = sorted(decision.tallies.values(), reverse=True)
    total = math.fsum(tallies)
    if not decision.winner or total <= 0 or not decision.electorate:
        return 0.0
    turnout = (decision.electorate - decision.abstentions) / decision.electorate
    runner_up = tallies[1] / total * turnout if len(tallies) > 1 else 0.0
    return max(0.0, decision.share - runner_up)


def first_turn_answers(results: Mapping[str, AgentResult]) -> list[tuple[str, str]]:
    """(model, key) of every usable first-turn answer, grouped as the vote groups them."""
    return answer_keys(
        (model_key(r.provider, r.model), r.proposal.position)
        for _, r in sorted(results.items())
        if r.ok and r.proposal is not None
    )


def uninformed_models(results: Mapping[str, AgentResult]) -> frozenset[str]:
    """The models whose provider declares it does not know the answers (the simulator outside quiz mode)."""
    uninformed = set()
    for result in results.values():
        try:
            provider = get_provider(result.provider)
        except ProviderError:
            continue
        if not getattr(provider, "knows_answers", True):
            uninformed.add(model_key(result.provider, result.model))
    return frozenset(uninformed)


def confidence_source(fitted: Reliabilities, platt: PlattScaling) -> str:
    """What the reported confidence rests on: "feedback" (labels), "history" (unlabelled fit) or "prior"."""
    return "feedback" if platt.labelled >= MIN_LABELLED else fitted.source


def assess(outcome: RunOutcome, fitted: Reliabilities, platt: PlattScaling) -> Assessment | None:
    """The calibrated confidence of outcome's decision (None without a decision)."""
    decision = outcome.decision
    if decision is None:
        return None
    first = outcome.results.get(1, {})
    answers = first_turn_answers(first)
    fitted = replace(fitted, uninformed=fitted.uninformed | uninformed_models(first))
    raw = posterior(answers, fitted).of(decision.winner_key) if decision.winner_key else 0.0
    confidence = min(1.0, max(0.0, platt(raw)))
    return Assessment(
        confidence=confidence,
        raw=raw,
        agreement=decision.confidence,
        share=decision.share,
        margin=margin_of(decision),
        details={
            "raw": round(raw, 6),
            "model": "one-coin Dawid-Skene with shared errors per model, over first-turn answers",
            "answers": len(answers),
            "reliabilities": {m: round(fitted.of(m), 4) for m, _ in sorted(set(answers))},
            "correlations": {m: round(fitted.correlation_of(m), 4) for m, _ in sorted(set(answers))},
            "uninformed": sorted(fitted.uninformed),
            "coincidence": round(fitted.coincidence, 4),
            "history_panels": fitted.panels,
            "recalibrated": platt.labelled >= MIN_LABELLED,
            "labelled": platt.labelled,
            "confidence_source": confidence_source(fitted, platt),
        },
    )


async def _fresh(key: str, read: Callable[[], T]) -> T:
    """A fit from this process's memory, else read (cache or database) off the event loop."""
    local = _local_fit(key)
    if local is not None:
        return local
    return await sync_to_async(read)()


async def aassess(outcome: RunOutcome) -> Assessment | None:
    """assess() with the cached reliabilities and recalibration (database reads off the event loop)."""
    fitted = await _fresh(RELIABILITY_KEY, reliabilities)
    platt = await _fresh(PLATT_KEY, recalibration)
    assessment = assess(outcome, fitted, platt)
    if assessment is not None:
        refits.note(fitted)
    return assessment


async def apanel_weights(panel: list[AgentProfile]) -> dict[str, float]:
    """Each agent's vote weight for the "reliability" strategy (open-question weights)."""
    fitted = await _fresh(RELIABILITY_KEY, reliabilities)
    models = {p.agent_id: model_key(p.provider, p.model) for p in panel}
    return vote_weights(models, fitted, binary=is_binary(()))
