"""The ML core runs without FLARE: nothing in it may import nvflare or the project's FLARE layer (fedfms.flare),
directly or through other modules, at import time or later inside a function.

Two checks: a static one over the import graph of every module of the core (all ``import`` statements, those
inside functions too, followed through the project's own modules), which names the chain that reaches FLARE;
and importing the core in a fresh interpreter, which must leave nvflare and fedfms.flare out of sys.modules."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import fedfms

ROOT = Path(fedfms.__file__).resolve().parent  # custom/fedfms
# FLARE-free: these packages (every module in them) and modules
CORE_PACKAGES = ["fedfms.models", "fedfms.data", "fedfms.training", "fedfms.evaluation", "fedfms.nnunet"]
CORE_MODULES = ["fedfms.report", "fedfms.aggregation", "fedfms.run_record", "fedfms.capacity", "fedfms.flavours",
                "fedfms.tables", "fedfms.cli_tables", "fedfms.numbers", "fedfms.errors", "fedfms.config", "fedfms.processes",
                "fedfms.progress", "fedfms.bundle", "fedfms.model_card", "fedfms.cli_export"]
FORBIDDEN = ("nvflare", "fedfms.flare")

# imported at runtime in one interpreter (the static check covers every module; this one, real imports)
RUNTIME = ["fedfms.models", "fedfms.data.site_dataset", "fedfms.data.preparers.registry", "fedfms.training.trainer",
           "fedfms.training.metrics", "fedfms.training.predict", "fedfms.evaluation", "fedfms.evaluation.loso",
           "fedfms.evaluation.results", "fedfms.evaluation.protocol", "fedfms.evaluation.baselines", "fedfms.report",
           "fedfms.aggregation", "fedfms.run_record", "fedfms.capacity", "fedfms.bundle", "fedfms.model_card"]


def _modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = ["fedfms", *path.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imported_names(name: str, path: Path) -> set[str]:
    """Every module name an ``import`` anywhere in the file may load (``from a import b``: a and a.b)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return names


def _forbidden(name: str) -> bool:
    return any(name == f or name.startswith(f + ".") for f in FORBIDDEN)


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it loads (a module loads its parent packages too) and any forbidden name."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        deps = set()
        for imported in _imported_names(name, path):
            if _forbidden(imported):
                deps.add(imported)
            parts = imported.split(".")
            deps |= {m for m in (".".join(parts[:k]) for k in range(1, len(parts) + 1)) if m in modules}
        graph[name] = deps
    return graph


def flare_chain(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """The import chain from ``start`` to nvflare or fedfms.flare, or None when there is none."""
    came_from: dict[str, str | None] = {start: None}
    queue = [start]
    while queue:
        module = queue.pop(0)
        for dep in sorted(graph.get(module, ())):
            if dep in came_from:
                continue
            came_from[dep] = module
            if _forbidden(dep):
                chain = [dep]
                while came_from[chain[-1]] is not None:
                    chain.append(came_from[chain[-1]])
                return chain[::-1]
            queue.append(dep)
    return None


def core_modules(graph) -> list[str]:
    return sorted(m for m in graph if m in CORE_MODULES or any(m == p or m.startswith(p + ".") for p in CORE_PACKAGES))


def test_no_core_module_reaches_flare_through_its_imports():
    graph = import_graph()
    core = core_modules(graph)
    assert "fedfms.evaluation.loso" in core and "fedfms.training.trainer" in core  # the walk found the packages
    bad = {m: chain for m in core if (chain := flare_chain(graph, m))}
    assert not bad, "the ML core reaches FLARE:\n" + "\n".join(" -> ".join(chain) for chain in bad.values())


def test_the_static_check_sees_lazy_and_relative_imports(tmp_path):
    lazy = tmp_path / "lazy.py"
    lazy.write_text("def __getattr__(name):\n    from ..flare import jobs\n    import nvflare.fuel\n")
    names = _imported_names("fedfms.evaluation.lazy", lazy)
    assert {"fedfms.flare", "fedfms.flare.jobs", "nvflare.fuel"} <= names
    graph = {"fedfms.a": {"fedfms.b"}, "fedfms.b": {"fedfms.flare.jobs"}}
    assert flare_chain(graph, "fedfms.a") == ["fedfms.a", "fedfms.b", "fedfms.flare.jobs"]


def test_core_modules_do_not_import_flare_at_runtime():
    code = ";".join([f"import {m}" for m in RUNTIME] + [
        "import sys", "print(sorted(m for m in sys.modules if m.split('.')[0] == 'nvflare' or m.startswith('fedfms.flare')))"])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out.splitlines()[-1] == "[]", f"the ML core pulled in FLARE: {out}"
