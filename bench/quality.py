"""Quality benchmark: is the confidence a probability on every panel, and does discussion help?

Drives the real orchestrator (agents.orchestrator.Orchestrator) with the quiz mode of the
offline simulator (agents/providers/simulated.py): every agent answers a question with
one right answer, right with its accuracy p, otherwise one of W wrong values; positions
exact ("42") or paraphrased ("42", "42.0", "**42**", "The answer is 42", "42 (final)");
with a correlation c, agents of one model repeat their model's own draw (shared errors).
No network, no database.

Each row runs the same questions twice, once with agents that keep their answer (drift 0)
and once with agents that drift to the previous turn's strict plurality (drift 0.85, the
simulator's default), and prints:

  first     accuracy of the first-turn plurality (ties split evenly)
  keep      accuracy of the final vote when agents keep their answers; r>w / w>r: the share of
            questions whose first-turn plurality was right (wrong) that the final vote got
            wrong (right)
  drift     the same with agents that drift
  conf0     mean confidence of the drifting panel's answers from an EMPTY history: the prior at
            first, then the fit refitted on the answers so far after every refit_interval
            exchanges, as a fresh deployment reports it; ece0 its expected calibration error
  conf      the same after HISTORY unlabelled conversations; ece likewise
  prior     mean confidence with the prior alone, never refitted (what no model can make
            right on every row: see docs/quality.md)
  calls     LLM calls per conversation (drifting panel)

A row misses its target when |conf - accuracy| > 0.05 or ECE > 0.08 (conf0 and conf).

Usage: .venv/bin/python bench/quality.py [--questions 300] [--history 50] [--seeds 1]
       [--turns 2] [--only "N=5"]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
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
from agents.providers.simulated import QuizConfig, SimulatedProvider  # noqa: E402
from consensus import Reliabilities, answer_keys, fit_reliabilities, normalize_answer, posterior  # noqa: E402
from consensus.calibration import calibration_errors  # noqa: E402
from conversations.assessment import refit_interval  # noqa: E402

DRIFT = 0.85


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
    skills: tuple[float, ...]
    wrong_values: int = 3
    paraphrase: bool = False
    correlation: float = 0.0
    models: int = 1  # agents split over this many models (the first ones get the extra agent)
    ignore_format: float = 0.0
    drift: tuple[float, ...] = field(default=())  # per agent; () = every agent drifts DRIFT

    @property
    def label(self) -> str:
        skills = "/".join(f"{p:g}" for p in dict.fromkeys(self.skills))
        text = f"N={self.agents} p={skills} W={self.wrong_values} {'para' if self.paraphrase else 'exact'}"
        if self.correlation:
            text += f" c={self.correlation:g}x{self.models}m"
        if self.ignore_format:
            text += f" fmt{self.ignore_format:g}"
        if self.drift:
            text += " drift " + "/".join(f"{d:g}" for d in self.drift)
        return text

    def model_of(self, index: int) -> str:
        group = index % self.models
        return f"quiz-{group}-p{self.skills[index]:g}"


def profiles(panel: Panel) -> list[AgentProfile]:
    names = list(PERSONALITIES)
    return [
        AgentProfile(
            agent_id=f"agent_{i}",
            provider="simulated",
            model=panel.model_of(i),
            temperature=0.7,
            personality=names[i % len(names)],
            instruction=PERSONALITIES[names[i % len(names)]],
        )
        for i in range(panel.agents)
    ]


async def _silent(*_: Any, **__: Any) -> None:
    return None


def first_turn_answers(outcome: RunOutcome, models: dict[str, str]) -> list[tuple[str, str]]:
    """(model, key) of every first-turn answer the panel could read (what the service stores)."""
    turn = outcome.results.get(1, {})
    return answer_keys((models[aid], r.proposal.position) for aid, r in sorted(turn.items()) if r.proposal)


def plurality(keys: list[str], truth: str) -> tuple[float, bool]:
    """Expected accuracy of a plurality vote (ties split evenly), and whether truth alone leads."""
    counts = Counter(keys)
    if not counts:
        return 0.0, False
    best = max(counts.values())
    tied = [k for k, n in counts.items() if n == best]
    return ((1.0 / len(tied)) if truth in tied else 0.0), tied == [truth]


class Prequential:
    """The confidence as a deployment reports it: refit after refit_interval new exchanges."""

    def __init__(self, history: list[list[tuple[str, str]]]) -> None:
        self.history = list(history)
        self.fit = fit_reliabilities(self.history[-500:]) if self.history else Reliabilities()
        self.since = 0

    def add(self, answers: list[tuple[str, str]]) -> None:
        self.history.append(answers)
        self.since += 1
        if self.since >= refit_interval(self.fit.panels):
            self.fit = fit_reliabilities(self.history[-500:])
            self.since = 0


async def run_mode(
    panel: Panel, drift: tuple[float, ...], questions: int, history: int, seed: int, *, assess: bool = True
) -> dict[str, Any]:
    """One pass over the questions with the given drift per agent (assess: follow the confidence too)."""
    team = profiles(panel)
    models = {p.agent_id: p.model for p in team}
    quiz = QuizConfig(
        skills={p.agent_id: panel.skills[i] for i, p in enumerate(team)},
        wrong_values=panel.wrong_values,
        paraphrase=panel.paraphrase,
        correlation=panel.correlation,
        ignore_format=panel.ignore_format,
        drift={p.agent_id: drift[i] for i, p in enumerate(team)},
        seed=seed,
    )
    provider = Counting(SimulatedProvider(latency=0.0, quiz=quiz))
    reset_providers()
    register_provider("simulated", provider)

    async def converse(question: str) -> RunOutcome:
        orchestrator = Orchestrator(
            panel=team, question=question, turns=TURNS, emit=_silent, strategy="majority", stream=False,
        )  # fmt: skip
        return await orchestrator.run()

    past: list[list[tuple[str, str]]] = []
    for index in range(history if assess else 0):
        outcome = await converse(f"History question {seed}-{index}: what is {index} + {seed * 7 + 11}?")
        past.append(first_turn_answers(outcome, models))
    fresh, seasoned = Prequential([]), Prequential(past)
    rows: list[dict[str, Any]] = []
    calls = provider.calls
    for index in range(questions):
        question = f"Quiz {seed}-{index}: what is {index * 3} + {seed * 13 + 5}?"
        truth = normalize_answer(quiz.truth(question))
        outcome = await converse(question)
        answers = first_turn_answers(outcome, models)
        winner = outcome.decision.winner_key if outcome.decision else None
        first, led = plurality([k for _, k in answers], truth)
        rows.append(
            {
                "first": first,
                "led": led,
                "hit": winner == truth,
                "conf0": posterior(answers, fresh.fit).of(winner) if assess else 0.0,
                "conf": posterior(answers, seasoned.fit).of(winner) if assess else 0.0,
                "prior": posterior(answers, Reliabilities()).of(winner),
            }
        )
        if assess:
            fresh.add(answers)
            seasoned.add(answers)
    return {"rows": rows, "calls": (provider.calls - calls) / questions}


def transitions(rows: list[dict[str, Any]]) -> tuple[float, float, float]:
    """Final accuracy; share of right first-turn pluralities made wrong; of wrong ones made right."""
    led = [r for r in rows if r["led"]]
    other = [r for r in rows if not r["led"]]
    return (
        sum(r["hit"] for r in rows) / len(rows),
        sum(not r["hit"] for r in led) / max(1, len(led)),
        sum(r["hit"] for r in other) / max(1, len(other)),
    )


async def run_row(panel: Panel, questions: int, history: int, seeds: int) -> dict[str, Any]:
    keep: list[dict[str, Any]] = []
    drift: list[dict[str, Any]] = []
    calls = 0.0
    for seed in range(1, seeds + 1):
        keep += (await run_mode(panel, (0.0,) * panel.agents, questions, history, seed, assess=False))["rows"]
        moved = await run_mode(panel, panel.drift or (DRIFT,) * panel.agents, questions, history, seed)
        drift += moved["rows"]
        calls += moved["calls"] / seeds
    fresh = calibration_errors([(r["conf0"], r["hit"]) for r in drift])
    seasoned = calibration_errors([(r["conf"], r["hit"]) for r in drift])
    return {
        "panel": panel.label,
        "first": sum(r["first"] for r in drift) / len(drift),
        "keep": transitions(keep),
        "drift": transitions(drift),
        "conf0": fresh["confidence"],
        "ece0": fresh["ece"],
        "conf": seasoned["confidence"],
        "ece": seasoned["ece"],
        "prior": sum(r["prior"] for r in drift) / len(drift),
        "calls": calls,
    }


def panels() -> list[Panel]:
    grid = [
        Panel(agents, (p,) * agents, wrong, paraphrase)
        for agents in (3, 5, 7)
        for p in (0.55, 0.65, 0.75, 0.85)
        for wrong in (1, 3, 5)
        for paraphrase in (False, True)
    ]
    shared = [
        Panel(agents, (p,) * agents, 3, True, correlation=c, models=2)
        for agents in (3, 5, 7)
        for p in (0.6, 0.75)
        for c in (0.5, 0.9)
    ]
    others = [
        Panel(3, (0.85, 0.6, 0.6), 3, True),
        Panel(5, (0.85, 0.6, 0.6, 0.6, 0.6), 3, True),
        Panel(5, (0.65,) * 5, 3, True, drift=(0.0, DRIFT, 0.0, DRIFT, 0.0)),
        Panel(3, (0.7,) * 3, 3, True, ignore_format=0.3),
        Panel(5, (0.6,) * 5, 3, True, ignore_format=0.3),
    ]
    return grid + shared + others


HEADER = (
    f"{'panel':<34} {'first':>5} | {'keep':>5} {'r>w':>5} {'w>r':>5} | {'drift':>5} {'r>w':>5} {'w>r':>5} | "
    f"{'conf0':>5} {'ece0':>5} {'conf':>5} {'ece':>5} {'prior':>5} {'calls':>5}"
)


def line(r: dict[str, Any]) -> str:
    keep, drift = r["keep"], r["drift"]
    return (
        f"{r['panel']:<34} {r['first']:>5.3f} | {keep[0]:>5.3f} {keep[1]:>5.3f} {keep[2]:>5.3f} | "
        f"{drift[0]:>5.3f} {drift[1]:>5.3f} {drift[2]:>5.3f} | {r['conf0']:>5.3f} {r['ece0']:>5.3f} "
        f"{r['conf']:>5.3f} {r['ece']:>5.3f} {r['prior']:>5.3f} {r['calls']:>5.2f}"
    )


def misses(r: dict[str, Any]) -> list[str]:
    accuracy = r["drift"][0]
    notes = []
    if abs(r["conf0"] - accuracy) > 0.05 or r["ece0"] > 0.08:
        notes.append(
            f"from no history: conf {r['conf0']:.3f} vs accuracy {accuracy:.3f}, ECE {r['ece0']:.3f}"
        )
    if abs(r["conf"] - accuracy) > 0.05 or r["ece"] > 0.08:
        notes.append(f"after history: conf {r['conf']:.3f}, accuracy {accuracy:.3f}, ECE {r['ece']:.3f}")
    return notes


TURNS = 2


async def main() -> None:
    global TURNS
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--questions", type=int, default=300)
    parser.add_argument("--history", type=int, default=50)
    parser.add_argument("--seeds", type=int, default=1, help="replications, each with its own history")
    parser.add_argument("--turns", type=int, default=2, help="discussion turns of every conversation")
    parser.add_argument("--only", default="", help="run only panels whose label contains this text")
    args = parser.parse_args()
    TURNS = args.turns
    started = time.monotonic()
    print(
        f"{args.seeds} x {args.questions} questions per row, T={TURNS}; "
        f"conf after {args.history} conversations\n"
    )
    print(HEADER)
    off: list[str] = []
    results = []
    for panel in panels():
        if args.only and args.only not in panel.label:
            continue
        result = await run_row(panel, args.questions, args.history, args.seeds)
        results.append(result)
        print(line(result), flush=True)
        off += [f"{panel.label}: {note}" for note in misses(result)]
    n = len(results)
    if n:
        mean = {k: sum(r[k][i] for r in results) / n for k in ("keep", "drift") for i in (0,)}
        print(
            f"\nmean over rows: first-turn plurality {sum(r['first'] for r in results) / n:.3f}, "
            f"final vote keep {mean['keep']:.3f}, drift {mean['drift']:.3f}"
        )
    print(f"{time.monotonic() - started:.0f} s")
    print(f"targets missed ({len(off)}):" if off else "every target met.")
    for note in off:
        print(f"  {note}")


if __name__ == "__main__":
    asyncio.run(main())
