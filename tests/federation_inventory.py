"""Count the assertions of the tests that exercise a federation (FLARE simulator, POC or provisioned kits).

    python tests/federation_inventory.py            # markdown table: test, assertions, federations it starts
    python tests/federation_inventory.py --total    # one line per file and the grand total

An assertion is one ``assert`` statement, one call of an ``assert*`` function (``np.testing.assert_allclose``,
a module's ``assert_close``) or one ``pytest.raises``, counted where it is written (once, also inside a loop).
Counted in the test function and in the module's own helper functions whose names start with ``check_``, which
the shared-federation tests use to keep one scenario's assertions together (tests/README.md). A test exercises a
federation when it is marked ``integration`` and it, or a fixture of its module that it uses, calls one of
FEDERATION_CALLS or names one of FEDERATION_COMMANDS."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
# calls that start a federation: the simulator, a LOSO fold, the demo, a POC/provisioned federation
FEDERATION_CALLS = {"run_simulation", "simulate", "leave_one_site_out", "cycle", "start", "start_kit", "run_cli",
                    "simulator_run"}
# CLI invocations (main([...]), subprocess commands) whose first word starts a federation
FEDERATION_COMMANDS = {"simulate", "loso", "demo", "--simulate"}


def _name(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Name):
        return node.id
    return ""


def count_assertions(node: ast.AST) -> int:
    n = 0
    for sub in ast.walk(node):
        if isinstance(sub, ast.Assert):
            n += 1
        elif isinstance(sub, ast.Call):
            name = _name(sub.func)
            if name.startswith("assert") or name == "raises":
                n += 1
    return n


def starts_federation(node: ast.AST, calls: set[str] = FEDERATION_CALLS) -> bool:
    for sub in ast.walk(node):
        if isinstance(sub, ast.Call) and _name(sub.func) in calls:
            return True
        if isinstance(sub, ast.Constant) and sub.value in FEDERATION_COMMANDS:
            return True
    return False


def _fixtures_used(fn: ast.FunctionDef) -> set[str]:
    """Its arguments and the names it asks ``request.getfixturevalue`` for."""
    names = {a.arg for a in fn.args.args}
    for sub in ast.walk(fn):
        if isinstance(sub, ast.Call) and _name(sub.func) == "getfixturevalue" and sub.args \
                and isinstance(sub.args[0], ast.Constant):
            names.add(sub.args[0].value)
    return names


def _cases(fn: ast.FunctionDef) -> int:
    """How many test items a function makes (the product of its parametrize lists' lengths)."""
    n = 1
    for d in fn.decorator_list:
        if isinstance(d, ast.Call) and _name(d.func) == "parametrize" and len(d.args) > 1 and isinstance(d.args[1], (ast.List, ast.Tuple)):
            n *= len(d.args[1].elts)
    return n


def _marked_integration(node: ast.AST) -> bool:
    return any(isinstance(sub, ast.Attribute) and sub.attr == "integration" for sub in ast.walk(node))


def inventory(root: Path = TESTS) -> list[dict]:
    """One row per test function that exercises a federation, under ``root`` (a tests folder)."""
    rows = []
    for path in sorted(root.rglob("test_*.py")):
        tree = ast.parse(path.read_text())
        module_marked = any(isinstance(n, ast.Assign) and any(_name(t) == "pytestmark" for t in n.targets)
                            and _marked_integration(n) for n in tree.body)
        functions = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        # helpers a test calls: module functions starting check_ (their assertions count for the caller)
        checks = {name: fn for name, fn in functions.items() if name.startswith("check_")}
        fixtures = {name: fn for name, fn in functions.items()
                    if any(_name(d.func if isinstance(d, ast.Call) else d) == "fixture" for d in fn.decorator_list)}
        # the module's own helpers that start one (a federation shared by several tests is built by one)
        calls = FEDERATION_CALLS | {n for n, fn in functions.items() if not n.startswith("test_") and starts_federation(fn)}
        for name, fn in functions.items():
            if not name.startswith("test_"):
                continue
            if not (module_marked or any(_marked_integration(d) for d in fn.decorator_list)):
                continue
            args = _fixtures_used(fn)
            used = [fixtures[a] for a in args if a in fixtures]
            federation = starts_federation(fn, calls) or any(starts_federation(f, calls) for f in used)
            if not federation:
                continue
            called = {_name(c.func) for c in ast.walk(fn) if isinstance(c, ast.Call)}
            asserts = count_assertions(fn) + sum(count_assertions(checks[c]) for c in called if c in checks)
            rows.append({"test": f"{path.relative_to(root)}::{name}", "asserts": asserts, "cases": _cases(fn),
                         "fixtures": sorted(a for a in args if a in fixtures)})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--total", action="store_true", help="per-file sums and the total only")
    ap.add_argument("--root", type=Path, default=TESTS, help="the tests folder to read (default: this one)")
    args = ap.parse_args(argv)
    rows = inventory(args.root)
    if args.total:
        files: dict[str, int] = {}
        for r in rows:
            file = r["test"].split("::")[0]
            files[file] = files.get(file, 0) + r["asserts"]
        for file, n in files.items():
            print(f"{n:5d}  {file}")
    else:
        print("| test | cases | assertions | fixtures |\n|---|---:|---:|---|")
        for r in rows:
            print(f"| `{r['test']}` | {r['cases']} | {r['asserts']} | {', '.join(r['fixtures']) or '-'} |")
    print(f"total: {sum(r['asserts'] for r in rows)} assertions in {len(rows)} test functions "
          f"({sum(r['cases'] for r in rows)} test cases; {sum(r['asserts'] * r['cases'] for r in rows)} assertions x cases)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
