"""The reply and ballot formats agents are asked for, and the tolerant parsers that read them.

Both parsers read labelled lines. A line may carry markdown around its label (``**FINAL
POSITION:**``, ``- Vote:``, ``> CONFIDENCE -``), labels are case-insensitive, and when a
label occurs several times the LAST occurrence wins (agents often quote others first).

Replies: ``FINAL POSITION`` (synonyms ``FINAL ANSWER``, ``POSITION``, ``ANSWER``) and
``CONFIDENCE`` (synonym ``CERTAINTY``). A label with an empty value takes the next
non-empty line. No position, a position with nothing left after normalisation, or an
explicit non-answer (``abstain``, ``n/a``, ``undecided``, ``no position``, ``I don't
know``) makes the reply an abstention (``parse_reply`` returns None).

Confidence: ``0.8``, ``.8``, ``80%``, ``80 %``, ``8/10``, ``8 out of 10``; a bare number
above 1 is read as a percentage (``80`` -> 0.8); the words very high / high / medium /
moderate / low / very low read as 0.9 / 0.8 / 0.5 / 0.5 / 0.2 / 0.1; everything is clamped
to [0, 1]. Without a CONFIDENCE line, an inline ``(confidence: 0.9)`` is read. A reply
without a readable confidence has ``confidence=None`` (the library weighs it as 0.5 where
a weight is needed); a ballot without one gets 0.5.

Ballots: ``VOTE`` (synonyms ``MY VOTE``, ``FINAL VOTE``, ``BALLOT``), ``CONFIDENCE``,
``REASON``. ``B``, ``(B)``, ``[b]``, ``**B**``, ``B.``, ``Proposal B``, ``Option B`` and
``B - because ...`` all mean B. A label not on the ballot, several labels (``A and B``,
``A/B``, ``A, B``), or no VOTE line (unless the whole reply is just one label) make an
abstention whose reason starts with ``[why]``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from consensus.normalize import normalize_answer
from consensus.records import Ballot, Proposal

REPLY_INSTRUCTIONS = (
    "End your answer with exactly these two lines:\n"
    'FINAL POSITION: <your answer itself in one short line, e.g. "Yes", "42", "Option B", "Solar power">\n'
    "CONFIDENCE: <a number from 0 to 1, e.g. 0.8>"
)

BALLOT_INSTRUCTIONS = (
    "Vote for the proposal you find best (it may be your own). Answer with exactly these three lines:\n"
    "VOTE: <the letter of the chosen proposal, e.g. B>\n"
    "CONFIDENCE: <a number from 0 to 1, e.g. 0.8>\n"
    "REASON: <one sentence>"
)

DEFAULT_BALLOT_CONFIDENCE = 0.5
MAX_POSITION_CHARS = 200
MAX_REASON_CHARS = 500

NON_ANSWERS = frozenset(
    {"abstain", "i abstain", "n/a", "na", "undecided", "no position", "i don't know", "i do not know"}
)
CONFIDENCE_WORDS = {
    "very high": 0.9,
    "high": 0.8,
    "medium": 0.5,
    "moderate": 0.5,
    "low": 0.2,
    "very low": 0.1,
}

_MARKUP = re.compile(r"[*_`~]")
_LINE_PREFIX = re.compile(r"^[\s>#*_`~\-+•]*")
_SEPARATOR = r"\s*[*_`~]*\s*(?:[:=：]|[-–—](?=\s))"
_POSITION_LABEL = re.compile(rf"^(?:final\s+position|final\s+answer|position|answer){_SEPARATOR}(.*)$", re.I)
_CONFIDENCE_LABEL = re.compile(
    rf"^(?:confidence|certainty)(?:\s+level)?(?:{_SEPARATOR}|\s+(?=[\d.]|(?:very\s+)?(?:high|medium|moderate|low)\b))(.*)$",
    re.I,
)
_CONFIDENCE_ANYWHERE = re.compile(r"\b(?:confidence|certainty)(?:\s+level)?\s*[*_`~]*\s*[:=]\s*(.*)$", re.I)
_VOTE_LABEL = re.compile(rf"^(?:(?:my|final)\s+)?(?:vote|ballot){_SEPARATOR}(.*)$", re.I)
_REASON_LABEL = re.compile(rf"^(?:reason|rationale|justification){_SEPARATOR}(.*)$", re.I)
_INLINE_CONFIDENCE = re.compile(r"\s*[(\[,;]?\s*\b(?:confidence|certainty)\b\s*[:=].*$", re.I)

_NUMBER = re.compile(
    r"^(?P<sign>-)?(?P<num>\d+(?:\.\d+)?|\.\d+)\s*"
    r"(?:(?P<pct>%)|(?:/|out\s+of)\s*(?P<den>\d+(?:\.\d+)?))?",
    re.I,
)
_VOTE_ITEM = re.compile(
    r"\s*(?:(?:proposal|option|choice)\s*)?[(\[]?\s*([a-z]{1,2})\s*[)\]]?(?=$|[\s.,;:!?/&+)\-–—])", re.I
)
_VOTE_LIST_SEPARATOR = re.compile(r"\s*(?:,|/|&|\+|\band\b|\bor\b)\s*", re.I)


def _clamp(value: float) -> float:
    return min(1.0, max(0.0, value))


def _clean(value: str) -> str:
    """A value without markdown emphasis, surrounding whitespace or wrapping quotes."""
    return _MARKUP.sub("", value).strip().strip("\"'“”‘’").strip()


def _is_label_line(line: str) -> bool:
    stripped = _LINE_PREFIX.sub("", line)
    return any(p.match(stripped) for p in (_POSITION_LABEL, _CONFIDENCE_LABEL, _VOTE_LABEL, _REASON_LABEL))


def _labelled_values(text: str, pattern: re.Pattern[str]) -> list[str]:
    """The values of lines labelled by pattern; an empty value takes the next non-empty, unlabelled line."""
    lines = text.splitlines()
    values = []
    for index, line in enumerate(lines):
        match = pattern.match(_LINE_PREFIX.sub("", line))
        if not match:
            continue
        value = _clean(match.group(1))
        if not value:
            following = next((raw for raw in lines[index + 1 :] if raw.strip()), "")
            value = "" if _is_label_line(following) else _clean(following)
        values.append(value)
    return values


def _labelled(text: str, pattern: re.Pattern[str]) -> str | None:
    """The value of the last line labelled by pattern, or None when there is none."""
    values = _labelled_values(text, pattern)
    return values[-1] if values else None


def parse_confidence(value: str) -> float | None:
    """A confidence in [0, 1] from 0.8, 80%, "80 %", 8/10, "8 out of 10" or high/medium/low; else None."""
    text = _clean(value).casefold()
    match = _NUMBER.match(text)
    if match:
        number = float(match.group("num"))
        if match.group("den") is not None:
            denominator = float(match.group("den"))
            if denominator <= 0:
                return None
            number /= denominator
        elif match.group("pct") or number > 1:
            number /= 100
        return 0.0 if match.group("sign") else _clamp(number)
    words = re.sub(r"[^a-z ]+", " ", text).split()
    for size in (2, 1):
        phrase = " ".join(words[:size])
        if phrase in CONFIDENCE_WORDS:
            return CONFIDENCE_WORDS[phrase]
    return None


def _confidence_in(text: str) -> float | None:
    """The confidence of the last readable CONFIDENCE line, else of the last inline "confidence: x"."""
    labelled = [c for c in map(parse_confidence, _labelled_values(text, _CONFIDENCE_LABEL)) if c is not None]
    if labelled:
        return labelled[-1]
    inline = [
        c
        for line in text.splitlines()
        for match in _CONFIDENCE_ANYWHERE.finditer(line)
        if (c := parse_confidence(match.group(1))) is not None
    ]
    return inline[-1] if inline else None


def parse_reply(agent_id: str, text: str) -> Proposal | None:
    """The agent's proposal (full text, final position, confidence), or None for an abstention."""
    raw = _labelled(text, _POSITION_LABEL)
    if raw is None:
        return None
    position = _INLINE_CONFIDENCE.sub("", raw).strip()[:MAX_POSITION_CHARS].strip()
    if " ".join(position.casefold().rstrip(".!").split()) in NON_ANSWERS or not normalize_answer(position):
        return None
    return Proposal(agent_id=agent_id, text=text, position=position, confidence=_confidence_in(text))


def _labels_in(value: str) -> list[str]:
    """The leading list of labels of a vote value ("B", "A and B", "Proposal (c)"), upper-cased."""
    found: list[str] = []
    match = _VOTE_ITEM.match(value)
    while match:
        found.append(match.group(1).upper())
        separator = _VOTE_LIST_SEPARATOR.match(value, match.end())
        if not separator:
            break
        match = _VOTE_ITEM.match(value, separator.end())
    return found


def _choice(value: str | None, labels: Iterable[str]) -> tuple[str | None, str]:
    """The chosen label, or None and why the vote is unusable."""
    if value is None:
        return None, "no vote line"
    by_upper = {label.upper(): label for label in labels}
    found = set(_labels_in(_clean(value)))
    if not found:
        return None, "no label"
    if len(found) > 1:
        return None, "several labels"
    (label,) = found
    if label not in by_upper:
        return None, f"unknown label {label}"
    return by_upper[label], ""


def parse_ballot(voter: str, text: str, labels: Sequence[str]) -> Ballot:
    """The agent's ballot; anything unusable becomes an abstention (choice None) with the reason why."""
    vote = _labelled(text, _VOTE_LABEL)
    if vote is None:
        whole = _clean(text)
        items = _VOTE_ITEM.match(whole)
        if items and items.end() == len(whole):
            vote = whole
    return make_ballot(
        voter, *_choice(vote, labels), _confidence_in(text), _labelled(text, _REASON_LABEL) or ""
    )


def make_ballot(voter: str, choice: str | None, why: str, confidence: float | None, reason: str) -> Ballot:
    """A ballot from its parsed parts: the reason bounded and prefixed with why a vote was void."""
    reason = reason[:MAX_REASON_CHARS]
    if why:
        reason = f"[{why}] {reason}".strip()
    return Ballot(
        voter=voter,
        choice=choice,
        confidence=DEFAULT_BALLOT_CONFIDENCE if confidence is None else confidence,
        reason=reason,
    )
