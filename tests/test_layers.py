"""The apps stay in layers: each imports only the ones below it (pyproject's importlinter contract).

lint-imports runs in its own process: in this one, zope.interface (loaded with daphne) makes
import-linter's option scan fail.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _lint(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(config), "--no-cache"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_no_app_imports_a_layer_above_it() -> None:
    result = _lint(ROOT / "pyproject.toml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_an_upward_import_breaks_the_contract(tmp_path: Path) -> None:
    """The check can fail: with consensus drawn above conversations, conversations' import of it is upward."""
    config = tmp_path / "upside_down.toml"
    config.write_text(
        '[tool.importlinter]\nroot_packages = ["consensus", "conversations"]\n\n'
        "[[tool.importlinter.contracts]]\n"
        'name = "upside down"\ntype = "layers"\nlayers = ["consensus", "conversations"]\n'
    )
    result = _lint(config)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "conversations.begin -> consensus" in result.stdout


def test_the_streaming_modules_import_one_way(tmp_path: Path) -> None:
    """worker -> tasks -> jobs, never back: no circle among the background-run modules."""
    config = tmp_path / "streaming.toml"
    config.write_text(
        '[tool.importlinter]\nroot_packages = ["streaming"]\n\n'
        "[[tool.importlinter.contracts]]\n"
        'name = "streaming runs"\ntype = "layers"\ncontainers = ["streaming"]\n'
        'layers = ["management", "worker", "tasks", "jobs", "compat"]\n'
    )
    result = _lint(config)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout
