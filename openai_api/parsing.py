"""The body of POST /v1/chat/completions, validated the way OpenAI's API validates it.

Every parameter is either used, accepted where its value changes nothing (`n: 1`,
`logprobs: false`, `response_format: {"type": "text"}`, `stream_options`, which without
`stream: true` has nothing to act on), or refused with
a 400 that names it: nothing is silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from conversations.serializers import MAX_MESSAGE_CHARS
from gateway.validation import control_characters

# Everything the messages may carry in all (the question, its context and system messages).
MAX_CONTEXT_CHARS = 32_000
MAX_MESSAGES = 100
USED = frozenset(
    {
        "model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens",
        "temperature", "user", "n", "logprobs", "response_format",
    }
)  # fmt: skip
REFUSED = {
    "tools": "tools are not supported: a panel answers in text",
    "tool_choice": "tool_choice is not supported: a panel answers in text",
    "functions": "functions are not supported: a panel answers in text",
    "function_call": "function_call is not supported: a panel answers in text",
    "parallel_tool_calls": "parallel_tool_calls is not supported: a panel answers in text",
    "top_logprobs": "logprobs are not supported",
    "seed": "seed is not supported: the agents' providers are not seeded",
    "stop": "stop sequences are not supported",
    "metadata": "metadata is not supported; use `user` to label a request",
    "top_p": "top_p is not supported; set temperature",
    "frequency_penalty": "frequency_penalty is not supported",
    "presence_penalty": "presence_penalty is not supported",
    "logit_bias": "logit_bias is not supported",
}
ROLES = ("system", "developer", "user", "assistant")


class RequestRefused(Exception):
    """A 400 in OpenAI's shape, naming the parameter."""

    def __init__(self, message: str, param: str | None, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass(frozen=True)
class CompletionRequest:
    model: str
    question: str
    instructions: str  # system messages and the earlier turns, added to every agent's instructions
    stream: bool
    include_usage: bool
    max_tokens: int | None
    temperature: float | None
    user: str | None


def _checked(text: str, param: str) -> str:
    if control_characters(text):
        raise RequestRefused("Content must not contain control characters.", param)
    if not text.strip():
        raise RequestRefused("Content must not be blank.", param)
    if len(text) > MAX_MESSAGE_CHARS:
        raise RequestRefused(f"Content is longer than {MAX_MESSAGE_CHARS} characters.", param)
    return text


def _text(content: Any, param: str) -> str:
    """A message's content: a string, or a list of text parts."""
    if isinstance(content, str):
        return _checked(content, param)
    if not isinstance(content, list) or not content:
        raise RequestRefused("Content must be a string or a list of text parts.", param)
    pieces = []
    for index, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or set(part) != {"type", "text"}:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise RequestRefused(f"Only text content parts are supported, not {kind!r}.", f"{param}[{index}]")
        if not isinstance(part["text"], str):
            raise RequestRefused("A text part's text must be a string.", f"{param}[{index}].text")
        pieces.append(_checked(part["text"], f"{param}[{index}].text"))
    return "".join(pieces)


def _messages(messages: Any) -> tuple[str, str]:
    """(the question: the last user message, the instructions: system messages and context)."""
    if not isinstance(messages, list) or not messages:
        raise RequestRefused("messages must be a non-empty list.", "messages")
    if len(messages) > MAX_MESSAGES:
        raise RequestRefused(f"At most {MAX_MESSAGES} messages.", "messages")
    read: list[tuple[str, str]] = []
    for index, message in enumerate(messages):
        param = f"messages[{index}]"
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise RequestRefused(f"role must be one of {', '.join(ROLES)}.", f"{param}.role")
        extra = sorted(set(message) - {"role", "content", "name"})
        name = message.get("name", "")
        if not isinstance(name, str) or len(name) > 256 or control_characters(name):
            raise RequestRefused("name must be a string of at most 256 characters.", f"{param}.name")
        if extra:
            raise RequestRefused(f"Unsupported message field {extra[0]!r}.", f"{param}.{extra[0]}")
        read.append((message["role"], _text(message.get("content"), f"{param}.content")))
    # The question: the last user message (without one, the last message).
    last = max((i for i, (role, _) in enumerate(read) if role == "user"), default=len(read) - 1)
    question = read[last][1]
    system = [text for i, (role, text) in enumerate(read) if role in ("system", "developer") and i != last]
    context = [
        f"{role}: {text}"
        for i, (role, text) in enumerate(read)
        if role in ("user", "assistant") and i != last
    ]
    parts = [*system]
    if context:
        parts.append("The conversation so far (the question follows it):\n" + "\n".join(context))
    instructions = "\n\n".join(parts)
    if len(instructions) + len(question) > MAX_CONTEXT_CHARS:
        raise RequestRefused(f"The messages exceed {MAX_CONTEXT_CHARS} characters.", "messages")
    return question, instructions


def _positive_int(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 1_000_000_000:
        raise RequestRefused(f"{name} must be a positive integer.", name)
    return value


def _checked_options(body: dict[str, Any]) -> None:
    """Refuse what a panel cannot honour, naming it."""
    for name in body:
        if name in REFUSED and body[name] is not None:
            raise RequestRefused(REFUSED[name] + ".", name, "unsupported_parameter")
        if name not in USED and name not in REFUSED:
            raise RequestRefused(
                f"Unrecognized request argument supplied: {name}.", name, "unknown_parameter"
            )
    if body.get("n") not in (None, 1):
        raise RequestRefused("n must be 1: a panel gives one answer.", "n", "unsupported_value")
    if body.get("logprobs") not in (None, False):
        raise RequestRefused("logprobs are not supported.", "logprobs", "unsupported_value")
    response_format = body.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise RequestRefused('Only response_format {"type": "text"} is supported.', "response_format")


def parse(body: Any) -> CompletionRequest:
    if not isinstance(body, dict):
        raise RequestRefused("The body must be a JSON object.", None)
    _checked_options(body)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestRefused("model must be a panel id (GET /v1/models lists them).", "model")
    question, instructions = _messages(body.get("messages"))
    stream = body.get("stream")
    if stream not in (None, True, False):
        raise RequestRefused("stream must be a boolean.", "stream")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise RequestRefused("stream_options may hold include_usage only.", "stream_options")
    include_usage = bool((options or {}).get("include_usage"))
    temperature = body.get("temperature")
    if temperature is not None and (
        not isinstance(temperature, int | float) or isinstance(temperature, bool) or not 0 <= temperature <= 2
    ):
        raise RequestRefused("temperature must be a number between 0 and 2.", "temperature")
    user = body.get("user")
    if user is not None and (not isinstance(user, str) or len(user) > 256 or control_characters(user)):
        raise RequestRefused("user must be a string of at most 256 characters.", "user")
    max_tokens = _positive_int(body, "max_completion_tokens") or _positive_int(body, "max_tokens")
    return CompletionRequest(
        model=model,
        question=question,
        instructions=instructions,
        stream=bool(stream),
        include_usage=include_usage,
        max_tokens=max_tokens,
        temperature=float(temperature) if temperature is not None else None,
        user=user,
    )
