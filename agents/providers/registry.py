"""Provider instances by name, configured once from `settings.CONFIG`.

A vendor's provider module is imported when that provider is first built: importing
its SDK (google-genai, openai) takes a noticeable part of a second, which a process
whose panel does not use the vendor should not pay.
"""

from __future__ import annotations

from django.conf import settings

from agents.providers.base import Provider, ProviderError
from agents.providers.simulated import QuizConfig, SimulatedProvider

PROVIDER_NAMES = ("gemini", "openai", "simulated")

_providers: dict[str, Provider] = {}


def _build(name: str) -> Provider:
    config = settings.CONFIG
    if name == "simulated":
        quiz = QuizConfig.from_dict(config.SIMULATED_QUIZ.model_dump()) if config.SIMULATED_QUIZ else None
        return SimulatedProvider(
            latency=config.SIMULATED_LATENCY, failure_rate=config.SIMULATED_FAILURE_RATE, quiz=quiz
        )
    if name == "gemini":
        if not config.GEMINI_API_KEY:
            raise ProviderError("GEMINI_API_KEY is not set", kind="auth", provider="gemini")
        from agents.providers.gemini import GeminiProvider

        return GeminiProvider(
            api_key=config.GEMINI_API_KEY, base_url=config.GEMINI_BASE_URL, timeout=config.AGENT_CALL_TIMEOUT
        )
    if name == "openai":
        if not config.OPENAI_BASE_URL:
            raise ProviderError("OPENAI_BASE_URL is not set", kind="auth", provider="openai")
        from agents.providers.openai_compat import OpenAICompatProvider

        return OpenAICompatProvider(
            base_url=config.OPENAI_BASE_URL, api_key=config.OPENAI_API_KEY, timeout=config.AGENT_CALL_TIMEOUT
        )
    raise ProviderError(f"unknown provider {name!r}", kind="bad_request", provider=name)


def get_provider(name: str) -> Provider:
    """The shared instance of the named provider; ProviderError if it is not configured."""
    provider = _providers.get(name)
    if provider is None:
        provider = _providers[name] = _build(name)
        if not settings.CONFIG.STRUCTURED_OUTPUT:
            provider.supports_structured = False  # every reply in the text format
    return provider


def register_provider(name: str, provider: Provider) -> None:
    """Use this instance for the named provider (benchmarks and evaluations configure a quiz simulator)."""
    _providers[name] = provider


def reset_providers() -> None:
    """Forget every cached instance (tests change the configuration between cases)."""
    _providers.clear()


async def aclose_providers() -> None:
    """Close the cached providers' network clients of the running loop (a command's loop ends)."""
    for provider in list(_providers.values()):
        await provider.aclose()
