"""Agent profiles: who sits on a panel, with which provider, model, temperature and personality."""

from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings

PERSONALITIES: dict[str, str] = {
    "analytical": (
        "You are an analytical panelist. Reason step by step from evidence and first principles, "
        "quantify where you can, and state your assumptions."
    ),
    "creative": (
        "You are a creative panelist. Look for unconventional angles and options others may miss, "
        "but stay grounded in facts."
    ),
    "critical": (
        "You are a critical panelist. Probe weaknesses, counter-examples and risks in every claim, "
        "including your own, before settling on a position."
    ),
    "practical": (
        "You are a practical panelist. Favour what works in the real world: cost, feasibility, "
        "trade-offs and concrete next steps."
    ),
    "balanced": (
        "You are a balanced panelist. Weigh the main considerations fairly and give a clear, "
        "well-supported answer."
    ),
}
DEFAULT_ROTATION = ("analytical", "creative", "critical", "practical", "balanced")

PANEL_PREAMBLE = (
    "You are one member of a panel of AI agents that discuss a question over several turns and then vote. "
    "Be concise (at most about 200 words) and always give your final position and confidence as asked."
)


@dataclass(frozen=True)
class AgentProfile:
    agent_id: str
    provider: str
    model: str
    temperature: float
    personality: str
    instruction: str
    fallback_models: tuple[str, ...] = ()

    @property
    def system_instruction(self) -> str:
        return f"{PANEL_PREAMBLE}\n\n{self.instruction}"

    def describe(self) -> dict[str, object]:
        return {
            "agent_id": self.agent_id,
            "provider": self.provider,
            "model": self.model,
            "temperature": self.temperature,
            "personality": self.personality,
        }


def persona_instruction(value: str) -> tuple[str, str]:
    """A built-in personality name, or free text used as the instruction itself."""
    key = value.strip().lower()
    if key in PERSONALITIES:
        return key, PERSONALITIES[key]
    return "custom", value.strip()


def build_panel(num_agents: int | None = None) -> list[AgentProfile]:
    """The first `num_agents` agents: configured ones first, then defaults from GEMINI_*."""
    config = settings.CONFIG
    count = num_agents if num_agents is not None else config.NUM_AGENTS
    if not 1 <= count <= config.MAX_AGENTS:
        raise ValueError(f"num_agents must be between 1 and {config.MAX_AGENTS}")
    default_provider = config.provider_default
    panel: list[AgentProfile] = []
    for spec in config.AGENT_MODELS_CONFIG[:count]:
        name, instruction = persona_instruction(spec.personality)
        panel.append(
            AgentProfile(
                agent_id=spec.agent_id,
                provider=spec.provider or default_provider,
                model=spec.model,
                temperature=spec.temperature,  # 0.0 stays 0.0: no `or` defaulting here
                personality=name,
                instruction=instruction,
                fallback_models=tuple(spec.fallback_models),
            )
        )
    taken = {profile.agent_id for profile in panel}
    index = 0
    while len(panel) < count:
        agent_id = f"agent_{index}"
        if agent_id not in taken:
            name = DEFAULT_ROTATION[len(panel) % len(DEFAULT_ROTATION)]
            panel.append(
                AgentProfile(
                    agent_id=agent_id,
                    provider=default_provider,
                    model=config.GEMINI_MODEL
                    if default_provider != "openai"
                    else (config.OPENAI_MODEL or ""),
                    temperature=config.GEMINI_TEMPERATURE,
                    personality=name,
                    instruction=PERSONALITIES[name],
                )
            )
        index += 1
    return panel
