"""Mutation testing of the consensus library: do the tests notice when the code is wrong?

A small AST mutator makes one change at a time in every module of consensus/ that has
code (TARGETS):

  compare    < <-> <=, > <-> >=, == <-> !=, in <-> not in, is <-> is not
  minmax     min <-> max
  constant   a number n -> n + 1 and n - 1 (not booleans, not strings); True <-> False
  return     return <expr> -> return None
  arithmetic + <-> -, * <-> /, // -> /, ** -> * (also in augmented assignments)
  boolean    and <-> or; not x -> x
  slicing    x[a:b] -> x[:b] and x[a:]; x[-1] -> x[0]
  call       f(x) -> x for a call with one argument (abs, round, float, len...)
  statement  a statement of a body with more than one -> pass (continue, break and
             assignments included; not def, class or docstrings)

For every mutant it copies the library into a temporary directory with the mutated
module, then runs the module's own tests (TESTS_FOR; stopping at the first failure,
hypothesis seed fixed) against it, without Django. A mutant is killed when a test fails (or errors, or times
out; the output names the test), survives otherwise. Mutants known to be equivalent
(they cannot change behaviour) are listed in EQUIVALENT with the reason and left out of
the score; mutants of the numerical solvers that change a result only below the solver's
own tolerance are listed in NUMERICAL and reported apart (the score with them as
survivors is printed too). Two alike mutants on one line carry their column.

Usage: .venv/bin/python bench/mutation.py [--jobs 2] [--only voting] [--list]
(--jobs 1 on a shared machine: a full run takes about 20 minutes on one core.)
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
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGETS = [
    "consensus/voting.py",
    "consensus/scoring.py",
    "consensus/agreement.py",
    "consensus/calibration.py",
    "consensus/platt.py",
    "consensus/normalize.py",
    "consensus/formats.py",
    "consensus/structured.py",
    "consensus/records.py",
]
TESTS = [
    "tests/test_consensus.py",
    "tests/test_calibration.py",
    "tests/test_consensus_properties.py",
    "tests/test_consensus_structured.py",
]
CORE = ["tests/test_consensus.py", "tests/test_consensus_properties.py"]
# Each module's own tests (the ones that exercise it); the others run every consensus test.
TESTS_FOR = {
    "consensus/calibration.py": ["tests/test_calibration.py", "tests/test_consensus_properties.py"],
    "consensus/platt.py": ["tests/test_calibration.py"],
    "consensus/normalize.py": CORE,
    "consensus/formats.py": [*CORE, "tests/test_consensus_structured.py"],
    "consensus/structured.py": ["tests/test_consensus_structured.py", *CORE],
}
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

ARITHMETIC_SWAPS: dict[type, type] = {
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.Mult: ast.Div,
    ast.Div: ast.Mult,
    ast.FloorDiv: ast.Div,
    ast.Pow: ast.Mult,
}
BODIES = (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.If, ast.For, ast.While, ast.With, ast.Try)
BODIES = (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.If, ast.For, ast.While, ast.With, ast.Try)
UNWRAPPABLE = frozenset(
    {"abs", "round", "float", "int", "str", "bool", "len", "sorted", "tuple", "list", "set", "frozenset",
     "dict", "clamp_unit", "normalize_answer", "math.fsum", "max", "min", "sum", "_clip"}
)  # fmt: skip
"""Calls f(x) that "call removal" replaces by their argument x."""

NO_WINNER = "certainty without a winner: never read (the confidence is 0 then)"
# (file, line, description) -> why the mutant cannot change behaviour.
EQUIVALENT: dict[tuple[str, int, str], str] = {
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
    ("consensus/agreement.py", 78, "0 -> -1"): "runner-up default with a single group: "
    "confidence_score clamps the runner-up into [0, share], so -1/size reads as 0",
    ("consensus/calibration.py", 285, "1.0 -> 2.0"): "vote_weights' s for yes/no: its only reader, "
    "evidence_weight, clips s to MAX_COINCIDENCE = 1",
    ("consensus/platt.py", 31, "GtE -> Gt"): "_sigmoid(0): both branches give exactly 1/2",
    ("consensus/platt.py", 110, "0.0 -> -1.0"): "a + da >= 0 already (a step is cut at a = 0 "
    "and only ever shortened), so neither floor changes a",
}

PLATT_STOP = "PlattScaling.fit's stop rule: after a Newton step under 1e-9 the rest is below rounding"
# Mutants of the numerical solvers that move a result only below the solver's own stopping
# tolerance, or change a budget that no fit reaches. Not provably equivalent (a bit-exact
# comparison could tell), so scored apart: the summary gives the score with and without them.
NUMERICAL: dict[tuple[str, int, str], str] = {
    ("consensus/platt.py", 31, "0 -> 1"): "_sigmoid's two formulas agree to the last bits "
    "(changes a fit by < 1e-9); exp cannot overflow for |x| <= 1",
    ("consensus/platt.py", 83, "100 -> 101"): "Newton's budget: 788 fits tried (ridge 0.1 "
    "to 10) converge within 13 steps; only ridge = 0 on separable outcomes (no maximum) reaches it",
    ("consensus/platt.py", 83, "100 -> 99"): "same as above",
    ("consensus/platt.py", 99, "Lt -> LtE"): "a step landing exactly on a = 0 is the same step cut at a = 0",
    ("consensus/platt.py", 102, "60 -> 61"): "halving budget: 2^-60 of a step is below "
    "rounding, the line search ends before",
    ("consensus/platt.py", 102, "60 -> 59"): "same as above",
    ("consensus/platt.py", 111, "1e-09 -> 1.000000001 (col 25)"): PLATT_STOP + " (once b's "
    "step is that small a's is too: fits move < 2e-9)",
    ("consensus/platt.py", 111, "1e-09 -> -0.999999999 (col 25)"): PLATT_STOP,
    ("consensus/platt.py", 111, "Lt -> LtE (col 15)"): PLATT_STOP,
    ("consensus/platt.py", 111, "1e-09 -> -0.999999999 (col 44)"): PLATT_STOP,
    ("consensus/platt.py", 111, "Lt -> LtE (col 34)"): PLATT_STOP,
    ("consensus/platt.py", 111, "delete if"): PLATT_STOP + " (without it the fit stops when no "
    "step uphill is left, after at most a few more steps below rounding)",
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
        self.found: list[tuple[int, int, str]] = []  # (line, column, description)
        self.docstrings: set[int] = set()

    def _point(self, node: ast.AST, description: str) -> bool:
        index = self.count
        self.count += 1
        self.found.append((getattr(node, "lineno", 0), getattr(node, "col_offset", 0), description))
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
        if (
            isinstance(node.func, ast.Name)
            and node.func.id in UNWRAPPABLE
            and len(node.args) == 1
            and not node.keywords
            and self._point(node, f"{node.func.id}(x) -> x")
        ):
            return node.args[0]
        return node

    def visit_Constant(self, node: ast.Constant) -> ast.AST:
        value = node.value
        if isinstance(value, bool):
            if self._point(node, f"{value!r} -> {not value!r}"):
                return ast.copy_location(ast.Constant(value=not value), node)
            return node
        if not isinstance(value, int | float):
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

    def visit_BinOp(self, node: ast.BinOp) -> ast.AST:
        self.generic_visit(node)
        swap = ARITHMETIC_SWAPS.get(type(node.op))
        if swap is not None and self._point(node, f"{type(node.op).__name__} -> {swap.__name__}"):
            node.op = swap()
        return node

    def visit_AugAssign(self, node: ast.AugAssign) -> ast.AST:
        self.generic_visit(node)
        swap = ARITHMETIC_SWAPS.get(type(node.op))
        if swap is not None and self._point(node, f"{type(node.op).__name__}= -> {swap.__name__}="):
            node.op = swap()
        return node

    def visit_BoolOp(self, node: ast.BoolOp) -> ast.AST:
        self.generic_visit(node)
        other = ast.Or if isinstance(node.op, ast.And) else ast.And
        if self._point(node, f"{type(node.op).__name__} -> {other.__name__}"):
            node.op = other()
        return node

    def visit_UnaryOp(self, node: ast.UnaryOp) -> ast.AST:
        self.generic_visit(node)
        if isinstance(node.op, ast.Not) and self._point(node, "not x -> x"):
            return node.operand
        return node

    def visit_Subscript(self, node: ast.Subscript) -> ast.AST:
        self.generic_visit(node)
        index = node.slice
        if isinstance(index, ast.Slice):
            if index.lower is not None and self._point(node, "x[a:b] -> x[:b]"):
                index.lower = None
            if index.upper is not None and self._point(node, "x[a:b] -> x[a:]"):
                index.upper = None
        elif (
            isinstance(index, ast.UnaryOp)
            and isinstance(index.op, ast.USub)
            and isinstance(index.operand, ast.Constant)
            and index.operand.value == 1
            and self._point(node, "x[-1] -> x[0]")
        ):
            node.slice = ast.Constant(value=0)
        return node

    def _bodies(self, node: ast.AST) -> None:
        """Statement deletion: each statement of a body of two or more may become `pass`."""
        for name in ("body", "orelse", "finalbody"):
            body = getattr(node, name, None)
            if not isinstance(body, list) or len(body) < 2:
                continue
            for position, statement in enumerate(body):
                if isinstance(statement, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Pass):
                    continue
                if isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant):
                    continue  # a docstring
                if isinstance(statement, ast.Import | ast.ImportFrom) or (
                    isinstance(statement, ast.Assign | ast.AnnAssign) and isinstance(node, ast.Module)
                ):
                    continue  # module set-up: deleting it fails at import, which proves nothing
                if self._point(statement, f"delete {type(statement).__name__.lower()}"):
                    body[position] = ast.copy_location(ast.Pass(), statement)

    def generic_visit(self, node: ast.AST) -> ast.AST:
        if isinstance(node, BODIES):
            self._bodies(node)
        return super().generic_visit(node)

    def visit_Expr(self, node: ast.Expr) -> ast.AST:
        # Docstrings and bare expressions: nothing to mutate inside a docstring.
        if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            return node
        return self.generic_visit(node)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> ast.AST:
        return self.generic_visit(node)


def mutants_of(path: str) -> list[Mutant]:
    """The file's mutants; two alike on one line are told apart by their column (for EQUIVALENT)."""
    tree = ast.parse((ROOT / path).read_text())
    mutator = Mutator()
    mutator.visit(tree)
    alike = Counter((line, text) for line, _, text in mutator.found)
    return [
        Mutant(path, i, line, text if alike[line, text] == 1 else f"{text} (col {column})")
        for i, (line, column, text) in enumerate(mutator.found)
    ]


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
    # A fixed hypothesis seed: the same mutant gets the same examples on every run, so a
    # score never depends on which examples a property test happened to draw.
    (base / "pytest.ini").write_text(
        "[pytest]\naddopts = -p no:cacheprovider -p no:django -p no:randomly --hypothesis-seed=0\n"
    )
    return base


def run_tests(base: Path, tests: list[str] = TESTS) -> str:
    """'survived' when all pass; 'killed by <test>' when one fails; 'killed (timeout)' when too slow."""
    files = [f"mtests/{Path(t).name}" for t in tests]
    command = [sys.executable, "-m", "pytest", "-x", "-q", "--no-header", "-rfE", *files]
    try:
        done = subprocess.run(command, cwd=base, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        return "killed (timeout)"
    if done.returncode == 0:
        return "survived"
    if done.returncode in (1, 2, 3):
        # The first FAILED/ERROR line names the test that noticed (shown so a kill can be checked).
        culprit = next(
            (line.split()[1] for line in done.stdout.splitlines() if line.startswith(("FAILED ", "ERROR "))),
            "?",
        )
        return f"killed by {culprit.removeprefix('mtests/')}"
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
            verdict, _, detail = outcome.partition(" by ")
            print(
                f"{len(results):>4}/{len(mutants)} {verdict:<9} "
                f"{mutant.path}:{mutant.line} {mutant.description}" + (f"  [{detail}]" if detail else ""),
                flush=True,
            )

    def key(m: Mutant) -> tuple[str, int, str]:
        return (m.path, m.line, m.description)

    equivalent = [(m, o) for m, o in results if key(m) in EQUIVALENT]
    numerical = [(m, o) for m, o in results if key(m) in NUMERICAL]
    scored = [(m, o) for m, o in results if key(m) not in EQUIVALENT and key(m) not in NUMERICAL]
    killed = sum(1 for _, o in scored if o.startswith("killed"))
    print(f"\n{len(results)} mutants in {time.monotonic() - started:.0f} s")
    for path in TARGETS:
        mine = [(m, o) for m, o in scored if m.path == path]
        if mine:
            dead = sum(1 for _, o in mine if o.startswith("killed"))
            print(f"  {path:<26} {dead}/{len(mine)} killed")
    for title, group, reasons in (
        ("equivalent", equivalent, EQUIVALENT),
        ("numerical, below the solver's tolerance", numerical, NUMERICAL),
    ):
        print(f"{title} (excluded): {len(group)}")
        for m, outcome in group:
            stale = "  ** KILLED: check this entry **" if outcome.startswith("killed") else ""
            print(f"  {m.path}:{m.line} {m.description}: {reasons[key(m)]}{stale}")
    print(f"score: {killed}/{len(scored)} killed = {killed / max(1, len(scored)):.1%}")
    strict = killed + sum(1 for _, o in numerical if o.startswith("killed"))
    total = len(scored) + len(numerical)
    print(f"counting the numerical ones as survivors: {strict}/{total} = {strict / max(1, total):.1%}")


if __name__ == "__main__":
    main()
