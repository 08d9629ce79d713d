"""Django settings, derived from the validated configuration in `config.py`."""

from __future__ import annotations

import os
import secrets
from datetime import timedelta
from pathlib import Path

import dj_database_url

from conversations.redis_options import reconnecting
from polyagents_site.config import load_config

BASE_DIR = Path(__file__).resolve().parent.parent

CONFIG = load_config()

DEBUG = CONFIG.DEBUG
# Outside DEBUG a missing secret is refused; in DEBUG an ephemeral one is generated.
if not DEBUG and (not CONFIG.SECRET_KEY or not CONFIG.JWT_SECRET_KEY):
    from polyagents_site.config import ConfigError

    missing = "SECRET_KEY" if not CONFIG.SECRET_KEY else "JWT_SECRET_KEY"
    raise ConfigError(f"PolyAgents configuration error: {missing}: required when DEBUG is false")
SECRET_KEY = CONFIG.SECRET_KEY or secrets.token_urlsafe(50)
JWT_SECRET_KEY = CONFIG.JWT_SECRET_KEY or secrets.token_urlsafe(50)
ALLOWED_HOSTS = CONFIG.ALLOWED_HOSTS

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "corsheaders",
    "rest_framework",
    "rest_framework_simplejwt.token_blacklist",
    "drf_spectacular",
    "channels",
    "telemetry",
    "agents",
    "gateway",
    "panels",
    "conversations",
    "streaming",
    "archive",
    "openai_api",
    "webhooks",
    "mcp_server",
    "monitoring",
    "health_check",
    "health_check.cache",
    "drf_spectacular_sidecar",
]

MIDDLEWARE = [
    "monitoring.middleware.MetricsMiddleware",
    "corsheaders.middleware.CorsMiddleware",
    "polyagents_site.middleware.BlockedIPMiddleware",  # the gateway's, its check on the event loop
    "gateway.middleware.RequestIdMiddleware",
    "gateway.middleware.RateLimitHeadersMiddleware",
    # Django's own, run on the event loop where they do no I/O (polyagents_site/middleware.py).
    "polyagents_site.middleware.SecurityMiddleware",
    "polyagents_site.middleware.SessionMiddleware",
    "polyagents_site.middleware.CommonMiddleware",
    "polyagents_site.middleware.CsrfViewMiddleware",
    "polyagents_site.middleware.AuthenticationMiddleware",
    "polyagents_site.middleware.MessageMiddleware",
    "polyagents_site.middleware.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "polyagents_site.urls"
ASGI_APPLICATION = "polyagents_site.asgi.application"
WSGI_APPLICATION = None

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database: SQLite by default, PostgreSQL with psycopg's pool when DATABASE_URL is set.
if CONFIG.DATABASE_URL and CONFIG.DATABASE_URL.startswith(("postgres://", "postgresql://")):
    _db = dj_database_url.parse(CONFIG.DATABASE_URL, conn_max_age=0)
    _db["ENGINE"] = "django.db.backends.postgresql"
    _db["OPTIONS"] = {"pool": {"min_size": 1, "max_size": CONFIG.DATABASE_POOL_MAX, "timeout": 10}}
    # With a pool, Django passes `check=ConnectionPool.check_connection`: a pooled connection is
    # tested before it is handed out, so those a database restart killed are replaced.
    _db["CONN_HEALTH_CHECKS"] = True
    _db["CONN_MAX_AGE"] = 0  # persistent connections leak under ASGI; the pool reuses them
elif CONFIG.DATABASE_URL:
    _db = dj_database_url.parse(CONFIG.DATABASE_URL)
else:
    _db = {"ENGINE": "django.db.backends.sqlite3", "NAME": str(BASE_DIR / "db.sqlite3")}
if _db["ENGINE"].endswith("sqlite3"):
    _db.setdefault("OPTIONS", {})
    _db["OPTIONS"].update(
        {
            "timeout": 20,
            "transaction_mode": "IMMEDIATE",
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
    )
# Parallel test runs on one machine get their own test database.
_db["TEST"] = {"NAME": f"test_polyagents{os.environ.get('TEST_DB_SUFFIX', '')}"}
if _db["ENGINE"].endswith("sqlite3"):
    _db["TEST"]["NAME"] = None  # in-memory
DATABASES = {"default": _db}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USING_POSTGRES = DATABASES["default"]["ENGINE"].endswith("postgresql")

# --- Background jobs: procrastinate on PostgreSQL (`manage.py worker`, any number of
# workers); with SQLite conversations run as in-process asyncio tasks (streaming/jobs.py).
if USING_POSTGRES:
    INSTALLED_APPS.append("procrastinate.contrib.django")
PROCRASTINATE_AUTODISCOVER_MODULE_NAME = "tasks"
# A "running" conversation whose heartbeat (every 2 s) is older than this, run by no live
# worker, is resumed elsewhere or failed (streaming/jobs.py `sweep_stale_conversations`).
CONVERSATION_STALE_SECONDS = CONFIG.CONVERSATION_STALE_SECONDS
# How often each worker (and, on SQLite, the web process) looks for dead runs.
RECOVERY_SWEEP_SECONDS = 5.0
RECOVERY_SWEEP_IN_PROCESS = True  # SQLite: the web process resumes the runs a restart interrupted
# A worker is dead once its heartbeat (every 5 s) is older than this.
WORKER_STALLED_SECONDS = float(CONVERSATION_STALE_SECONDS)
PROCRASTINATE_WORKER_DEFAULTS = {
    "concurrency": CONFIG.WORKER_CONCURRENCY,
    "delete_jobs": "successful",
    "update_heartbeat_interval": 5.0,
    "stalled_worker_timeout": WORKER_STALLED_SECONDS,
    # A stopping worker (a signal, a lost database: streaming/worker.py) gives its runs this long
    # to finish, then aborts them and they are retried. Longer than a run rides a restart out.
    "shutdown_graceful_timeout": 30.0,
}

# --- Redis: cache, channel layer and streams when REDIS_URL is set.
REDIS_URL = CONFIG.REDIS_URL
REDIS_KEY_PREFIX = CONFIG.REDIS_KEY_PREFIX
if REDIS_URL:
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": REDIS_KEY_PREFIX,
        }
    }
    # Redis pub/sub: a group_send is one PUBLISH that each web process receives once, decodes
    # once and fans out locally (the list-based RedisChannelLayer pops every copy from Redis one
    # by one; channels_redis's pub/sub layer decodes a copy per socket): streaming/layers.py.
    # Lossy like any channel layer: completeness comes from replay by seq (streaming/consumers.py).
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "streaming.layers.LocalFanoutPubSubChannelLayer",
            # redis-py 8 reads with a 5 s socket timeout by default; read longer.
            "CONFIG": {
                # A connection a Redis restart closed is reconnected on its next use (and its
                # subscriptions renewed) instead of failing the caller: conversations/redis_options.py.
                "hosts": [
                    {
                        "address": REDIS_URL,
                        "socket_timeout": 30,
                        "socket_connect_timeout": 5,
                        **reconnecting(),
                    }
                ],
                "prefix": f"{REDIS_KEY_PREFIX}:asgi",
            },
        }
    }
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    CHANNEL_LAYERS = {
        "default": {"BACKEND": "channels.layers.InMemoryChannelLayer", "CONFIG": {"capacity": 1000}}
    }

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = BASE_DIR / "staticfiles"

# --- Django REST framework
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["gateway.authentication.BearerAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["gateway.permissions.CanRead"],
    "DEFAULT_THROTTLE_CLASSES": ["gateway.throttling.TokenBucketThrottle"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["gateway.parsers.SafeJSONParser"],
    "EXCEPTION_HANDLER": "gateway.errors.exception_handler",
    "DEFAULT_SCHEMA_CLASS": "gateway.openapi.ApiAutoSchema",
    "UNAUTHENTICATED_USER": None,
}

SPECTACULAR_SETTINGS = {
    "TITLE": "PolyAgents API",
    "DESCRIPTION": "Multi-agent conversations with consensus by vote, streamed live.",
    "VERSION": "0.1.0",
    "SERVE_INCLUDE_SCHEMA": False,
    # One name for the quota unit enum, wherever an API key's fields appear.
    "ENUM_NAME_OVERRIDES": {"QuotaUnitEnum": "gateway.models.QuotaUnit"},
    # Swagger UI and ReDoc assets served from drf-spectacular-sidecar, not a CDN.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # Enum components as usual, then the OpenAPI links views declare (see gateway/openapi.py).
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "gateway.openapi.add_links",
        "openai_api.schemas.require_bodies",
    ],
}

SIMPLE_JWT = {
    "ACCESS_TOKEN_LIFETIME": timedelta(seconds=CONFIG.JWT_ACCESS_TTL),
    "REFRESH_TOKEN_LIFETIME": timedelta(seconds=CONFIG.JWT_REFRESH_TTL),
    "ROTATE_REFRESH_TOKENS": True,
    "BLACKLIST_AFTER_ROTATION": True,
    "SIGNING_KEY": JWT_SECRET_KEY,
    "ALGORITHM": "HS256",
    "AUTH_HEADER_TYPES": ("Bearer",),
    "USER_ID_CLAIM": "sub",
    "USER_ID_FIELD": "id",
    "UPDATE_LAST_LOGIN": False,
}

CORS_ALLOWED_ORIGINS = CONFIG.CORS_ALLOWED_ORIGINS
CORS_ALLOW_HEADERS = ("authorization", "content-type", "x-request-id")
CORS_EXPOSE_HEADERS = (
    "Retry-After",
    "RateLimit-Limit",
    "RateLimit-Remaining",
    "RateLimit-Reset",
    "RateLimit-Policy",
    "X-Request-ID",
)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "json": {
            "()": "pythonjsonlogger.json.JsonFormatter",
            "fmt": "%(asctime)s %(levelname)s %(name)s %(message)s",
            "rename_fields": {"asctime": "time", "levelname": "level", "name": "logger"},
        }
    },
    "filters": {"request_id": {"()": "gateway.net.RequestIdFilter"}},
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "json", "filters": ["request_id"]}
    },
    "root": {"handlers": ["console"], "level": CONFIG.LOG_LEVEL},
    "loggers": {
        "django.db.backends": {"level": "WARNING"},
        # httpx logs every request at INFO: one line per LLM call (the SDKs' transport).
        "httpx": {"level": "WARNING"},
        # google-genai logs "AFC is enabled" at INFO on every call made without a config, as
        # the Gemini provider makes them (agents.providers.gemini, GeminiProvider._sdk).
        "google_genai.models": {"level": "WARNING"},
    },
}
