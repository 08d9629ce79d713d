"""Answer normalisation: the key under which equal short answers are counted together.

The rules, applied in this order (deterministic, no locale, no I/O):

1. Unicode NFKC, casefold; markdown emphasis and code marks (``* _ ` ~``) are removed.
   A leading answer phrase is dropped: "The answer is 42", "My answer: 42",
   "Final answer is 42" and "Final: 42" all read "42". A closing aside in brackets after
   the answer is dropped too: "42 (final)" and "Paris (France)" read "42" and "paris"
   (yes/no and option answers keep reading as in rules 2 and 3).
2. Yes/no: a position that is one of ``yes yeah yep yup true correct`` (or starts with
   one followed by punctuation or a spaced dash) becomes ``yes``; likewise
   ``no nope nah false incorrect`` becomes ``no``. "Yes, with caveats" and "No (mostly)"
   count; "No doubt it is X" and "No-one knows" do not (no separator after the word).
3. Options: a lone letter (``B``, ``(b)``, ``B)``, ``b.``) or ``option|choice|proposal``
   followed by a letter or a number ("Option B", "choice 2: solar") becomes ``option b``
   / ``option 2``; whatever follows the option's name is ignored.
4. Number words: a position that is entirely an English number ("forty-two",
   "one hundred and five") becomes its digits.
5. Numbers: thousands separators go ("1,000" -> ``1000``), a decimal is written in its
   shortest form ("42.0" -> ``42``, "0.50" -> ``0.5``), a sign is kept when the number
   stands alone ("-5"). A percentage stays a percentage: "50%" and "50 %" are ``50%``,
   which is NOT ``50`` (a share and a count are different answers; "50%" vs "0.5" is
   left for the agents to agree on).
6. Everything that is not a word, a number or ``+``/``#`` right after a word (C++, C#) is
   a separator: "Solar-power!" and "solar power" are both ``solar power``.
7. Leading articles (``the``, ``a``, ``an``) are dropped when something follows them.

An answer with no word or number left (only punctuation) normalises to ``""``, which
callers treat as "no usable position".
"""

from __future__ import annotations

import re
import unicodedata
from decimal import Decimal, InvalidOperation
from functools import lru_cache

YES_WORDS = frozenset({"yes", "yeah", "yep", "yup", "true", "correct"})
NO_WORDS = frozenset({"no", "nope", "nah", "false", "incorrect"})
ARTICLES = frozenset({"the", "a", "an"})
OPTION_WORDS = ("option", "choice", "proposal")

_MARKUP = re.compile(r"[*_`~]")
_ANSWER_PHRASE = re.compile(
    r"^(?:(?:(?:the|my|our|final|the final)\s+)?answer\s*(?:is\b|:)|final\s*:)\s*(?=\S)"
)
_CLOSING_ASIDE = re.compile(r"(?<=\S)\s+[(\[][^()\[\]]*[)\]][\s.!]*$")
_LEADING_YES_NO = re.compile(r"^\W*([a-z]+)\s*(?:$|[,.;:!?–—()\[\]\"'”’]|\s-\s)")
_LONE_LETTER = re.compile(r"^[\s\"'“‘]*[(\[]?\s*([a-z])\s*[)\]]?[.:!]?[\s\"'”’]*$")
_OPTION = re.compile(r"^\W*(?:option|choice|proposal)\b\s*[(\[]?([a-z]|\d+)\b")
_THOUSANDS = re.compile(r"(?<![\d.,])(\d{1,3}(?:,\d{3})+)(?![\d,]*\d)")
_TOKEN = re.compile(
    r"(?<![\w.])-?(?:\d+(?:\.\d+)?|\.\d+)(?:\s?%)?|\d+(?:\.\d+)?(?:\s?%)?|[^\W\d_]\w*[+#]*|\w+"
)
_NUMERIC = re.compile(r"-?\.?\d")

_UNITS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
    "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13,
    "fourteen": 14, "fifteen": 15, "sixteen": 16, "seventeen": 17, "eighteen": 18,
    "nineteen": 19, "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60,
    "seventy": 70, "eighty": 80, "ninety": 90,
}  # fmt: skip
_SCALES = {"thousand": 1_000, "million": 1_000_000, "billion": 1_000_000_000}


def words_to_number(text: str) -> int | None:
    """The integer an English number phrase names ("forty-two" -> 42), or None if it is not one."""
    words = [w for w in re.split(r"[\s-]+", text.strip()) if w and w != "and"]
    if not words:
        return None
    total, current, seen = 0, 0, False
    for word in words:
        if word in _UNITS:
            current += _UNITS[word]
        elif word == "hundred":
            current = max(current, 1) * 100
        elif word in _SCALES:
            total += max(current, 1) * _SCALES[word]
            current = 0
        else:
            return None
        seen = True
    return total + current if seen else None


def canonical_number(text: str) -> str:
    """The shortest decimal spelling of a numeric token ("42.0" -> "42", "50 %" -> "50%")."""
    percent = text.endswith("%")
    digits = text.rstrip("%").strip()
    try:
        value = Decimal(digits)
    except InvalidOperation:  # pragma: no cover - the token regex only yields valid numbers
        return text
    if value == 0:
        value = Decimal(0)  # "-0" and "0.00" are "0"
    spelled = format(value.normalize(), "f")
    return spelled + ("%" if percent else "")


def _tokens(text: str) -> list[str]:
    text = _THOUSANDS.sub(lambda m: m.group(1).replace(",", ""), text)
    tokens = []
    for token in _TOKEN.findall(text):
        tokens.append(canonical_number(token) if _NUMERIC.match(token) else token)
    return tokens


@lru_cache(maxsize=4096)
def normalize_answer(position: str) -> str:
    """The key under which equal short answers count together (see the module docstring)."""
    text = _MARKUP.sub("", unicodedata.normalize("NFKC", position)).casefold().strip()
    text = _ANSWER_PHRASE.sub("", text)
    text = _CLOSING_ASIDE.sub("", text)
    leading = _LEADING_YES_NO.match(text)
    if leading and (leading.group(1) in YES_WORDS or leading.group(1) in NO_WORDS):
        return "yes" if leading.group(1) in YES_WORDS else "no"
    lone = _LONE_LETTER.match(text)
    if lone:
        return f"option {lone.group(1)}"
    option = _OPTION.match(text)
    if option:
        return f"option {canonical_number(option.group(1)) if option.group(1).isdigit() else option.group(1)}"
    tokens = _tokens(text)
    spoken = None if any(t[:1].isdigit() for t in tokens) else words_to_number(" ".join(tokens))
    if spoken is not None:
        return str(spoken)
    while len(tokens) > 1 and tokens[0] in ARTICLES:
        tokens = tokens[1:]
    return " ".join(tokens)
