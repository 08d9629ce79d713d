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
# An endpoint string rather than -b/-p, which listen with a backlog of 50: a burst of more new
# connections than that waits on SYN retries (a second or more). Colons of an IPv6 host escaped.
exec .venv/bin/daphne -e "tcp:port=$PORT:interface=${HOST//:/\\:}:backlog=2048" polyagents_site.asgi:application
