"""Settings for the test suite: the real settings with test secrets and fast defaults.

Which backends run is chosen by the environment, as in production: DATABASE_URL and
REDIS_URL select PostgreSQL and Redis, their absence the embedded defaults.
"""

import os
import uuid

os.environ.setdefault("SECRET_KEY", "test-secret-key-" + uuid.uuid4().hex)
os.environ.setdefault("JWT_SECRET_KEY", "test-jwt-secret-" + uuid.uuid4().hex)
os.environ.setdefault("SIMULATED_LATENCY", "0")
os.environ.setdefault("RETRY_BASE_DELAY", "0.01")
os.environ.setdefault("RETRY_MAX_DELAY", "0.05")
# Tests import the ASGI application inside pytest-django's database guard; they warm up explicitly.
os.environ.setdefault("WARM_UP", "false")
# Every test session writes under its own Redis prefix, so parallel runs never collide.
os.environ.setdefault("REDIS_KEY_PREFIX", "test:" + uuid.uuid4().hex[:12])

from polyagents_site.settings import *  # noqa: F403

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

# Tests drive the in-process recovery sweep themselves, unless a child process is asked to.
RECOVERY_SWEEP_IN_PROCESS = os.environ.get("RECOVERY_SWEEP_IN_PROCESS") == "1"
