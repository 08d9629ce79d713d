"""Every command of the README's "Trying it" section works as written, on a fresh clone.

The test clones this repository's HEAD into a temporary directory (reusing the existing
virtualenv through a symlink, so nothing is reinstalled), starts `make run` in the
background on a free port with a newcomer's environment (none of our settings), then runs
the section's commands in order, exactly as printed except for the port and the demo key,
and then the other lines the section names: the API docs, the dashboard, the admin and
`manage.py createsuperuser`. Runs once, in the embedded-defaults run of `make test`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from django.conf import settings

ROOT = Path(__file__).resolve().parent.parent
PORT_IN_README = "localhost:8000"
OPS_KEY = "pk_readme_ops_0123456789abcdefghij"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(300),
    pytest.mark.skipif(
        settings.USING_POSTGRES or bool(settings.REDIS_URL),
        reason="runs once, in the embedded-defaults run (the README's path)",
    ),
    pytest.mark.skipif(
        shutil.which("git") is None or shutil.which("make") is None or shutil.which("curl") is None,
        reason="needs git, make and curl",
    ),
]


def section_commands(readme: str, heading: str) -> list[str]:
    """The commands of the first ```bash block under `heading`, continuation lines joined."""
    section = f"\n{readme}".split(f"\n{heading}\n", 1)[1]
    block = section.split("```bash\n", 1)[1].split("\n```", 1)[0]
    commands: list[str] = []
    pending = ""
    for line in block.splitlines():
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        commands.append((pending + line.strip()).strip())
        pending = ""
    return [c for c in commands if c]


def test_the_readme_sections_parse() -> None:
    readme = (ROOT / "README.md").read_text()
    first = section_commands(readme, "# PolyAgents")
    assert [c.split("#")[0].strip() for c in first] == ["make run", "make test"]
    trying = section_commands(readme, "## Trying it")
    assert trying[0].startswith("KEY=pk_...")
    assert any(c.startswith("curl") for c in trying)
    assert any("manage.py chat" in c for c in trying)


def dev_env(path: Path) -> str:
    done = subprocess.run(
        [str(ROOT / ".venv/bin/python"), str(ROOT / "scripts/dev_env.py"), str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout


def test_the_dev_env_is_written_once_and_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    assert "Wrote a development" in dev_env(path)
    first = path.read_text()
    assert "DEBUG=true" in first
    secrets = re.findall(r"^(?:SECRET_KEY|JWT_SECRET_KEY)=(\S{32,})$", first, flags=re.MULTILINE)
    assert len(secrets) == 2
    assert secrets[0] != secrets[1]
    assert "Using the existing" in dev_env(path)
    assert path.read_text() == first
    path.write_text("DEBUG=false\n")
    dev_env(path)
    assert path.read_text() == "DEBUG=false\n"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def newcomer_env(**extra: str) -> dict[str, str]:
    """A shell environment with none of this test run's settings."""
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "TERM")
    return {**{k: os.environ[k] for k in keep if k in os.environ}, **extra}


@dataclass
class Server:
    clone: Path
    port: int
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def get(self, path: str, key: str | None = None) -> tuple[int, str]:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}")
        if key:
            request.add_header("Authorization", f"Bearer {key}")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()


@pytest.fixture
def make_run(tmp_path: Path) -> Iterator[Server]:
    clone = tmp_path / "polyagents"
    if subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True).returncode:
        pytest.skip("not a git checkout")
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    (clone / ".venv").symlink_to((ROOT / ".venv").resolve(), target_is_directory=True)
    port = free_port()
    log = tmp_path / "make-run.log"
    env = newcomer_env(
        API_HOST="127.0.0.1",
        API_PORT=str(port),
        DEFAULT_API_KEYS=json.dumps([{"name": "ops", "key": OPS_KEY, "permissions": ["read"]}]),
    )
    with log.open("w") as out:
        process = subprocess.Popen(
            ["make", "run"], cwd=clone, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = Server(clone=clone, port=port, log=log)
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                pytest.fail(f"make run exited with {process.returncode}:\n{server.output()}")
            try:
                if server.get("/health")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"make run did not serve within 180 s:\n{server.output()}")
            time.sleep(0.5)
        yield server
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def run_in_order(commands: list[str], cwd: Path) -> list[tuple[str, int, str]]:
    """Run the commands in one bash session (so `KEY=…` carries over); each one's status and output."""
    script = []
    for index, command in enumerate(commands):
        script.append(f"echo '::begin {index}::'")
        script.append(command)
        script.append(f'echo "::end {index} $?::"')
    done = subprocess.run(
        ["bash", "-c", "\n".join(script)],
        cwd=cwd,
        env=newcomer_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    results = []
    for index, command in enumerate(commands):
        found = re.search(rf"::begin {index}::\n(.*?)::end {index} (\d+)::", done.stdout, flags=re.DOTALL)
        assert found, f"{command!r} did not finish:\n{done.stdout}\n{done.stderr}"
        results.append((command, int(found.group(2)), found.group(1)))
    return results


def test_every_trying_it_command_works_on_a_fresh_clone(make_run: Server) -> None:
    server = make_run
    output = server.output()
    assert "Wrote a development .env" in output
    key_match = re.search(r"Demo API key \(read,write\), shown once: (pk_\S+)", output)
    assert key_match, output
    demo_key = key_match.group(1)

    readme = (server.clone / "README.md").read_text()
    commands = [
        c.replace("KEY=pk_...", f"KEY={demo_key}", 1).replace(PORT_IN_README, f"localhost:{server.port}")
        for c in section_commands(readme, "## Trying it")
    ]
    results = run_in_order(commands, server.clone)
    for command, status, out in results:
        assert status == 0, f"{command!r} exited with {status}:\n{out}"
        assert "configuration error" not in out, f"{command!r}:\n{out}"

    health = next(out for command, _, out in results if command.endswith("/health"))
    assert json.loads(health) == {"status": "healthy", "service": "polyagents"}
    chat = json.loads(next(out for command, _, out in results if "/chat" in command))
    assert chat["metadata"]["status"] in ("completed", "no_consensus"), chat
    assert len(chat["agent_responses"]) == 3
    assert chat["metadata"]["simulated"] is True
    command_line = next(out for command, _, out in results if "manage.py chat" in command)
    assert "Votes" in command_line, command_line

    # The rest of the section: the dashboard, the API docs, the admin and createsuperuser.
    assert server.get("/")[0] == 200
    status, docs = server.get("/docs")
    assert status == 200
    assert "swagger" in docs.lower()
    assert server.get("/schema")[0] == 200
    assert server.get("/django-admin/login/")[0] == 200
    created = subprocess.run(
        [
            ".venv/bin/python",
            "manage.py",
            "createsuperuser",
            "--noinput",
            "--username",
            "admin",
            "--email",
            "admin@example.com",
        ],
        cwd=server.clone,
        env=newcomer_env(DJANGO_SUPERUSER_PASSWORD="a-long-passphrase-for-the-test"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert created.returncode == 0, created.stdout + created.stderr

    # DEFAULT_API_KEYS given to `make run` work as soon as it serves.
    status, whoami = server.get("/auth/whoami", key=OPS_KEY)
    assert status == 200, whoami
    assert json.loads(whoami)["name"] == "ops"

    # The generated .env is git-ignored: the clone stays clean.
    env_file = (server.clone / ".env").read_text()
    assert "DEBUG=true" in env_file
    status_lines = subprocess.run(
        ["git", "status", "--porcelain"], cwd=server.clone, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    # (.venv here is this test's symlink; `.venv/` in .gitignore matches only a real directory)
    assert [line for line in status_lines if line != "?? .venv"] == []
