"""Panels defined in the admin, beside those of PANELS (settings)."""

from __future__ import annotations

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import RegexValidator
from django.db import models
from django.utils import timezone
from pydantic import ValidationError as SpecError

from panels.specs import PANEL_ID_PATTERN, STRATEGIES, PanelSpec


class Panel(models.Model):
    """A named panel: its agents, turns, strategy and synthesis, and the keys that may use it.

    `agents` is a JSON list of {agent_id?, provider?, model, temperature, persona,
    fallback_models?} (panels.specs.PanelAgent). No keys: every key may use it. A row named
    like a PANELS entry (or `default`) replaces it.
    """

    name = models.CharField(
        max_length=64,
        unique=True,
        validators=[RegexValidator(PANEL_ID_PATTERN, "Letters, digits and _ . : - (1..64).")],
        help_text="The panel id clients ask for (the OpenAI `model`).",
    )
    description = models.CharField(max_length=500, blank=True)
    agents = models.JSONField(default=list)
    turns = models.PositiveSmallIntegerField(null=True, blank=True, help_text="Empty: DEFAULT_TURNS.")
    strategy = models.CharField(max_length=16, choices=[(s, s) for s in STRATEGIES], default="majority")
    synthesis = models.CharField(
        max_length=16,
        blank=True,
        choices=[("representative", "representative"), ("chairman", "chairman")],
        help_text="Empty: SYNTHESIS_MODE.",
    )
    api_keys = models.ManyToManyField(
        "gateway.ApiKey", blank=True, related_name="panels", help_text="Empty: every key may use it."
    )
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def spec(self) -> PanelSpec:
        """The row as a PanelSpec (keys aside: the admin's are rows, not names)."""
        return PanelSpec.model_validate(
            {
                "description": self.description,
                "agents": self.agents,
                "turns": self.turns,
                "strategy": self.strategy,
                "synthesis": self.synthesis or None,
            }
        )

    def clean(self) -> None:
        try:
            self.spec()
        except SpecError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
            )
            raise ValidationError({"agents": problems}) from None
        config = settings.CONFIG
        if len(self.agents) > config.MAX_AGENTS:
            raise ValidationError({"agents": f"At most MAX_AGENTS ({config.MAX_AGENTS}) agents."})
        if self.turns is not None and not 1 <= self.turns <= config.MAX_TURNS:
            raise ValidationError({"turns": f"Between 1 and MAX_TURNS ({config.MAX_TURNS})."})
