"""Named panels: which exist (PANELS, the admin's Panel rows, and `default`), which a caller may
use, and the agents a run of one starts with.

Public: `resolve_panel` (a panel id for a principal), `list_panels` (the panels a principal may
use), `PanelConfig.run_agents` (the agents of one run, as stored on its conversation) and
`panel_profiles` (those stored agents as profiles, for the run).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connection

from agents.profiles import AgentProfile, build_panel, persona_instruction
from gateway.principal import Principal
from panels.models import Panel
from panels.specs import PanelSpec

DEFAULT_PANEL = "default"
# The admin's panels are read at most once a second per process (an edit shows within that):
# a burst of requests shares one read instead of a thread hop and a query each.
ADMIN_PANELS_SHARED_SECONDS = 1.0
# The `created` time of panels that have no row (PANELS, `default`): when this process started.
STARTED_AT = int(time.time())


class PanelNotFound(LookupError):
    """No such panel, or the caller may not use it (the two look the same)."""


@dataclass(frozen=True)
class PanelConfig:
    """A resolved panel: who sits on it and how it runs."""

    id: str
    description: str
    agents: tuple[AgentProfile, ...]
    turns: int
    strategy: str
    synthesis: str | None  # None: SYNTHESIS_MODE
    created: int  # Unix seconds
    source: str  # "settings" (PANELS or `default`) or "admin"
    key_names: frozenset[str] = frozenset()
    key_ids: frozenset[int] = frozenset()

    def allows(self, principal: Principal) -> bool:
        """Admins use every panel; a panel without keys is open to every caller."""
        if principal.is_admin or not (self.key_names or self.key_ids):
            return True
        if principal.kind != "api_key":
            return False
        return principal.name in self.key_names or principal.api_key_id in self.key_ids

    def run_agents(
        self, *, num_agents: int | None = None, temperature: float | None = None, instructions: str = ""
    ) -> list[dict[str, Any]]:
        """The agents of one run, JSON-ready (what `panel_profiles` reads back): the first
        `num_agents` seats, every temperature replaced by `temperature`, `instructions`
        added to every agent's. Raises ValueError when the panel has fewer seats."""
        count = len(self.agents) if num_agents is None else num_agents
        if not 1 <= count <= len(self.agents):
            raise ValueError(f"panel {self.id!r} has {len(self.agents)} agents")
        chosen = []
        for profile in self.agents[:count]:
            if temperature is not None:
                profile = dataclasses.replace(profile, temperature=temperature)
            if instructions:
                profile = dataclasses.replace(profile, instruction=f"{profile.instruction}\n\n{instructions}")
            chosen.append({**dataclasses.asdict(profile), "fallback_models": list(profile.fallback_models)})
        return chosen


def panel_profiles(stored: Sequence[Mapping[str, Any]] | None) -> list[AgentProfile] | None:
    """The agents `run_agents` stored on a conversation, as profiles; None when none were."""
    if not stored:
        return None
    return [
        AgentProfile(**{**agent, "fallback_models": tuple(agent.get("fallback_models") or ())})
        for agent in stored
    ]


def _from_spec(
    panel_id: str, spec: PanelSpec, *, created: int, source: str, key_ids: frozenset[int] = frozenset()
) -> PanelConfig:
    config = settings.CONFIG
    agents = []
    for index, seat in enumerate(spec.agents):
        personality, instruction = persona_instruction(seat.persona)
        agents.append(
            AgentProfile(
                agent_id=seat.agent_id or f"agent_{index}",
                provider=seat.provider or config.provider_default,
                model=seat.model,
                temperature=seat.temperature,
                personality=personality,
                instruction=instruction,
                fallback_models=tuple(seat.fallback_models),
            )
        )
    return PanelConfig(
        id=panel_id,
        description=spec.description,
        agents=tuple(agents),
        turns=spec.turns or config.DEFAULT_TURNS,
        strategy=spec.strategy,
        synthesis=spec.synthesis,
        created=created,
        source=source,
        key_names=frozenset(spec.keys),
        key_ids=key_ids,
    )


def _default_panel() -> PanelConfig:
    config = settings.CONFIG
    return PanelConfig(
        id=DEFAULT_PANEL,
        description="The configured panel (NUM_AGENTS, AGENT_MODELS_CONFIG).",
        agents=tuple(build_panel(config.NUM_AGENTS)),
        turns=config.DEFAULT_TURNS,
        strategy="majority",
        synthesis=None,
        created=STARTED_AT,
        source="settings",
    )


def _admin_panels() -> list[PanelConfig]:
    """The enabled Panel rows (a row whose agents no longer validate is left out)."""
    panels = []
    rows = Panel.objects.filter(enabled=True).prefetch_related("api_keys")
    for row in rows:
        try:
            spec = row.spec()
        except ValueError:
            continue
        keys = frozenset(key.pk for key in row.api_keys.all())
        created = int(row.created_at.timestamp())
        panels.append(_from_spec(row.name, spec, created=created, source="admin", key_ids=keys))
    return panels


def _admin_panels_released() -> list[PanelConfig]:
    """`_admin_panels` in a pool thread whose connection goes back to the pool at once: a
    request that waits a whole conversation must not hold one."""
    try:
        return _admin_panels()
    finally:
        if settings.USING_POSTGRES:
            connection.close()


_admin_read: tuple[float, asyncio.Future[list[PanelConfig]]] | None = None


async def _shared_admin_panels() -> list[PanelConfig]:
    """`_admin_panels`, read at most once per ADMIN_PANELS_SHARED_SECONDS on this event loop."""
    global _admin_read
    now = time.monotonic()
    shared = _admin_read
    stale = (
        shared is None
        or now - shared[0] >= ADMIN_PANELS_SHARED_SECONDS
        or shared[1].get_loop() is not asyncio.get_running_loop()
        or (shared[1].done() and shared[1].exception() is not None)
    )
    if shared is None or stale:
        fetch = sync_to_async(_admin_panels_released, thread_sensitive=not settings.USING_POSTGRES)
        shared = (now, asyncio.ensure_future(fetch()))
        _admin_read = shared
    # Shielded: a caller that goes away must not cancel the others' read.
    return await asyncio.shield(shared[1])


async def _all_panels() -> dict[str, PanelConfig]:
    """Every panel by id: `default`, then PANELS, then the admin's rows (a later one replaces
    an earlier one of the same id)."""
    panels = {DEFAULT_PANEL: _default_panel()}
    for panel_id, spec in settings.CONFIG.PANELS.items():
        panels[panel_id] = _from_spec(panel_id, spec, created=STARTED_AT, source="settings")
    for panel in await _shared_admin_panels():
        panels[panel.id] = panel
    return panels


async def list_panels(*, principal: Principal) -> list[PanelConfig]:
    """The panels `principal` may use, by id."""
    panels = await _all_panels()
    return [panels[name] for name in sorted(panels) if panels[name].allows(principal)]


async def resolve_panel(*, principal: Principal, panel_id: str) -> PanelConfig:
    """The panel `panel_id`, if `principal` may use it; PanelNotFound otherwise."""
    panel = (await _all_panels()).get(panel_id)
    if panel is None or not panel.allows(principal):
        raise PanelNotFound(f"The panel {panel_id!r} does not exist or you do not have access to it.")
    return panel


async def start_options(
    *,
    principal: Principal,
    panel_id: str,
    num_agents: int | None = None,
    turns: int | None = None,
    strategy: str | None = None,
    synthesis: str | None = None,
    temperature: float | None = None,
    instructions: str = "",
) -> dict[str, Any]:
    """The keyword arguments of `conversations.services.conversation_start` for a run of the
    panel `panel_id`; what the request gives (turns, strategy, synthesis) wins over the
    panel's. PanelNotFound; ValueError when `num_agents` exceeds the panel's seats."""
    panel = await resolve_panel(principal=principal, panel_id=panel_id)
    return {
        "agents": panel.run_agents(num_agents=num_agents, temperature=temperature, instructions=instructions),
        "turns": turns or panel.turns,
        "strategy": strategy or panel.strategy,
        "synthesis": synthesis or panel.synthesis,
        "tags": {"panel": panel.id},
    }
