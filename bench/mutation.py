"""Mutation testing of the consensus library: do the tests notice when the code is wrong?

A small AST mutator makes one change at a time in consensus/voting.py, scoring.py,
agreement.py and calibration.py:

  compare   < <-> <=, > <-> >=, == <-> !=, in <-> not in, is <-> is not
  minmax    min <-> max
  constant  a number n -> n + 1 and n - 1 (not booleans, not strings)
  return    return <expr> -> return None

For every mutant it copies the library into a temporary directory with the mutated
module, then runs the consensus tests (tests/test_consensus.py, test_calibration.py,
test_consensus_properties.py, stopping at the first failure) against it, without Django.
A mutant is killed when a test fails (or errors, or times out), survives otherwise.
Mutants known to be equivalent (they cannot change behaviour) are listed in
EQUIVALENT with the reason and left out of the score.

Usage: .venv/bin/python bench/mutation.py [--jobs 2] [--only voting] [--list]
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGETS = [
    "consensus/voting.py",
    "consensus/scoring.py",
    "consensus/agreement.py",
    "consensus/calibration.py",
]
TESTS = ["tests/test_consensus.py", "tests/test_calibration.py", "tests/test_consensus_properties.py"]
# The calibration module is used only by its own tests (and the reliability vote, tested there).
TESTS_FOR = {"consensus/calibration.py": ["tests/test_calibration.py"]}
TIMEOUT = 300

COMPARE_SWAPS: dict[type, type] = {
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
}

NO_WINNER = "certainty without a winner: never read (the confidence is 0 then)"
# (file, line, description) -> why the mutant cannot change behaviour.
EQUIVALENT: dict[tuple[str, int, str], str] = {
    (
        "consensus/voting.py",
        26,
        "0.5 -> 1.5",
    ): "a default in the Strategy Protocol's signature, never executed",
    (
        "consensus/voting.py",
        26,
        "0.5 -> -0.5",
    ): "a default in the Strategy Protocol's signature, never executed",
    (
        "consensus/voting.py",
        66,
        "0.0 -> 1.0",
    ): "share() of a label when nothing was cast: only read when there is no winner, "
    "and then the confidence is 0 whatever the runner-up",
    ("consensus/voting.py", 66, "0.0 -> -1.0"): "same as above",
    ("consensus/voting.py", 81, "0.0 -> -1.0"): "runner-up default with a single option: "
    "confidence_score clamps the runner-up into [0, share], so -1 reads as 0",
    ("consensus/voting.py", 82, "0.0 -> 1.0"): NO_WINNER,
    ("consensus/voting.py", 82, "0.0 -> -1.0"): NO_WINNER,
    ("consensus/voting.py", 85, "Gt -> GtE"): "differs only when share - quorum is exactly EPSILON (1e-9), "
    "which no sum of vote shares produces",
    ("consensus/scoring.py", 44, "GtE -> Gt"): "top(): differs only for a score exactly EPSILON below "
    "the best; the best itself still passes",
}


@dataclass(frozen=True)
class Mutant:
    path: str
    index: int  # the index-th mutation point of the file
    line: int
    description: str


class Mutator(ast.NodeTransformer):
    """Enumerates mutation points in a fixed order; applies the one numbered `target` (or none)."""

    def __init__(self, target: int = -1) -> None:
        self.target = target
        self.count = 0
        self.found: list[tuple[int, str]] = []
        self.docstrings: set[int] = set()

    def _point(self, node: ast.AST, description: str) -> bool:
        index = self.count
        self.count += 1
        self.found.append((getattr(node, "lineno", 0), description))
        return index == self.target

    def visit_Compare(self, node: ast.Compare) -> ast.AST:
        self.generic_visit(node)
        for position, op in enumerate(node.ops):
            swap = COMPARE_SWAPS.get(type(op))
            if swap is not None and self._point(node, f"{type(op).__name__} -> {swap.__name__}"):
                node.ops[position] = swap()
        return node

    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        if isinstance(node.func, ast.Name) and node.func.id in ("min", "max"):
            other = "max" if node.func.id == "min" else "min"
            if self._point(node, f"{node.func.id} -> {other}"):
                node.func = ast.Name(id=other, ctx=ast.Load())
        return node

    def visit_Constant(self, node: ast.Constant) -> ast.AST:
        value = node.value
        if isinstance(value, bool) or not isinstance(value, int | float):
            return node
        for delta in (1, -1):
            if self._point(node, f"{value!r} -> {value + delta!r}"):
                return ast.copy_location(ast.Constant(value=value + delta), node)
        return node

    def visit_Return(self, node: ast.Return) -> ast.AST:
        self.generic_visit(node)
        if node.value is None or (isinstance(node.value, ast.Constant) and node.value.value is None):
            return node
        if self._point(node, "return <expr> -> return None"):
            return ast.copy_location(ast.Return(value=ast.Constant(value=None)), node)
        return node

    def visit_Expr(self, node: ast.Expr) -> ast.AST:
        # Docstrings and bare expressions: nothing to mutate inside a docstring.
        if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            return node
        return self.generic_visit(node)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> ast.AST:
        return self.generic_visit(node)


def mutants_of(path: str) -> list[Mutant]:
    tree = ast.parse((ROOT / path).read_text())
    mutator = Mutator()
    mutator.visit(tree)
    return [Mutant(path, i, line, text) for i, (line, text) in enumerate(mutator.found)]


def mutated_source(mutant: Mutant) -> str:
    tree = ast.parse((ROOT / mutant.path).read_text())
    Mutator(mutant.index).visit(tree)
    ast.fix_missing_locations(tree)
    return ast.unparse(tree)


def workspace() -> Path:
    """A copy of the library and its tests, runnable without Django."""
    base = Path(tempfile.mkdtemp(prefix="mutation-"))
    shutil.copytree(ROOT / "consensus", base / "consensus")
    (base / "mtests").mkdir()
    for test in TESTS:
        shutil.copy(ROOT / test, base / "mtests" / Path(test).name)
    (base / "pytest.ini").write_text("[pytest]\naddopts = -p no:cacheprovider -p no:django -p no:randomly\n")
    return base


def run_tests(base: Path, tests: list[str] = TESTS) -> str:
    """'killed' when a test fails, 'survived' when all pass, 'timeout' when too slow."""
    files = [f"mtests/{Path(t).name}" for t in tests]
    command = [sys.executable, "-m", "pytest", "-x", "-q", "--no-header", *files]
    try:
        done = subprocess.run(command, cwd=base, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        return "killed (timeout)"
    if done.returncode == 0:
        return "survived"
    if done.returncode in (1, 2, 3):
        return "killed"
    return f"error {done.returncode}: {done.stdout[-300:]}"


def evaluate(mutant: Mutant) -> tuple[Mutant, str]:
    base = workspace()
    try:
        try:
            source = mutated_source(mutant)
        except (SyntaxError, ValueError) as exc:
            return mutant, f"invalid ({exc})"
        (base / mutant.path).write_text(source)
        return mutant, run_tests(base, TESTS_FOR.get(mutant.path, TESTS))
    finally:
        shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--only", default="", help="only paths containing one of these (comma-separated)")
    parser.add_argument("--list", action="store_true", help="list the mutants and stop")
    args = parser.parse_args()
    wanted = args.only.split(",")
    mutants = [m for path in TARGETS if any(part in path for part in wanted) for m in mutants_of(path)]
    if args.list:
        for m in mutants:
            print(f"{m.path}:{m.line} {m.description}")
        print(f"{len(mutants)} mutants")
        return
    base = workspace()
    try:
        baseline = run_tests(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    if baseline != "survived":
        raise SystemExit(f"the unmutated tests do not pass ({baseline}); fix them first")
    started = time.monotonic()
    results: list[tuple[Mutant, str]] = []
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(evaluate, mutant) for mutant in mutants]
        for future in concurrent.futures.as_completed(futures):
            mutant, outcome = future.result()
            results.append((mutant, outcome))
            print(
                f"{len(results):>4}/{len(mutants)} {outcome:<9} "
                f"{mutant.path}:{mutant.line} {mutant.description}",
                flush=True,
            )
    equivalent = [(m, o) for m, o in results if (m.path, m.line, m.description) in EQUIVALENT]
    scored = [(m, o) for m, o in results if (m.path, m.line, m.description) not in EQUIVALENT]
    killed = sum(1 for _, o in scored if o.startswith("killed"))
    print(f"\n{len(results)} mutants in {time.monotonic() - started:.0f} s")
    for path in TARGETS:
        mine = [(m, o) for m, o in scored if m.path == path]
        if mine:
            dead = sum(1 for _, o in mine if o.startswith("killed"))
            print(f"  {path:<26} {dead}/{len(mine)} killed")
    print(f"equivalent (excluded): {len(equivalent)}")
    for m, _ in equivalent:
        print(f"  {m.path}:{m.line} {m.description}: {EQUIVALENT[(m.path, m.line, m.description)]}")
    print(f"score: {killed}/{len(scored)} killed = {killed / max(1, len(scored)):.1%}")


if __name__ == "__main__":
    main()
