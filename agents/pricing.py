"""Estimated cost of LLM calls from the price table (USD per million tokens).

The table is the configuration's `price_table`: built-in prices of the Gemini models we
name, with `MODEL_PRICES` laid over them. A model is priced by its exact name, else by
the longest table name it extends with a dash (`gemini-2.5-flash-preview-09-2025` costs
what `gemini-2.5-flash` costs). Simulated answers and unknown models cost 0 and are
reported with `cost_estimated: false`: their figure is not an estimate of anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from django.conf import settings

from agents.providers.base import Usage

PER = 1_000_000
DIGITS = 8  # USD figures are rounded to 1e-8 (a millionth of a cent)


class Price(Protocol):
    input: float
    output: float


@dataclass(frozen=True)
class Cost:
    """A sum of call costs; `estimated` only when every call in it was priced."""

    usd: float = 0.0
    priced: int = 0  # calls with a known price
    unpriced: int = 0  # simulated calls and unknown models (counted at 0)

    @property
    def estimated(self) -> bool:
        return self.priced > 0 and self.unpriced == 0

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.usd + other.usd, self.priced + other.priced, self.unpriced + other.unpriced)

    def fields(self) -> dict[str, Any]:
        """`cost_usd` and `cost_estimated`, as responses and events report them."""
        return {"cost_usd": round(self.usd, DIGITS), "cost_estimated": self.estimated}


def price_table() -> Mapping[str, Price]:
    return settings.CONFIG.price_table


def price_for(model: str, table: Mapping[str, Price] | None = None) -> Price | None:
    """The price of `model`: exact name, else the longest table name it extends with "-"."""
    table = price_table() if table is None else table
    name = model.strip().removeprefix("models/")
    if name in table:
        return table[name]
    best = max((k for k in table if name.startswith(k + "-")), key=len, default=None)
    return table[best] if best is not None else None


def usd(price: Price, prompt_tokens: int, completion_tokens: int) -> float:
    """USD for a number of input and output tokens at `price`."""
    return (prompt_tokens * price.input + completion_tokens * price.output) / PER


def call_cost(model: str, usage: Usage, *, provider: str = "", simulated: bool = False) -> Cost:
    """The estimated cost of one call (0 and not estimated for simulated or unknown models)."""
    if simulated or provider == "simulated":
        return Cost(unpriced=1)
    price = price_for(model)
    if price is None:
        return Cost(unpriced=1)
    return Cost(usd(price, usage.prompt_tokens, usage.completion_tokens), priced=1)


def tokens_cost(model: str, prompt_tokens: int, completion_tokens: int, *, provider: str = "") -> float:
    """USD for token counts that have not been spent yet (0 when the model has no price)."""
    if provider == "simulated":
        return 0.0
    price = price_for(model)
    return usd(price, prompt_tokens, completion_tokens) if price is not None else 0.0
