#!/usr/bin/env bash
# Run the whole test suite twice: against the real PostgreSQL and Redis of this machine,
# then on the embedded defaults (SQLite, in-memory channel layer, local cache).
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev
PG_URL=${TEST_DATABASE_URL:-postgresql://postgres@127.0.0.1:5432/postgres}
REDIS=${TEST_REDIS_URL:-redis://127.0.0.1:6379/0}
if ! .venv/bin/python - "$PG_URL" "$REDIS" <<'PY'
import sys
import psycopg, redis
try:
    psycopg.connect(sys.argv[1], connect_timeout=3).close()
    redis.Redis.from_url(sys.argv[2], socket_connect_timeout=3).ping()
except Exception as exc:
    print(f"PostgreSQL or Redis is not reachable ({exc}); start them (see .ci/run)", file=sys.stderr)
    sys.exit(1)
PY
then exit 1; fi
echo "== test run 1/2: PostgreSQL + Redis"
env -u DEBUG DATABASE_URL="$PG_URL" REDIS_URL="$REDIS" .venv/bin/python -m pytest "$@"
echo "== test run 2/2: embedded defaults (SQLite, in-memory layer, local cache)"
env -u DEBUG -u DATABASE_URL -u REDIS_URL .venv/bin/python -m pytest "$@"
