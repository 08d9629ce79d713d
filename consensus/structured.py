"""Structured replies and ballots (JSON objects), the clean answer text, and the repair request.

Providers that support structured output are asked for a JSON object matching
``ANSWER_SCHEMA`` (``answer``: the reply in prose, ``position``: the answer itself in one
short line, ``confidence``: 0..1) or ``ballot_schema(labels)`` (``reason``, ``vote``: one of
the labels, ``confidence``). Keys are listed in the order the model should write them:
``answer`` first, so a streamed reply shows readable text early; a ballot's ``reason``
before its ``vote``. The text format of ``consensus.formats`` stays the fallback.

``clean_answer`` removes the machine lines (``FINAL POSITION:`` / ``CONFIDENCE:`` at the
end of a text reply) so the user reads prose. ``last_sentence_position`` is the last
resort for a short reply that gave no position even after the repair request
(``REPAIR_INSTRUCTIONS``): its final sentence, or what follows "my answer is" in it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from consensus.formats import (
    _CONFIDENCE_LABEL,
    _LINE_PREFIX,
    _POSITION_LABEL,
    MAX_POSITION_CHARS,
    NON_ANSWERS,
    _choice,
    make_ballot,
    parse_confidence,
    parse_reply,
)
from consensus.normalize import normalize_answer
from consensus.records import Ballot, Proposal

ANSWER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "answer": {"type": "string", "description": "Your answer with its reasoning, in prose."},
        "position": {
            "type": "string",
            "description": 'Your answer itself in one short line, e.g. "Yes", "42", "Option B".',
        },
        "confidence": {"type": "number", "description": "How sure you are, from 0 to 1."},
    },
    "required": ["answer", "position", "confidence"],
    "additionalProperties": False,
}

REPLY_JSON_INSTRUCTIONS = (
    "Reply with a JSON object: "
    '"answer" (your answer with its reasoning, in prose), '
    '"position" (your answer itself in one short line, e.g. "Yes", "42", "Option B", "Solar power") and '
    '"confidence" (a number from 0 to 1, e.g. 0.8).'
)

BALLOT_JSON_INSTRUCTIONS = (
    "Vote for the proposal you find best (it may be your own). Reply with a JSON object: "
    '"reason" (one sentence), "vote" (the letter of the chosen proposal) and '
    '"confidence" (a number from 0 to 1).'
)

REPAIR_INSTRUCTIONS = (
    "Your reply above did not state a final position we could read. "
    "Restate your final position and your confidence; do not change your answer."
)

REPAIR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "position": ANSWER_SCHEMA["properties"]["position"],
        "confidence": ANSWER_SCHEMA["properties"]["confidence"],
    },
    "required": ["position", "confidence"],
    "additionalProperties": False,
}

REPAIR_JSON_INSTRUCTIONS = (
    'Reply with a JSON object: "position" (your answer itself in one short line) and '
    '"confidence" (a number from 0 to 1).'
)

REPAIR_TEXT_INSTRUCTIONS = (
    "Answer with exactly these two lines and nothing else:\n"
    "FINAL POSITION: <your answer itself in one short line>\n"
    "CONFIDENCE: <a number from 0 to 1>"
)

LAST_RESORT_MAX_CHARS = 600
"""A reply longer than this gets no last-resort position: its final sentence is too likely a detail."""

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_ANSWER_IS = re.compile(
    r"\b(?:my|the|final|our)\s+(?:final\s+)?(?:answer|position|verdict|conclusion)"
    r"\s+(?:is|would be|remains)\s*[:\-–—]?\s*(.+)$",
    re.I,
)
_FENCE = re.compile(r"^\s*```(?:json)?\s*|\s*```\s*$", re.I)


def ballot_schema(labels: Sequence[str]) -> dict[str, Any]:
    """The ballot's JSON schema; ``vote`` is restricted to the ballot's labels."""
    return {
        "type": "object",
        "properties": {
            "reason": {"type": "string", "description": "One sentence: why this proposal."},
            "vote": {"type": "string", "enum": list(labels), "description": "The chosen proposal's letter."},
            "confidence": {"type": "number", "description": "How sure you are, from 0 to 1."},
        },
        "required": ["reason", "vote", "confidence"],
        "additionalProperties": False,
    }


def parse_json_object(text: str) -> dict[str, Any] | None:
    """The JSON object a structured reply holds (code fences tolerated), else None."""
    body = _FENCE.sub("", text.strip())
    if not body.startswith("{"):
        return None
    try:
        value = json.loads(body)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _confidence_value(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        number = float(value)
        if math.isnan(number):
            return None
        if number > 1:
            number /= 100  # 80 means 80 %
        return min(1.0, max(0.0, number))
    if isinstance(value, str):
        return parse_confidence(value)
    return None


def _text_value(value: object) -> str:
    return value.strip() if isinstance(value, str) else ""


def _usable(position: str) -> bool:
    return (
        bool(normalize_answer(position))
        and " ".join(position.casefold().rstrip(".!").split()) not in NON_ANSWERS
    )


def parse_structured_reply(agent_id: str, data: Mapping[str, Any]) -> Proposal | None:
    """The proposal of a structured reply; when ``position`` is unusable, the text parser reads ``answer``."""
    answer = _text_value(data.get("answer"))
    position = " ".join(_text_value(data.get("position")).split())[:MAX_POSITION_CHARS].strip()
    if position and _usable(position):
        return Proposal(
            agent_id=agent_id,
            text=answer,
            position=position,
            confidence=_confidence_value(data.get("confidence")),
        )
    from_text = parse_reply(agent_id, answer) if answer else None
    if from_text is not None and from_text.confidence is None:
        from_text = Proposal(
            agent_id=agent_id,
            text=answer,
            position=from_text.position,
            confidence=_confidence_value(data.get("confidence")),
        )
    return from_text


def parse_structured_ballot(voter: str, data: Mapping[str, Any], labels: Sequence[str]) -> Ballot:
    """The ballot of a structured reply; an unusable vote is an abstention with the reason why."""
    raw_vote = data.get("vote")
    choice, why = _choice(raw_vote if isinstance(raw_vote, str) else None, labels)
    return make_ballot(
        voter, choice, why, _confidence_value(data.get("confidence")), _text_value(data.get("reason"))
    )


def _is_machine_line(line: str) -> bool:
    stripped = _LINE_PREFIX.sub("", line)
    return bool(_POSITION_LABEL.match(stripped) or _CONFIDENCE_LABEL.match(stripped))


def clean_answer(text: str) -> str:
    """The reply without its trailing machine lines (FINAL POSITION / CONFIDENCE and their values)."""
    lines = text.rstrip().splitlines(keepends=True)
    cut = len(lines)
    index = len(lines) - 1
    while index >= 0:
        line = lines[index]
        if not line.strip():
            index -= 1
            continue
        if _is_machine_line(line):
            cut = index
            index -= 1
            continue
        # A value on its own line right after an empty label ("FINAL POSITION:\nYes").
        previous = next((lines[i] for i in range(index - 1, -1, -1) if lines[i].strip()), "")
        label = _LINE_PREFIX.sub("", previous)
        match = _POSITION_LABEL.match(label) or _CONFIDENCE_LABEL.match(label)
        if match and not match.group(1).strip(" *_`~"):
            cut = index
            index -= 1
            continue
        break
    return "".join(lines[:cut]).rstrip()


def last_sentence_position(text: str) -> str | None:
    """The last resort for a short reply without a position: its final sentence, or the answer it names."""
    body = clean_answer(text).strip()
    if not body or len(body) > LAST_RESORT_MAX_CHARS:
        return None
    sentences = [s.strip() for s in _SENTENCE_END.split(body) if s.strip()]
    if not sentences:
        return None
    sentence = sentences[-1].rstrip(".!?").strip()
    match = _ANSWER_IS.search(sentence)
    if match:
        sentence = match.group(1).strip().rstrip(".!?").strip()
    sentence = sentence.strip("\"'“”‘’").strip()[:MAX_POSITION_CHARS].strip()
    return sentence if sentence and _usable(sentence) else None
