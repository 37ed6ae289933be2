"""The package's layering, checked on its import graph (every ``import`` statement, those inside functions too).

- The ML core runs without FLARE: nothing in it may import nvflare or the project's FLARE layer (fedfms.flare),
  directly or through other modules, at import time or later inside a function. Checked statically (naming the
  chain that reaches FLARE) and by importing the core in a fresh interpreter.
- No module imports a module of a higher layer (:data:`LAYERS`, bottom first), and no modules import each other
  in a circle. Every module is placed in a layer, so a new one is placed on purpose.
- In the FLARE layer, no site component imports a server component (the sites and the server share only what
  both need: replies, update checks, task names)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import fedfms

ROOT = Path(fedfms.__file__).resolve().parent  # custom/fedfms
# FLARE-free: these packages (every module in them) and modules
CORE_PACKAGES = ["fedfms.models", "fedfms.data", "fedfms.training", "fedfms.evaluation", "fedfms.nnunet"]
CORE_MODULES = ["fedfms.reporting.run_report", "fedfms.aggregation", "fedfms.run_record", "fedfms.capacity", "fedfms.flavours",
                "fedfms.reporting.tables", "fedfms.numbers", "fedfms.errors", "fedfms.config", "fedfms.processes",
                "fedfms.progress", "fedfms.bundle", "fedfms.model_card", "fedfms.monai_import", "fedfms.ports"]
# (the `fedfms tables` and `fedfms export` commands import FLARE in no function they run:
# tests/test_layering_tables.py imports fedfms.cli.tables in a fresh interpreter)
FORBIDDEN = ("nvflare", "fedfms.flare")

# imported at runtime in one interpreter (the static check covers every module; this one, real imports)
RUNTIME = ["fedfms.models", "fedfms.data.site_dataset", "fedfms.data.preparers.registry", "fedfms.training.trainer",
           "fedfms.training.metrics", "fedfms.training.predict", "fedfms.evaluation", "fedfms.evaluation.loso",
           "fedfms.evaluation.results", "fedfms.evaluation.baselines", "fedfms.reporting.run_report",
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



def _monai_modules_after(code: str) -> list[str]:
    """The MONAI modules a fresh interpreter holds after running ``code``."""
    code += "; import sys; print(sorted(m for m in sys.modules if m.split('.')[0] == 'monai'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    return eval(out.splitlines()[-1])


def test_a_sam_jobs_server_components_do_not_import_monai():
    """Every FLARE job process pays for what it imports: MONAI costs ~4 CPU-s and 230 MB per process on top of torch,
    and the server of a SAM job (persistor model, aggregation, checks) needs none of it; sites import it to train."""
    import json

    from fedfms.flare.jobs import components

    modules = set()
    for config in (Path(__file__).resolve().parents[1] / "jobs").glob("*/app*/config/config_fed_server.json"):
        if "unet" not in config.parts[-4]:  # nnU-Net and the U-Net baseline build MONAI networks on the server
            modules |= {path.rsplit(".", 1)[0] for path, _ in components(json.loads(config.read_text()))}
    assert "fedfms.flare.global_model" in modules, sorted(modules)
    code = "; ".join([f"import {m}" for m in sorted(modules)] + [
        "from fedfms.flare.global_model import TravelSetModel",
        "TravelSetModel(variant='tiny', mode='fedmsa', num_classes=1, pretrained=False, init_seed=0)"])
    assert _monai_modules_after(code) == [], "a SAM job's server imported MONAI"


def test_the_fedfms_command_parser_does_not_import_monai():
    """`fedfms --help` and every command that needs no training or metrics (job, report, simulate's own set-up) stay
    free of MONAI's import (~4 CPU-s per process); the commands that train import it when they run."""
    assert _monai_modules_after("import fedfms.cli; fedfms.cli.build_parser()") == [], "building the parser imported MONAI"


# bottom first; a module belongs to the layer of the longest prefix that names it (itself or a package above it)
LAYERS = [
    ("helpers", ["fedfms", "fedfms.errors", "fedfms.numbers", "fedfms.config", "fedfms.progress", "fedfms.run_record",
                 "fedfms.aggregation", "fedfms.capacity", "fedfms.processes", "fedfms.monai_import", "fedfms.ports",
                 "fedfms.overlays"]),  # numpy drawing, for `fedfms predict --overlay` and the reports alike
    ("models and data", ["fedfms.models", "fedfms.data"]),
    ("training", ["fedfms.training", "fedfms.flavours"]),
    ("nnunet", ["fedfms.nnunet"]),
    ("evaluation", ["fedfms.evaluation"]),
    ("reporting", ["fedfms.reporting"]),
    # what FLARE instantiates and runs at the sites and the server
    ("flare runtime", ["fedfms.flare.site_config", "fedfms.flare.liveness", "fedfms.flare.update_check", "fedfms.flare.replies",
                       "fedfms.flare.nnunet_tasks", "fedfms.flare.site_progress", "fedfms.flare.executor", "fedfms.flare.filters",
                       "fedfms.flare.he", "fedfms.flare.nnunet_executor", "fedfms.flare.job_guard", "fedfms.flare.global_model",
                       "fedfms.flare.scatter_gather", "fedfms.flare.robust_aggregator", "fedfms.flare.contribution_filter",
                       "fedfms.flare.monitor", "fedfms.flare.personalise", "fedfms.flare.nnunet_planning",
                       "fedfms.flare.he_server",
                       "fedfms.flare.site_forkserver"]),  # starts the simulated sites' processes (stdlib only)
    # the settings of a job and the builder that makes it from them
    ("flare job building", ["fedfms.flare.jobs", "fedfms.flare.he_job", "fedfms.flare.nnunet_job", "fedfms.flare.fed_job"]),
    ("flare running", ["fedfms.flare", "fedfms.flare.simulate", "fedfms.flare.recipe", "fedfms.flare.loso_runner"]),
    ("applications", ["fedfms.deploy", "fedfms.site_check", "fedfms.demo", "fedfms.bundle", "fedfms.model_card"]),
    ("command line", ["fedfms.cli"]),
]
SITE_COMPONENTS = ["fedfms.flare.executor", "fedfms.flare.nnunet_executor", "fedfms.flare.filters", "fedfms.flare.he",
                   "fedfms.flare.site_progress", "fedfms.flare.job_guard"]
SERVER_COMPONENTS = ["fedfms.flare.contribution_filter", "fedfms.flare.monitor", "fedfms.flare.personalise",
                     "fedfms.flare.nnunet_planning", "fedfms.flare.he_server", "fedfms.flare.robust_aggregator",
                     "fedfms.flare.scatter_gather", "fedfms.flare.global_model"]


def module_imports(name: str, path: Path, modules) -> dict[str, int]:
    """The project modules the file imports (each with the line of its first import): ``from a import b`` is
    module a.b when that is a module, else a (a name from a's ``__init__``); ``import a.b`` is a.b."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        for target in targets:
            while target and target not in modules:  # import a.b.c of a name in a.b
                target = target.rpartition(".")[0]
            if target and target != name:
                found.setdefault(target, node.lineno)
    return found


def module_graph() -> dict[str, dict[str, int]]:
    modules = _modules()
    return {name: module_imports(name, path, modules) for name, path in modules.items()}


def layer_of(module: str) -> int | None:
    best, layer = -1, None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, layer = len(prefix), index
    return layer


def upward_imports(graph) -> list[str]:
    bad = []
    for module, deps in sorted(graph.items()):
        for dep, line in sorted(deps.items()):
            if layer_of(dep) > layer_of(module):
                bad.append(f"{module} (line {line}, layer {LAYERS[layer_of(module)][0]!r}) imports {dep} "
                           f"(layer {LAYERS[layer_of(dep)][0]!r})")
    return bad


def import_cycles(graph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in module_graph() if layer_of(m) is None)
    assert not unplaced, f"modules in no layer of LAYERS (place each one): {unplaced}"


def test_no_module_imports_a_higher_layer():
    bad = upward_imports(module_graph())
    assert not bad, "imports from a lower layer to a higher one:\n" + "\n".join(bad)


def test_no_modules_import_each_other_in_a_circle():
    cycles = import_cycles({m: set(deps) for m, deps in module_graph().items()})
    assert not cycles, "modules that import each other in a circle:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_no_site_component_imports_a_server_component():
    graph = module_graph()
    bad = [f"{site} (line {graph[site][dep]}) imports {dep}" for site in SITE_COMPONENTS for dep in graph[site]
           if dep in SERVER_COMPONENTS]
    assert not bad, "site components import server components:\n" + "\n".join(bad)


def test_the_layer_checks_see_what_they_forbid(tmp_path):
    lazy = tmp_path / "lazy.py"
    lazy.write_text("import os\ndef f():\n    from .. import cli\n    from fedfms.evaluation import centralized, collect\n")
    modules = {"fedfms.cli": None, "fedfms.evaluation": None, "fedfms.evaluation.centralized": None, "fedfms.nnunet.lazy": None}
    assert module_imports("fedfms.nnunet.lazy", lazy, modules) == {
        "fedfms.cli": 3, "fedfms.evaluation.centralized": 4, "fedfms.evaluation": 4}
    graph = {"fedfms.nnunet.lazy": {"fedfms.cli": 3}, "fedfms.cli": {}}
    assert upward_imports(graph) == ["fedfms.nnunet.lazy (line 3, layer 'nnunet') imports fedfms.cli (layer 'command line')"]
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer_of("fedfms.flare.he_job") == layer_of("fedfms.flare.jobs") > layer_of("fedfms.flare.he")
