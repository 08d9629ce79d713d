"""Quality benchmark: does the panel beat one agent, and is its confidence a probability?

Drives the real orchestrator (agents.orchestrator.Orchestrator) with the quiz mode of the
offline simulator (agents/providers/simulated.py): every agent answers a question with
one right answer, right with its accuracy p, otherwise wrong (wrong answers spread over
3 values, or shared: every wrong agent gives the same wrong value), positions
paraphrased ("42", "42.0", "The answer is 42"), herding toward a strict plurality from
turn 2. No network, no database.

For each panel (N = 3, 5 agents; T = 1, 2 turns; equal or unequal skills; independent
or shared errors) it first runs HISTORY unlabelled conversations, fits the reliabilities
on their first-turn answers (consensus.calibration.fit_reliabilities, no labels), then
runs QUESTIONS fresh conversations with the "reliability" strategy weighted by the
fitted reliabilities and prints:

  single    mean accuracy of one agent alone (its first-turn answer); best = the best agent
  panel     accuracy of the panel's answer (the vote's winner)
  plural.   ideal plurality vote on the same first-turn draws (ties split evenly)
  conf0     mean calibrated confidence with no history (prior reliabilities); ece0 its ECE
  conf      mean calibrated confidence after HISTORY conversations; ece, brier likewise
  abst      share of agent replies that were abstentions (no readable position)
  extra     LLM calls per conversation beyond N x turns run (vote rounds; repair calls if any)
  tokens    tokens per conversation
  vr!       unanimous final turns that still had a vote round (must be 0)

Usage: .venv/bin/python bench/quality.py [--questions 200] [--history 50] [--seeds 3]
       [--ignore-format 0.3] (adds rows where 30% of replies ignore the reply format)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DEBUG", "true")
os.environ.setdefault("LOG_LEVEL", "WARNING")
if not os.environ.get("DATABASE_URL"):
    os.environ["DATABASE_URL"] = f"sqlite:///{tempfile.mkdtemp()}/bench.sqlite3"
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "polyagents_site.settings")

import django

django.setup()

from agents.orchestrator import Orchestrator, RunOutcome  # noqa: E402
from agents.profiles import PERSONALITIES, AgentProfile  # noqa: E402
from agents.providers.base import Generation, GenerationRequest, Provider  # noqa: E402
from agents.providers.registry import register_provider, reset_providers  # noqa: E402
from agents.providers.simulated import QuizConfig, SimulatedProvider, quiz_first_answer  # noqa: E402
from consensus import (  # noqa: E402
    Reliabilities,
    fit_reliabilities,
    normalize_answer,
    posterior,
    vote_weights,
)
from consensus.calibration import calibration_errors, is_binary  # noqa: E402


class Counting(Provider):
    """Wraps the simulator and counts calls."""

    name = "simulated"

    def __init__(self, inner: SimulatedProvider) -> None:
        self.inner = inner
        self.calls = 0

    async def generate(self, request: GenerationRequest) -> Generation:
        self.calls += 1
        return await self.inner.generate(request)

    async def stream(self, request: GenerationRequest, on_delta: Any) -> Generation:
        self.calls += 1
        return await self.inner.stream(request, on_delta)


@dataclass(frozen=True)
class Panel:
    agents: int
    turns: int
    skills: tuple[float, ...]
    shared: float
    ignore_format: float = 0.0

    @property
    def label(self) -> str:
        skills = "/".join(f"{p:g}" for p in dict.fromkeys(self.skills))
        errors = "shared" if self.shared else "indep."
        fmt = f" fmt{self.ignore_format:g}" if self.ignore_format else ""
        return f"N={self.agents} T={self.turns} p={skills} {errors}{fmt}"

    def models(self) -> list[str]:
        return [f"quiz-p{p:g}" for p in self.skills]


def profiles(panel: Panel) -> list[AgentProfile]:
    names = list(PERSONALITIES)
    return [
        AgentProfile(
            agent_id=f"agent_{i}",
            provider="simulated",
            model=model,
            temperature=0.7,
            personality=names[i % len(names)],
            instruction=PERSONALITIES[names[i % len(names)]],
        )
        for i, model in enumerate(panel.models())
    ]


async def _silent(*_: Any, **__: Any) -> None:
    return None


def first_turn_answers(outcome: RunOutcome, models: dict[str, str]) -> list[tuple[str, str]]:
    """(model, key) of every first-turn answer the panel could read (what the service stores)."""
    turn = outcome.results.get(1, {})
    return [
        (models[aid], normalize_answer(r.proposal.position))
        for aid, r in sorted(turn.items())
        if r.proposal is not None
    ]


def plurality_hit(answers: list[str], truth: str) -> float:
    """Expected accuracy of an ideal plurality vote (ties broken uniformly at random)."""
    counts = Counter(normalize_answer(a) for a in answers)
    best = max(counts.values())
    tied = [k for k, n in counts.items() if n == best]
    return (1.0 / len(tied)) if normalize_answer(truth) in tied else 0.0


def confidence(answers: list[tuple[str, str]], winner: str | None, reliabilities: Reliabilities) -> float:
    return posterior(answers, reliabilities).of(winner)


async def run_panel(
    panel: Panel, quiz: QuizConfig, questions: int, history: int, seed: int
) -> dict[str, Any]:
    skills = dict(zip(panel.models(), panel.skills, strict=True))
    quiz = replace(quiz, skills=skills, shared=panel.shared, ignore_format=panel.ignore_format, seed=seed)
    provider = Counting(SimulatedProvider(latency=0.0, quiz=quiz))
    reset_providers()
    register_provider("simulated", provider)
    team = profiles(panel)
    models = {p.agent_id: p.model for p in team}

    async def converse(question: str, weights: dict[str, float] | None) -> RunOutcome:
        orchestrator = Orchestrator(
            panel=team,
            question=question,
            turns=panel.turns,
            emit=_silent,
            strategy="reliability",
            stream=False,
            vote_weights=weights,
        )
        return await orchestrator.run()

    # 1. Unlabelled history (equal weights: the reliabilities are not known yet).
    past: list[list[tuple[str, str]]] = []
    for index in range(history):
        outcome = await converse(f"History question {seed}-{index}: what is {index} + {seed * 7 + 11}?", None)
        past.append(first_turn_answers(outcome, models))
    fitted = fit_reliabilities(past)
    prior = Reliabilities()

    # 2. Fresh questions, votes weighted by the fitted reliabilities.
    rows: list[dict[str, Any]] = []
    calls_before, tokens = provider.calls, 0
    for index in range(questions):
        question = f"Quiz {seed}-{index}: what is {index * 3} + {seed * 13 + 5}?"
        truth = quiz.truth(question)
        draws = [quiz_first_answer(quiz, question, p.agent_id, p.model) for p in team]
        answers_probe = [(models[p.agent_id], normalize_answer(d)) for p, d in zip(team, draws, strict=True)]
        weights = vote_weights(models, fitted, binary=is_binary(k for _, k in answers_probe))
        outcome = await converse(question, weights)
        decision = outcome.decision
        winner = decision.winner_key if decision else None
        answers = first_turn_answers(outcome, models)
        final = outcome.results.get(outcome.turns_completed, {})
        final_keys = {normalize_answer(r.proposal.position) for r in final.values() if r.proposal}
        replies = [r for turn in outcome.results.values() for r in turn.values()]
        tokens += outcome.usage.total_tokens
        rows.append(
            {
                "hit": winner == normalize_answer(truth),
                "single": [normalize_answer(d) == normalize_answer(truth) for d in draws],
                "plurality": plurality_hit(draws, truth),
                "conf0": confidence(answers, winner, prior),
                "conf": confidence(answers, winner, fitted),
                "abstained": sum(1 for r in replies if r.ok and r.proposal is None),
                "replies": len(replies),
                "turns_run": outcome.turns_completed,
                "unanimous_voted": len(final_keys) == 1 and len(final) == panel.agents and outcome.vote_round,
            }
        )
    calls = provider.calls - calls_before
    return {"rows": rows, "calls": calls, "tokens": tokens, "reliabilities": fitted.to_dict()}


def summarize(panel: Panel, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Pools the runs (one per seed, each with its own history) into one table row."""
    rows = [row for run in runs for row in run["rows"]]
    n = len(rows)
    singles = [sum(r["single"][i] for r in rows) / n for i in range(panel.agents)]
    with_prior = calibration_errors([(r["conf0"], r["hit"]) for r in rows])
    with_history = calibration_errors([(r["conf"], r["hit"]) for r in rows])
    turns_run = sum(r["turns_run"] for r in rows)
    return {
        "panel": panel.label,
        "single": sum(singles) / len(singles),
        "best": max(singles),
        "accuracy": sum(r["hit"] for r in rows) / n,
        "plurality": sum(r["plurality"] for r in rows) / n,
        "conf0": with_prior["confidence"],
        "ece0": with_prior["ece"],
        "conf": with_history["confidence"],
        "ece": with_history["ece"],
        "brier": with_history["brier"],
        "abstain": sum(r["abstained"] for r in rows) / max(1, sum(r["replies"] for r in rows)),
        "extra": (sum(run["calls"] for run in runs) - panel.agents * turns_run) / n,
        "tokens": sum(run["tokens"] for run in runs) / n,
        "unanimous_voted": sum(r["unanimous_voted"] for r in rows),
        "reliabilities": [run["reliabilities"] for run in runs],
    }


def panels(ignore_format: float) -> list[Panel]:
    result = []
    for agents, equal, unequal in ((3, 0.7, (0.85, 0.6, 0.6)), (5, 0.6, (0.85, 0.6, 0.6, 0.6, 0.6))):
        for shared in (0.0, 1.0):
            for turns in (1, 2):
                result.append(Panel(agents, turns, (equal,) * agents, shared))
                result.append(Panel(agents, turns, unequal, shared))
    if ignore_format:
        result += [
            Panel(3, 2, (0.7,) * 3, 0.0, ignore_format),
            Panel(5, 2, (0.6,) * 5, 0.0, ignore_format),
        ]
    return result


HEADER = (
    f"{'panel':<36} {'single':>6} {'best':>5} {'panel':>6} {'plural.':>7} {'conf0':>6} {'ece0':>5} "
    f"{'conf':>5} {'ece':>5} {'brier':>5} {'abst':>5} {'extra':>5} {'tokens':>6} {'vr!':>3}"
)


def line(r: dict[str, Any]) -> str:
    return (
        f"{r['panel']:<36} {r['single']:>6.3f} {r['best']:>5.2f} {r['accuracy']:>6.3f} "
        f"{r['plurality']:>7.3f} "
        f"{r['conf0']:>6.3f} {r['ece0']:>5.3f} {r['conf']:>5.3f} {r['ece']:>5.3f} {r['brier']:>5.3f} "
        f"{r['abstain']:>5.3f} {r['extra']:>5.2f} {r['tokens']:>6.0f} {r['unanimous_voted']:>3}"
    )


def verdicts(r: dict[str, Any], unequal: bool, independent: bool) -> list[str]:
    notes = []
    if r["accuracy"] < r["plurality"] - 0.01:
        notes.append("panel < plurality - 1pt")
    if unequal and r["accuracy"] <= r["plurality"]:
        notes.append("not above plurality")
    if independent:
        if abs(r["conf"] - r["accuracy"]) > 0.05 or r["ece"] > 0.08:
            notes.append("calibration after history off target")
        if abs(r["conf0"] - r["accuracy"]) > 0.15 or r["ece0"] > 0.15:
            notes.append("calibration without history off target")
    if r["unanimous_voted"]:
        notes.append("unanimous panel voted")
    return notes


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument("--history", type=int, default=50)
    parser.add_argument("--seeds", type=int, default=3, help="replications, each with its own history")
    parser.add_argument("--ignore-format", type=float, default=0.3)
    parser.add_argument("--only", default="", help="run only panels whose label contains this text")
    args = parser.parse_args()
    started = time.monotonic()
    print(
        f"{args.seeds} replications x {args.questions} questions per panel, each after "
        f"{args.history} unlabelled conversations of history\n"
    )
    print(HEADER)
    off: list[str] = []
    for panel in panels(args.ignore_format):
        if args.only and args.only not in panel.label:
            continue
        runs = [
            await run_panel(panel, QuizConfig(), args.questions, args.history, seed)
            for seed in range(1, args.seeds + 1)
        ]
        result = summarize(panel, runs)
        print(line(result), flush=True)
        notes = verdicts(result, len(set(panel.skills)) > 1, panel.shared == 0.0 and not panel.ignore_format)
        off += [f"{panel.label}: {note}" for note in notes]
    print(f"\n{time.monotonic() - started:.0f} s")
    print("targets missed:" if off else "every target met.")
    for note in off:
        print(f"  {note}")


if __name__ == "__main__":
    asyncio.run(main())
