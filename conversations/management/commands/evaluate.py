"""`manage.py evaluate FILE.jsonl`: one model alone against the panel, on questions with exact answers.

Each line of FILE is ``{"question": "...", "answer": "..."}``. Every question goes to the
configured panel (AGENT_MODELS_CONFIG / GEMINI_* / OPENAI_* / the simulator) through the
real orchestrator; nothing is stored. A reply counts as right when its position and the
expected answer normalise to the same key (consensus.normalize_answer: "42.0", "The
answer is 42" and "forty-two" all match "42").

"single" is each agent's first-turn answer (given before it saw the others, so it is
that model alone); "panel" is the vote's winner. The confidence is the calibrated one
(consensus/calibration.py) with two sets of reliabilities: those of the stored history
(what /chat would report, and the source it rests on: prior or history) and those fitted
without labels on this run's own first-turn answers. A provider that declares it does
not know the answers (the simulator outside quiz mode) carries no evidence, so its
confidence is the prior's chance level. With the simulator, ``--quiz-accuracy P`` puts
it in quiz mode knowing the file's answers (each agent right with probability P), which
tests the pipeline offline.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError

from agents.orchestrator import Orchestrator, RunOutcome
from agents.profiles import build_panel
from agents.providers.registry import aclose_providers, register_provider, reset_providers
from agents.providers.simulated import QuizConfig, SimulatedProvider
from consensus import STRATEGIES, Reliabilities, fit_reliabilities, normalize_answer, posterior
from consensus.calibration import calibration_errors
from conversations.assessment import first_turn_answers, reliabilities, uninformed_models

MAX_QUESTIONS = 10_000


@dataclass(frozen=True)
class Item:
    question: str
    answer: str


def read_items(path: Path) -> list[Item]:
    """The file's questions; CommandError naming the line for anything malformed."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise CommandError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise CommandError(f"{path} is not UTF-8 text") from None
    items = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CommandError(f"{path}:{number}: not JSON ({exc.msg})") from None
        if not isinstance(data, dict) or set(data) != {"question", "answer"}:
            raise CommandError(f'{path}:{number}: expected an object with exactly "question" and "answer"')
        question, answer = data["question"], data["answer"]
        if not isinstance(question, str) or not question.strip():
            raise CommandError(f"{path}:{number}: question must be a non-empty string")
        if (
            not isinstance(answer, str | int | float)
            or isinstance(answer, bool)
            or not normalize_answer(str(answer))
        ):
            raise CommandError(f"{path}:{number}: answer must be a short non-empty string or number")
        items.append(Item(question=question.strip(), answer=str(answer)))
    if not items:
        raise CommandError(f"{path} holds no questions")
    if len(items) > MAX_QUESTIONS:
        raise CommandError(f"{path} holds {len(items)} questions; at most {MAX_QUESTIONS}")
    return items


async def _silent(*_: Any, **__: Any) -> None:
    return None


class Command(BaseCommand):
    help = "Score one model alone against the panel on a JSONL file of questions with exact answers."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("file", type=Path)
        parser.add_argument("--agents", type=int, default=None, help="panel size (default NUM_AGENTS)")
        parser.add_argument(
            "--turns", type=int, default=None, help="discussion turns (default DEFAULT_TURNS)"
        )
        parser.add_argument("--strategy", choices=sorted(STRATEGIES), default="majority")
        parser.add_argument("--limit", type=int, default=None, help="only the first N questions")
        parser.add_argument("--concurrency", type=int, default=4, help="questions in flight at once")
        parser.add_argument(
            "--quiz-accuracy",
            type=float,
            default=None,
            help="simulator only: quiz mode knowing the file's answers, each agent right with probability P",
        )
        parser.add_argument("--verbose", action="store_true", help="one line per question")

    def handle(self, *args: Any, **options: Any) -> None:
        from django.conf import settings

        config = settings.CONFIG
        items = read_items(options["file"])[: options["limit"]]
        agents = options["agents"] or config.NUM_AGENTS
        turns = options["turns"] or config.DEFAULT_TURNS
        if not 1 <= agents <= config.MAX_AGENTS:
            raise CommandError(f"--agents must be between 1 and {config.MAX_AGENTS}")
        if not 1 <= turns <= config.MAX_TURNS:
            raise CommandError(f"--turns must be between 1 and {config.MAX_TURNS}")
        if options["concurrency"] < 1:
            raise CommandError("--concurrency must be at least 1")
        panel = build_panel(agents)
        accuracy = options["quiz_accuracy"]
        if accuracy is not None:
            if not 0 <= accuracy <= 1:
                raise CommandError("--quiz-accuracy must be between 0 and 1")
            if any(p.provider != "simulated" for p in panel):
                raise CommandError("--quiz-accuracy needs a panel of simulated agents")
            quiz = QuizConfig(accuracy=accuracy, answers={i.question: i.answer for i in items})
            reset_providers()
            register_provider("simulated", SimulatedProvider(latency=config.SIMULATED_LATENCY, quiz=quiz))
        try:
            outcomes = asyncio.run(self._run(items, panel, turns, options))
            # Asked of the providers that answered (the quiz simulator is registered until then).
            blind = frozenset().union(*(uninformed_models(o.results.get(1, {})) for o in outcomes))
        finally:
            if accuracy is not None:
                reset_providers()
        self._report(items, panel, turns, outcomes, blind, options["verbose"])

    async def _run(
        self, items: list[Item], panel: list[Any], turns: int, options: dict[str, Any]
    ) -> list[RunOutcome]:
        gate = asyncio.Semaphore(options["concurrency"])

        async def one(item: Item) -> RunOutcome:
            async with gate:
                orchestrator = Orchestrator(
                    panel=panel, question=item.question, turns=turns, emit=_silent,
                    strategy=options["strategy"], stream=False,
                )  # fmt: skip
                return await orchestrator.run()

        try:
            return list(await asyncio.gather(*(one(item) for item in items)))
        finally:
            await aclose_providers()  # before asyncio.run closes the loop their sessions belong to

    def _report(
        self,
        items: list[Item],
        panel: list[Any],
        turns: int,
        outcomes: list[RunOutcome],
        blind: frozenset[str],
        verbose: bool,
    ) -> None:
        from asgiref.sync import async_to_sync, sync_to_async

        try:
            stored = async_to_sync(sync_to_async(reliabilities))()
        except DatabaseError as exc:
            self.stderr.write(f"no stored history ({exc.__class__.__name__}); using the prior reliabilities")
            stored = Reliabilities()
        answers = [first_turn_answers(o.results.get(1, {})) for o in outcomes]
        source = stored.source
        stored = replace(stored, uninformed=blind)
        own = replace(fit_reliabilities(answers), uninformed=blind)
        single: dict[str, list[bool]] = {p.agent_id: [] for p in panel}
        rows: list[dict[str, Any]] = []
        tokens = 0
        for item, outcome, first in zip(items, outcomes, answers, strict=True):
            truth = normalize_answer(item.answer)
            for agent_id, result in outcome.results.get(1, {}).items():
                said = normalize_answer(result.proposal.position) if result.proposal else ""
                single.setdefault(agent_id, []).append(said == truth)
            decision = outcome.decision
            winner = decision.winner_key if decision else None
            rows.append(
                {
                    "hit": winner == truth,
                    "stored": posterior(first, stored).of(winner) if winner else 0.0,
                    "own": posterior(first, own).of(winner) if winner else 0.0,
                    "status": outcome.status,
                }
            )
            tokens += outcome.usage.total_tokens
            if verbose:
                said = decision.winner_position if decision else "-"
                mark = "ok " if winner == truth else "NO "
                self.stdout.write(f"{mark} {item.question[:60]:<60} expected {item.answer!r}, panel {said!r}")
        n = len(rows)
        self.stdout.write(f"{n} questions, {len(panel)} agents, {turns} turns\n")
        for profile in panel:
            hits = single.get(profile.agent_id, [])
            share = sum(hits) / n
            self.stdout.write(
                f"  single  {profile.agent_id:<12} {profile.provider}:{profile.model:<30} {share:6.1%}"
            )
        panel_accuracy = sum(r["hit"] for r in rows) / n
        self.stdout.write(f"  panel   {'':<12} {'vote winner':<40} {panel_accuracy:6.1%}")
        if blind:
            names = ", ".join(sorted(blind))
            self.stdout.write(f"  no evidence from {names} (its provider does not know the answers)")
        for label, key in ((f"stored history, source {source}", "stored"), ("fitted on this run", "own")):
            errors = calibration_errors([(r[key], r["hit"]) for r in rows])
            self.stdout.write(
                f"  confidence ({label}): mean {errors['confidence']:.3f}, ECE {errors['ece']:.3f}, "
                f"Brier {errors['brier']:.3f}"
            )
        failed = sum(1 for r in rows if r["status"] == "failed")
        self.stdout.write(f"  failed runs {failed}, tokens {tokens} ({tokens / n:.0f} per question)")
