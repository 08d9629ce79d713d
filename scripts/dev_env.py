"""Write a development `.env` (DEBUG=true, generated secrets) when none exists; never overwrite one.

`make run` calls it first, so every later command of the README (`manage.py chat`,
`manage.py createsuperuser`…) reads the same development configuration as the server.
Usage: python scripts/dev_env.py [path]   (default: .env in the current directory)
"""

from __future__ import annotations

import secrets
import sys
from pathlib import Path

TEMPLATE = """\
# Development configuration written by `make run` (scripts/dev_env.py) because no .env existed.
# It is git-ignored and never overwritten: edit it freely, or delete it to get a new one.
# Not for production: DEBUG shows error details; see env.example for every variable.
DEBUG=true
SECRET_KEY={secret_key}
JWT_SECRET_KEY={jwt_secret_key}
"""


def write_dev_env(path: Path) -> bool:
    """Create `path` with fresh secrets; False (and nothing written) if it exists already."""
    content = TEMPLATE.format(secret_key=secrets.token_urlsafe(48), jwt_secret_key=secrets.token_urlsafe(48))
    try:
        with path.open("x", encoding="utf-8") as handle:  # "x": fails if it exists, even in a race
            handle.write(content)
    except FileExistsError:
        return False
    path.chmod(0o600)
    return True


def main() -> int:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else ".env")
    if write_dev_env(path):
        print(f"Wrote a development {path} (DEBUG=true, generated SECRET_KEY and JWT_SECRET_KEY);")
        print("manage.py commands read it too. It is git-ignored and never overwritten.")
    else:
        print(f"Using the existing {path} (not modified).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
