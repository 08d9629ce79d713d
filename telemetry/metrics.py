"""Prometheus metrics shared by every part of the service (exposed at GET /metrics)."""

from prometheus_client import Counter, Gauge, Histogram

HTTP_REQUESTS = Counter(
    "polyagents_http_requests_total", "HTTP requests served", ["method", "route", "status"]
)
HTTP_LATENCY = Histogram(
    "polyagents_http_request_duration_seconds",
    "HTTP request latency",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
LLM_CALLS = Counter(
    "polyagents_llm_calls_total", "LLM calls by provider, model and outcome", ["provider", "model", "outcome"]
)
LLM_LATENCY = Histogram(
    "polyagents_llm_call_duration_seconds",
    "LLM call latency",
    ["provider", "model"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60),
)
LLM_TOKENS = Counter("polyagents_llm_tokens_total", "Tokens used", ["provider", "model", "kind"])
BREAKER_STATE = Gauge(
    "polyagents_circuit_breaker_state", "Circuit breaker state (0 closed, 1 half-open, 2 open)", ["breaker"]
)
OPEN_WEBSOCKETS = Gauge("polyagents_open_websockets", "WebSocket connections open in this process")
RATE_LIMIT_REJECTIONS = Counter(
    "polyagents_rate_limit_rejections_total", "Requests refused with 429", ["scope"]
)
RATE_LIMIT_BACKEND_ERRORS = Counter(
    "polyagents_rate_limit_backend_errors_total", "Rate-limit checks that failed open (Redis down)", ["scope"]
)
EXTRA_CALLS = Counter(
    "polyagents_extra_calls_total",
    "LLM calls beyond the panel's answers and ballots: repair requests and chairman syntheses",
    ["purpose"],
)
CONVERSATIONS = Counter("polyagents_conversations_total", "Conversations finished, by status", ["status"])
LLM_COST = Counter(
    "polyagents_llm_cost_usd_total",
    "Estimated cost of LLM calls in USD (price table; simulated and unpriced models count 0)",
    ["provider", "model"],
)
API_KEY_COST = Counter(
    "polyagents_api_key_cost_usd_total", "Estimated cost of conversations in USD, by API key", ["api_key"]
)
API_KEY_TOKENS = Counter(
    "polyagents_api_key_tokens_total", "Tokens used by conversations, by API key", ["api_key"]
)
QUOTA_REJECTIONS = Counter(
    "polyagents_quota_rejections_total", "Conversations refused by a daily quota", ["unit"]
)
QUOTA_BACKEND_ERRORS = Counter(
    "polyagents_quota_backend_errors_total", "Quota operations that fell back to the database (Redis down)"
)
