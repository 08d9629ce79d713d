#!/usr/bin/env bash
# Set up and run the service. With no configuration it uses the embedded defaults
# (SQLite, in-memory channel layer, simulated agents unless GEMINI_API_KEY is set).
# On first run it writes a development .env (DEBUG=true, generated secrets) that every
# manage.py command then reads too; an existing .env is never modified. It loads
# DEFAULT_API_KEYS, prints a demo API key and serves on API_HOST:API_PORT (0.0.0.0:8000).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/python scripts/dev_env.py .env
.venv/bin/python manage.py migrate --noinput
.venv/bin/python manage.py collectstatic --noinput --verbosity 0
.venv/bin/python manage.py load_api_keys
.venv/bin/python manage.py create_api_key --demo
HOST=$(.venv/bin/python -c "from polyagents_site.config import load_config; print(load_config().API_HOST)")
PORT=$(.venv/bin/python -c "from polyagents_site.config import load_config; print(load_config().API_PORT)")
echo "Serving on http://$HOST:$PORT (dashboard at /, API docs at /docs)"
exec .venv/bin/daphne -b "$HOST" -p "$PORT" polyagents_site.asgi:application
