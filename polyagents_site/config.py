"""Typed, validated configuration read once from the environment and an optional `.env`.

Every variable of the product brief lives here. A bad value stops start-up with one
line naming the variable (see `load_config`).
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict, SettingsError

from panels.specs import PANEL_ID_PATTERN, PanelSpec

PERMISSIONS = ("read", "write", "admin")

# Values shipped in env.example. Outside DEBUG the service refuses to start with them.
SAMPLE_JWT_SECRETS = frozenset({"your_very_secure_secret_key_here", "change-me"})
SAMPLE_API_KEYS = frozenset({"pk_admin_1234567890abcdef", "pk_user_1234567890abcdef"})
SAMPLE_SECRET_KEYS = frozenset({"your_django_secret_key_here", "change-me"})


class ApiKeySpec(BaseModel):
    """One entry of DEFAULT_API_KEYS."""

    model_config = {"extra": "forbid"}

    name: str = Field(min_length=1, max_length=100)
    key: str = Field(min_length=16, max_length=200)
    permissions: list[Literal["read", "write", "admin"]] = Field(min_length=1)
    rate_limit_override: int | None = Field(default=None, gt=0)
    daily_quota: float | None = Field(default=None, gt=0, le=1e12)
    daily_quota_unit: Literal["tokens", "usd"] = "tokens"
    # The key's default webhook (its /stream runs report there) and its signing secret.
    webhook_url: str | None = Field(default=None, max_length=2000, pattern=r"^https?://[^\s/?#]+")
    webhook_secret: str | None = Field(default=None, pattern=r"^whsec_[A-Za-z0-9+/]{32,}={0,2}$")


# USD per million tokens (standard tier, text, prompts up to 200k tokens), Google's list
# prices at the time of writing. MODEL_PRICES adds models or replaces any of these.
DEFAULT_MODEL_PRICES: dict[str, tuple[float, float]] = {
    "gemini-2.5-pro": (1.25, 10.00),
    "gemini-2.5-flash": (0.30, 2.50),
    "gemini-2.5-flash-lite": (0.10, 0.40),
    "gemini-2.0-flash": (0.10, 0.40),
    "gemini-2.0-flash-lite": (0.075, 0.30),
}


class ModelPrice(BaseModel):
    """One entry of MODEL_PRICES: USD per million input (prompt) and output (completion) tokens."""

    model_config = {"extra": "forbid", "frozen": True}

    input: float = Field(ge=0, le=100_000)
    output: float = Field(ge=0, le=100_000)


# The built-in prices as ModelPrice entries, built once (every provider call reads the table).
DEFAULT_PRICE_TABLE: dict[str, ModelPrice] = {
    name: ModelPrice(input=i, output=o) for name, (i, o) in DEFAULT_MODEL_PRICES.items()
}


class AgentSpec(BaseModel):
    """One entry of AGENT_MODELS_CONFIG."""

    model_config = {"extra": "forbid"}

    agent_id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    model: str = Field(min_length=1, max_length=100)
    temperature: float = Field(ge=0.0, le=2.0)
    personality: str = Field(default="balanced", min_length=1, max_length=2000)
    provider: Literal["gemini", "openai", "simulated"] | None = None
    fallback_models: list[str] = Field(default_factory=list)


class QuizSpec(BaseModel):
    """SIMULATED_QUIZ: the simulator's quiz mode (agents.providers.simulated.QuizConfig)."""

    model_config = {"extra": "forbid"}

    accuracy: float = Field(default=0.7, ge=0.0, le=1.0)
    skills: dict[str, float] = Field(default_factory=dict)
    wrong_values: int = Field(default=3, ge=1, le=100)
    shared: float = Field(default=0.0, ge=0.0, le=1.0)
    paraphrase: bool = True
    ignore_format: float = Field(default=0.0, ge=0.0, le=1.0)
    herding: float = Field(default=0.85, ge=0.0, le=1.0)


def _split_list(value: object) -> object:
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return []
        if text.startswith("["):
            return json.loads(text)
        return [item.strip() for item in text.split(",") if item.strip()]
    return value


class Config(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", env_ignore_empty=True
    )

    # API
    API_HOST: str = "0.0.0.0"  # noqa: S104 - a server listens on all interfaces by default
    API_PORT: int = Field(default=8000, ge=1, le=65535)
    DEBUG: bool = False
    LOG_LEVEL: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    SECRET_KEY: str | None = Field(default=None, min_length=16)
    ALLOWED_HOSTS: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["*"])

    # Agents
    NUM_AGENTS: int = Field(default=3, ge=1, le=10)
    # One turn: a second one never changed the vote on simulated panels (docs/quality.md, "Herding").
    DEFAULT_TURNS: int = Field(default=1, ge=1, le=10)
    MAX_AGENTS: int = Field(default=10, ge=1, le=50)
    MAX_TURNS: int = Field(default=10, ge=1, le=50)
    AGENT_MODELS_CONFIG: list[AgentSpec] = Field(default_factory=list)
    AGENT_CALL_TIMEOUT: float = Field(default=60.0, gt=0)
    CONVERSATION_DEADLINE: float = Field(default=300.0, gt=0)
    MAX_OUTPUT_TOKENS: int = Field(default=1024, ge=16, le=65536)
    LLM_PROVIDER: Literal["gemini", "openai", "simulated"] | None = None
    MODEL_PRICES: dict[str, ModelPrice] = Field(default_factory=dict)
    # Named panels (id -> panels.specs.PanelSpec); `default` comes from NUM_AGENTS and
    # AGENT_MODELS_CONFIG unless PANELS defines it.
    PANELS: dict[str, PanelSpec] = Field(default_factory=dict)

    # Gemini
    GEMINI_API_KEY: str | None = None
    GEMINI_MODEL: str = "gemini-2.5-flash"
    GEMINI_TEMPERATURE: float = Field(default=0.7, ge=0.0, le=2.0)
    GEMINI_BASE_URL: str | None = None

    # OpenAI-compatible provider
    OPENAI_BASE_URL: str | None = None
    OPENAI_API_KEY: str | None = None
    OPENAI_MODEL: str | None = None

    # Replies and the final answer
    STRUCTURED_OUTPUT: bool = True
    SYNTHESIS_MODE: Literal["representative", "chairman"] = "representative"
    SYNTHESIS_PROVIDER: Literal["gemini", "openai", "simulated"] | None = None
    SYNTHESIS_MODEL: str | None = None

    # Simulated provider
    SIMULATED_LATENCY: float = Field(default=0.05, ge=0.0, le=60.0)
    SIMULATED_FAILURE_RATE: float = Field(default=0.0, ge=0.0, le=1.0)
    SIMULATED_QUIZ: QuizSpec | None = None

    # Security
    JWT_SECRET_KEY: str | None = Field(default=None, min_length=16)
    JWT_ACCESS_TTL: int = Field(default=900, gt=0)
    JWT_REFRESH_TTL: int = Field(default=86400, gt=0)
    API_KEY_ENABLED: bool = True
    DEFAULT_API_KEYS: list[ApiKeySpec] = Field(default_factory=list)
    API_KEY_ROTATION_GRACE: int = Field(default=86400, ge=0)
    RATE_LIMITING_ENABLED: bool = True
    RATE_LIMIT_REQUESTS: int = Field(default=100, gt=0)
    RATE_LIMIT_WINDOW: int = Field(default=3600, gt=0)
    RATE_LIMIT_BURST: int = Field(default=10, gt=0)
    TOKEN_RATE_LIMIT_REQUESTS: int = Field(default=20, gt=0)
    TOKEN_RATE_LIMIT_WINDOW: int = Field(default=60, gt=0)
    IP_BLOCK_THRESHOLD: int = Field(default=10, gt=0)
    IP_BLOCK_WINDOW: int = Field(default=300, gt=0)
    IP_BLOCK_DURATION: int = Field(default=3600, gt=0)
    TRUST_X_FORWARDED_FOR: bool = False
    CORS_ALLOWED_ORIGINS: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # Resilience
    RETRY_MAX_ATTEMPTS: int = Field(default=3, ge=1, le=20)
    RETRY_BASE_DELAY: float = Field(default=1.0, ge=0.0)
    RETRY_MAX_DELAY: float = Field(default=60.0, ge=0.0)
    CIRCUIT_BREAKER_FAILURE_THRESHOLD: int = Field(default=5, ge=1)
    CIRCUIT_BREAKER_TIMEOUT: float = Field(default=60.0, gt=0)

    # MCP (/mcp): how long consult_panel waits for its run before returning the id to follow
    MCP_WAIT_SECONDS: float = Field(default=120.0, gt=0, le=3600)

    # Webhooks of /stream runs (webhooks/)
    WEBHOOK_ALLOW_PRIVATE: bool = False  # also private and loopback addresses (link-local: never)
    WEBHOOK_ALLOWED_HOSTS: Annotated[list[str], NoDecode] = Field(default_factory=list)  # http allowed
    WEBHOOK_TIMEOUT: float = Field(default=15.0, gt=0, le=60)
    WEBHOOK_MAX_ATTEMPTS: int = Field(default=10, ge=8, le=50)
    WEBHOOK_RETRY_WAIT: float = Field(default=5.0, gt=0, le=3600)  # the first retry's wait, x4 each time
    WEBHOOK_RETRY_MAX_WAIT: float = Field(default=36000.0, gt=0, le=86400)
    WEBHOOK_SECRET_ROTATION_GRACE: int = Field(default=86400, ge=0)

    # Health
    HEALTH_CHECK_TIMEOUT: float = Field(default=5.0, gt=0)
    HEALTH_CHECK_EXTERNAL_SERVICES: bool = True
    HEALTH_CHECK_PUBLIC: bool = False

    # Infrastructure
    DATABASE_URL: str | None = None
    DATABASE_POOL_MAX: int = Field(default=20, ge=1)
    REDIS_URL: str | None = None
    REDIS_KEY_PREFIX: str = "polyagents"
    QDRANT_URL: str | None = None
    QDRANT_LOCAL_PATH: str | None = None
    STREAM_MAXLEN: int = Field(default=10000, ge=100)
    STREAM_TTL: int = Field(default=7 * 86400, gt=0)
    RETENTION_DAYS: int = Field(default=30, ge=1)
    WORKER_CONCURRENCY: int = Field(default=50, ge=1, le=200)
    CONVERSATION_STALE_SECONDS: int = Field(default=15, ge=10)
    # Warm a web process up when the ASGI application loads (polyagents_site/warmup.py).
    WARM_UP: bool = True

    _split = field_validator("ALLOWED_HOSTS", "CORS_ALLOWED_ORIGINS", "WEBHOOK_ALLOWED_HOSTS", mode="before")(
        classmethod(lambda cls, v: _split_list(v))
    )

    @field_validator("CORS_ALLOWED_ORIGINS")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        for origin in value:
            if not origin.startswith(("http://", "https://")) or origin.endswith("/"):
                raise ValueError(f"{origin!r} is not an origin like https://example.com")
        return value

    @field_validator("WEBHOOK_ALLOWED_HOSTS")
    @classmethod
    def _webhook_hosts(cls, value: list[str]) -> list[str]:
        hosts = [host.strip().lower().rstrip(".") for host in value]
        for host in hosts:
            if not host or "/" in host or ":" in host:
                raise ValueError(f"{host!r} is not a host name (no scheme, port or path)")
        return hosts

    @field_validator("MODEL_PRICES")
    @classmethod
    def _model_prices(cls, value: dict[str, ModelPrice]) -> dict[str, ModelPrice]:
        for name in value:
            if not name.strip() or len(name) > 100:
                raise ValueError(f"{name[:40]!r} is not a model name (1..100 characters)")
        return value

    @field_validator("PANELS")
    @classmethod
    def _panels(cls, value: dict[str, PanelSpec]) -> dict[str, PanelSpec]:
        for name in value:
            if not re.fullmatch(PANEL_ID_PATTERN, name):
                raise ValueError(f"{name[:40]!r} is not a panel id (letters, digits, _ . : -; 1..64)")
        return value

    @field_validator("DATABASE_URL")
    @classmethod
    def _database_url(cls, value: str | None) -> str | None:
        if value and not value.startswith(("postgres://", "postgresql://", "sqlite://")):
            raise ValueError("must start with postgres://, postgresql:// or sqlite://")
        return value

    @field_validator("REDIS_URL")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        if self.WEBHOOK_RETRY_MAX_WAIT < self.WEBHOOK_RETRY_WAIT:
            raise ValueError("WEBHOOK_RETRY_MAX_WAIT: must be at least WEBHOOK_RETRY_WAIT")
        if self.RETRY_MAX_DELAY < self.RETRY_BASE_DELAY:
            raise ValueError("RETRY_MAX_DELAY: must be at least RETRY_BASE_DELAY")
        if self.NUM_AGENTS > self.MAX_AGENTS:
            raise ValueError("NUM_AGENTS: must not exceed MAX_AGENTS")
        if self.DEFAULT_TURNS > self.MAX_TURNS:
            raise ValueError("DEFAULT_TURNS: must not exceed MAX_TURNS")
        ids = [agent.agent_id for agent in self.AGENT_MODELS_CONFIG]
        if len(ids) != len(set(ids)):
            raise ValueError("AGENT_MODELS_CONFIG: agent_id values must be unique")
        for name, panel in self.PANELS.items():
            if len(panel.agents) > self.MAX_AGENTS:
                raise ValueError(f"PANELS: panel {name!r} has more agents than MAX_AGENTS")
            if panel.turns is not None and panel.turns > self.MAX_TURNS:
                raise ValueError(f"PANELS: panel {name!r} has more turns than MAX_TURNS")
        names = [key.name for key in self.DEFAULT_API_KEYS]
        if len(names) != len(set(names)):
            raise ValueError("DEFAULT_API_KEYS: names must be unique")
        if not self.DEBUG:
            if self.JWT_SECRET_KEY in SAMPLE_JWT_SECRETS:
                raise ValueError("JWT_SECRET_KEY: the sample value from env.example is refused outside DEBUG")
            if self.SECRET_KEY in SAMPLE_SECRET_KEYS:
                raise ValueError("SECRET_KEY: the sample value from env.example is refused outside DEBUG")
            if any(spec.key in SAMPLE_API_KEYS for spec in self.DEFAULT_API_KEYS):
                raise ValueError(
                    "DEFAULT_API_KEYS: the sample keys from env.example are refused outside DEBUG"
                )
        return self

    @property
    def price_table(self) -> dict[str, ModelPrice]:
        """The built-in prices with MODEL_PRICES laid over them (model name -> price)."""
        return {**DEFAULT_PRICE_TABLE, **self.MODEL_PRICES}

    @property
    def provider_default(self) -> str:
        """The provider used when an agent names none."""
        if self.LLM_PROVIDER:
            return self.LLM_PROVIDER
        return "gemini" if self.GEMINI_API_KEY else "simulated"


class ConfigError(SystemExit):
    """Raised with a one-line message naming the offending variable."""


def format_errors(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ())]
        msg = err.get("msg", "invalid value").removeprefix("Value error, ")
        if not loc and ":" in msg:
            parts.append(msg)  # model-level check that names its variable itself
        else:
            parts.append(f"{'.'.join(loc) or 'configuration'}: {msg}")
    return "; ".join(parts)


def load_config(**overrides: object) -> Config:
    """Read and validate the configuration, or exit with one clear line."""
    try:
        return Config(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        # SystemExit with a message prints that one line and exits with status 1.
        raise ConfigError(f"PolyAgents configuration error: {format_errors(exc)}") from None
    except SettingsError as exc:
        # Malformed JSON in a complex variable (DEFAULT_API_KEYS, AGENT_MODELS_CONFIG) lands here.
        match = re.search(r'field "([^"]+)"', str(exc))
        name = match.group(1) if match else "configuration"
        cause = f" ({exc.__cause__})" if exc.__cause__ else ""
        raise ConfigError(f"PolyAgents configuration error: {name}: not valid JSON{cause}") from None
