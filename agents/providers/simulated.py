"""An offline provider whose answers are deterministic from (prompt, agent, turn).

It serves tests, benchmarks and keyless installs. Every answer follows the consensus
reply format (FINAL POSITION / CONFIDENCE) or, for ballots, the ballot format, and is
labelled `simulated=True`. Asked for structured output (a response schema), it answers
the same content as a JSON object (answer, position, confidence / reason, vote,
confidence), streamed in chunks like a real vendor. A seeded `random.Random` drives every choice (never the
global RNG), so a panel's conversation replays identically.

Quiz mode (``QuizConfig``, from bench code or the ``SIMULATED_QUIZ`` setting) turns the
agents into quiz players with a known skill: each question has one right answer (given
in ``answers``, else the question's favoured candidate, which for "What is 17 + 25?" is
the sum); in turn 1 an agent answers right with its accuracy p (by model, then agent id,
else ``accuracy``), otherwise it picks one of ``wrong_values`` wrong answers (with
probability ``shared`` the first one, which every wrong agent then shares). With
probability ``correlation`` an agent repeats instead its model's own draw for the
question (one per model and question), so agents of one model share their errors.
Positions are paraphrased ("42", "42.0", "**42**", "The answer is 42", "42 (final)")
when ``paraphrase`` is on; a share ``ignore_format`` of replies is prose with no FINAL
POSITION line; from turn 2 an agent drifts to a strict plurality of the previous turn
with probability ``drift[model or agent id]``, else ``herding`` (0: it keeps its answer).
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import json
import math
import random
import re
import string
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agents.providers.base import DeltaCallback, Generation, GenerationRequest, Provider, ProviderError, Usage

YES_NO_STARTS = (
    "is", "are", "am", "do", "does", "did", "can", "could", "should", "would", "will",
    "was", "were", "has", "have", "had", "must", "may", "shall",
)  # fmt: skip
_STOPWORD_TEXT = """
a an the of to in on for and or but with without about what which who whom whose why how when where
is are was were be been being do does did can could should would will shall may might must this that
these those it its i you we they he she me my your our their best most more less than there here from
by at as into over under between after before during some any many much each every not no yes
"""
STOPWORDS = frozenset(_STOPWORD_TEXT.split())
AGREE_FIRST_TURN = 0.7  # chance a fresh agent picks the question's favoured answer
FOLLOW_MAJORITY = 0.85  # chance an agent adopts the peers' majority from turn 2
FOLLOW_PLURALITY = 0.5  # chance it adopts the first of several equally supported answers
CHUNKS = 5  # pieces a streamed answer is cut into
SEEN_LIMIT = 10_000  # retry counters kept for the failure schedule

OPENERS = (
    "Looking at the question carefully",
    "Weighing the main considerations",
    "Taking the practical constraints into account",
    "Considering the evidence and the usual trade-offs",
    "Thinking about what matters most here",
)
REASONS = (
    "The strongest argument is that it matches the most common and well-supported view.",
    "It balances the costs against the benefits better than the alternatives.",
    "The alternatives have drawbacks that are harder to justify in practice.",
    "It is the answer that holds up best under the obvious objections.",
    "It is the simplest answer consistent with what we know.",
)
BALLOT_REASONS = (
    "It is the proposal best supported by the discussion.",
    "It matches my own conclusion after weighing the arguments.",
    "It has the broadest support and the fewest weaknesses.",
)


def _seed(*parts: object) -> int:
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _fallback_normalize(position: str) -> str:
    return position.casefold().strip().strip(string.punctuation + " ")


def _normalizer() -> Callable[[str], str]:
    """consensus.normalize_answer when available, else casefolded text."""
    try:
        module = importlib.import_module("consensus")
    except ImportError:
        return _fallback_normalize
    normalize = getattr(module, "normalize_answer", None)
    return normalize if callable(normalize) else _fallback_normalize


def _estimate_tokens(text: str) -> int:
    return math.ceil(len(text) / 4) if text else 0


def candidate_positions(question: str) -> list[str]:
    """A small set of plausible short answers derived from the question's shape."""
    text = " ".join(question.split())
    lowered = text.casefold()
    # Starts only at the start of a word: without the lookbehind, a long word makes the search
    # quadratic (8000 digits took seconds per call).
    either = re.search(r"(?<![\w+#.-])([\w+#.-]+(?:\s[\w+#.-]+)?)\s+or\s+([\w+#.-]+(?:\s[\w+#.-]+)?)", text)
    if either:
        first = either.group(1).split()[-1].strip(string.punctuation)
        second = either.group(2).split()[0].strip(string.punctuation)
        if first and second and first.casefold() != second.casefold():
            return [first, second]
    if re.search(r"\bhow (many|much)\b", lowered) or re.search(r"\d", lowered):
        base = _seed(lowered) % 90 + 10
        numbers = re.findall(r"-?\d+(?:\.\d+)?", text)
        if len(numbers) >= 2 and re.search(r"[+*x-]|plus|times|minus", lowered):
            a, b = float(numbers[0]), float(numbers[1])
            if "+" in text or "plus" in lowered:
                base = int(a + b) if (a + b).is_integer() else base
            elif "*" in text or "times" in lowered or " x " in lowered:
                base = int(a * b) if (a * b).is_integer() else base
            elif "-" in text or "minus" in lowered:
                base = int(a - b) if (a - b).is_integer() else base
        return [str(base), str(base + 1), str(base * 2)]
    first_word = lowered.split(" ", 1)[0] if lowered else ""
    if first_word in YES_NO_STARTS:
        return ["Yes", "No", "It depends"]
    words = [w.strip(string.punctuation) for w in text.split()]
    keywords = [w for w in words if len(w) > 2 and w.casefold() not in STOPWORDS]
    unique = list(dict.fromkeys(k.capitalize() for k in keywords))
    unique.sort(key=lambda w: (-len(w), w))
    picks = unique[:3]
    if not picks:
        return ["Option A", "Option B"]
    return picks


def _favoured(question: str, candidates: Sequence[str]) -> str:
    return candidates[_seed("favoured", question.casefold()) % len(candidates)]


def first_turn_position(question: str, agent_id: str) -> str:
    """What an agent answers before it has seen anyone else."""
    candidates = candidate_positions(question)
    rng = random.Random(_seed("first", question, agent_id))
    favoured = _favoured(question, candidates)
    if rng.random() < AGREE_FIRST_TURN or len(candidates) == 1:
        return favoured
    return rng.choice([c for c in candidates if c != favoured])


@dataclass(frozen=True)
class QuizConfig:
    """Quiz mode: agents with known accuracy on questions with one right answer (see the module doc)."""

    accuracy: float = 0.7
    skills: Mapping[str, float] = field(default_factory=dict)  # model or agent id -> accuracy
    wrong_values: int = 3
    shared: float = 0.0
    paraphrase: bool = True
    ignore_format: float = 0.0
    herding: float = FOLLOW_MAJORITY
    answers: Mapping[str, str] = field(default_factory=dict)  # question -> right answer
    seed: int = 0
    correlation: float = 0.0
    drift: Mapping[str, float] = field(default_factory=dict)  # model or agent id -> drift strength

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuizConfig:
        """From the SIMULATED_QUIZ setting (unknown keys are an error)."""
        allowed = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ValueError(f"unknown quiz settings: {', '.join(unknown)}")
        return cls(**dict(data))

    def skill(self, model: str, agent_id: str) -> float:
        return float(self.skills.get(model, self.skills.get(agent_id, self.accuracy)))

    def drift_of(self, model: str, agent_id: str) -> float:
        """How readily the agent drifts to the previous turn's strict plurality."""
        return float(self.drift.get(model, self.drift.get(agent_id, self.herding)))

    def truth(self, question: str) -> str:
        known = self.answers.get(question)
        if known is not None:
            return known
        return _favoured(question, candidate_positions(question))

    def wrong(self, truth: str) -> list[str]:
        """wrong_values plausible wrong answers, distinct from the truth once normalised."""
        count = max(1, self.wrong_values)
        try:
            number = int(float(truth.replace(",", "")))
        except ValueError:
            return [f"{truth} {'bcdefghijklmnopqrstuvwxyz'[i % 25]}{i // 25 or ''}" for i in range(count)]
        offsets = [1, -1, 2, 10, -2, -10, 3, 100, -3, 5]
        offsets += [o for o in range(4, 4 + count) if o not in offsets]
        return [str(number + o) for o in offsets[:count]]


class SimulatedProvider(Provider):
    """Deterministic offline answers with configurable latency and failure rate."""

    name = "simulated"

    supports_structured = True

    def __init__(
        self, *, latency: float = 0.05, failure_rate: float = 0.0, quiz: QuizConfig | None = None
    ) -> None:
        self.latency = latency
        self.failure_rate = failure_rate
        self.quiz = quiz
        # How often each (prompt, agent, turn, kind) was asked, so a retry draws the next
        # entry of a deterministic failure schedule instead of failing forever.
        self._attempts: OrderedDict[int, int] = OrderedDict()

    @property
    def knows_answers(self) -> bool:
        """Whether its answers carry evidence: in quiz mode yes (a known accuracy), otherwise it
        picks among a question's plausible-looking candidates without knowing which is right."""
        return self.quiz is not None

    async def generate(self, request: GenerationRequest) -> Generation:
        """Sleep the configured latency and return the simulated answer."""
        started = time.monotonic()
        text = self._prepare(request)
        await asyncio.sleep(self.latency)
        return self._generation(request, text, started)

    async def stream(self, request: GenerationRequest, on_delta: DeltaCallback) -> Generation:
        """Emit the answer in a few chunks spread over the configured latency."""
        started = time.monotonic()
        text = self._prepare(request)
        pieces = _split(text, CHUNKS)
        for piece in pieces:
            await asyncio.sleep(self.latency / len(pieces))
            await on_delta(piece)
        return self._generation(request, text, started)

    def _prepare(self, request: GenerationRequest) -> str:
        """Decide failure first (raising ProviderError), then compose the text."""
        meta = request.metadata
        key = _seed(request.prompt, meta.get("agent_id", ""), meta.get("turn", 0), meta.get("kind", "answer"))
        attempt = self._attempts.pop(key, 0)
        self._attempts[key] = attempt + 1
        while len(self._attempts) > SEEN_LIMIT:
            self._attempts.popitem(last=False)
        if self.failure_rate > 0 and random.Random(_seed(key, attempt)).random() < self.failure_rate:
            raise ProviderError(
                "simulated server failure", kind="server", status=503, provider=self.name, model=request.model
            )
        rng = random.Random(key)
        structured = request.response_schema is not None
        if meta.get("kind") == "ballot":
            ballot = _ballot_fields(meta, rng)
            if structured:
                return json.dumps(ballot)
            return f"VOTE: {ballot['vote']}\nCONFIDENCE: {ballot['confidence']}\nREASON: {ballot['reason']}"
        if meta.get("kind") == "synthesis":
            return _synthesis_text(meta, rng)
        if meta.get("kind") == "repair":
            fields = _repair_fields(meta, rng)
        elif self.quiz is not None and meta.get("kind", "answer") == "answer":
            reply = _quiz_reply(request, meta, rng, self.quiz)
            if isinstance(reply, str):
                return reply  # prose that ignores the reply format, structured or not
            fields = reply
        else:
            fields = _answer_fields(request, meta, rng)
        if structured:
            return json.dumps(fields)
        body = f"{fields['answer']}\n\n" if fields["answer"] else ""
        return f"{body}FINAL POSITION: {fields['position']}\nCONFIDENCE: {fields['confidence']}"

    def _generation(self, request: GenerationRequest, text: str, started: float) -> Generation:
        return Generation(
            text=text,
            model=request.model,
            provider=self.name,
            usage=Usage(
                prompt_tokens=_estimate_tokens(request.system_instruction) + _estimate_tokens(request.prompt),
                completion_tokens=_estimate_tokens(text),
            ),
            latency_ms=(time.monotonic() - started) * 1000,
            finish_reason="STOP",
            simulated=True,
        )


def _split(text: str, parts: int) -> list[str]:
    size = max(1, math.ceil(len(text) / parts))
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def _answer_fields(request: GenerationRequest, meta: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """The reply's parts: the prose answer, the short position, the confidence."""
    question = str(meta.get("question") or request.prompt)
    agent_id = str(meta.get("agent_id", "agent"))
    turn = int(meta.get("turn", 1) or 1)
    peers = [str(p) for p in meta.get("peer_positions") or [] if str(p).strip()]
    position = str(meta.get("previous_position") or first_turn_position(question, agent_id))
    agreeing = False
    if turn >= 2 and peers:
        normalize = _normalizer()
        counts = Counter(normalize(p) for p in [*peers, position])
        top_key, top_count = max(counts.items(), key=lambda item: (item[1], item[0]))
        majority = next(p for p in [*peers, position] if normalize(p) == top_key)
        # On a tie every agent sees the same answers, so "first by key" is a shared focal point.
        follow = FOLLOW_MAJORITY if top_count > 1 else FOLLOW_PLURALITY
        if normalize(position) == top_key or rng.random() < follow:
            position, agreeing = majority, True
    confidence = round(rng.uniform(0.7, 0.95) if agreeing else rng.uniform(0.5, 0.85), 2)
    sentences = [f"{rng.choice(OPENERS)}, my answer is {position}.", rng.choice(REASONS)]
    if turn >= 2 and peers:
        sentences.append(
            "Having read the other proposals, I agree with the majority view."
            if agreeing
            else "Having read the other proposals, I still hold my earlier view."
        )
    return {"answer": " ".join(sentences), "position": position, "confidence": confidence}


def _repair_fields(meta: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """A restated position: what the earlier reply said the answer was (its "my answer is ..." sentence)."""
    reply = str(meta.get("reply") or "")
    # The position an agent meant, as its prose put it: "my answer is 3.5.", "the answer is 42, I
    # think", "I would say Paris." (the last such phrase; a decimal point is not a sentence end).
    found = re.findall(r"(?:answer is|would say)\s+(.+?)(?=,|\.(?:\s|$)|\n|$)", reply)
    position = found[-1].strip() if found else "I don't know"
    return {"answer": "", "position": position, "confidence": round(rng.uniform(0.5, 0.85), 2)}


def _synthesis_text(meta: dict[str, Any], rng: random.Random) -> str:
    """A chairman's final answer: the winning position, an argument, a word on dissent."""
    position = str(meta.get("position") or "no position")
    dissent = (
        "Some panelists preferred another answer, but their arguments were weaker."
        if int(meta.get("options") or 1) > 1
        else "The panel was unanimous."
    )
    return f"The panel's answer is {position}. {rng.choice(REASONS)} {dissent}"


PARAPHRASES = ("{}", "{}.0", "**{}**", "The answer is {}", "{} (final)", "{}")
PROSE = ("Putting it all together, my answer is {}.", "So the answer is {}, I think.", "I would say {}.")


def quiz_first_answer(quiz: QuizConfig, question: str, agent_id: str, model: str) -> str:
    """An agent's turn-1 answer in quiz mode (its independent draw; benchmarks replay it)."""
    truth = quiz.truth(question)
    wrong = quiz.wrong(truth)
    draw = random.Random(_seed("quiz", quiz.seed, question, agent_id))
    if quiz.correlation and draw.random() < quiz.correlation:
        draw = random.Random(_seed("quiz-model", quiz.seed, question, model))  # the model's own draw
    if draw.random() < quiz.skill(model, agent_id):
        return truth
    if draw.random() < quiz.shared:
        return wrong[0]
    return draw.choice(wrong)


def _quiz_reply(
    request: GenerationRequest, meta: dict[str, Any], rng: random.Random, quiz: QuizConfig
) -> dict[str, Any] | str:
    """A quiz player's reply: its fields, or prose (a str) when it ignores the reply format."""
    question = str(meta.get("question") or request.prompt)
    agent_id = str(meta.get("agent_id", "agent"))
    turn = int(meta.get("turn", 1) or 1)
    normalize = _normalizer()
    truth = quiz.truth(question)
    wrong = quiz.wrong(truth)
    canonical = {normalize(v): v for v in [truth, *wrong]}

    def value(position: str) -> str:
        return canonical.get(normalize(position), position)

    previous = str(meta.get("previous_position") or "")
    position = value(previous) if previous else quiz_first_answer(quiz, question, agent_id, request.model)
    peers = [value(str(p)) for p in meta.get("peer_positions") or [] if str(p).strip()]
    if turn >= 2 and peers:
        counts = Counter(normalize(p) for p in [*peers, position])
        ranked = counts.most_common()
        top_key, top_count = ranked[0]
        strict = top_count > 1 and (len(ranked) == 1 or ranked[1][1] < top_count)
        if (
            strict
            and normalize(position) != top_key
            and rng.random() < quiz.drift_of(request.model, agent_id)
        ):
            position = canonical.get(top_key, next(p for p in peers if normalize(p) == top_key))
    shown = rng.choice(PARAPHRASES).format(position) if quiz.paraphrase else position
    if shown.endswith(".0") and not re.fullmatch(r"-?\d+\.0", shown):
        shown = position  # only numbers get a ".0"
    confidence = round(rng.uniform(0.6, 0.95), 2)
    reasoning = f"{rng.choice(OPENERS)}, I worked it out. {rng.choice(REASONS)}"
    if rng.random() < quiz.ignore_format:
        return f"{reasoning} {rng.choice(PROSE).format(position)}"
    return {"answer": reasoning, "position": shown, "confidence": confidence}


def _ballot_fields(meta: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    options = [o for o in meta.get("options") or [] if isinstance(o, dict) and o.get("label")]
    if not options:
        return {"reason": "There was no proposal to vote for.", "vote": "none", "confidence": 0}
    normalize = _normalizer()
    own = normalize(str(meta.get("own_position") or ""))
    chosen = next((o for o in options if own and normalize(str(o.get("position", ""))) == own), None)
    if chosen is None:
        chosen = max(options, key=lambda o: (_support(o), -options.index(o)))
    confidence = round(rng.uniform(0.6, 0.95), 2)
    return {"reason": rng.choice(BALLOT_REASONS), "vote": chosen["label"], "confidence": confidence}


def _support(option: dict[str, Any]) -> int:
    supporters = option.get("supporters")
    if isinstance(supporters, list | tuple):
        return len(supporters)
    support = option.get("support", 0)
    return int(support) if isinstance(support, int | float) else 0
