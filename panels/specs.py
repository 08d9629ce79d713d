"""The shape of a named panel, as PANELS (settings) and the admin's Panel rows give it.

Plain pydantic, no Django: `polyagents_site.config` validates PANELS with it at start-up, and
the admin validates a Panel row's agents with it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator

PANEL_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$"
STRATEGIES = ("majority", "weighted", "reliability")
Strategy = Literal["majority", "weighted", "reliability"]
Synthesis = Literal["representative", "chairman"]
Provider = Literal["gemini", "openai", "simulated"]


class PanelAgent(BaseModel):
    """One seat of a panel. `persona`: a built-in personality name (analytical, creative,
    critical, practical, balanced) or free text used as the agent's instruction."""

    model_config = {"extra": "forbid"}

    agent_id: str | None = Field(default=None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    provider: Provider | None = None
    model: str = Field(min_length=1, max_length=100)
    temperature: float = Field(default=0.7, ge=0.0, le=2.0)
    persona: str = Field(default="balanced", min_length=1, max_length=2000)
    fallback_models: list[str] = Field(default_factory=list, max_length=5)


class PanelSpec(BaseModel):
    """One entry of PANELS. `keys`: names of the API keys that may use it (empty: every key);
    admins may use every panel. `turns`, `strategy`, `synthesis` absent: DEFAULT_TURNS,
    majority, SYNTHESIS_MODE."""

    model_config = {"extra": "forbid"}

    description: str = Field(default="", max_length=500)
    agents: list[PanelAgent] = Field(min_length=1, max_length=50)
    turns: int | None = Field(default=None, ge=1, le=50)
    strategy: Strategy = "majority"
    synthesis: Synthesis | None = None
    keys: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_agent_ids(self) -> PanelSpec:
        ids = [agent.agent_id for agent in self.agents if agent.agent_id]
        if len(ids) != len(set(ids)):
            raise ValueError("agent_id values must be unique within a panel")
        return self
