"""The shape of the code: the layers of controller/ import one way, no import cycle in controller/ or
engines/, the master loads only the engines' torch-free modules, and light modules stay light.

The graph is read from the source (ast), not from a running interpreter, so an import
that only runs inside a function, or only for type checkers, counts as much as one at
the top: a cycle hidden behind a lazy import is still two modules that each need the
other.  Two kinds of import are left out, on purpose:

- a package's ``__init__`` is not an edge of every module inside it (Python runs it
  first, but that is how packages work, not a dependency one module chose); an import
  that names the package itself (``from controller import Cluster``) is an edge to it;
- modules named in strings (the provider registry's ``importlib.import_module``) are
  not followed: they are data, chosen at run time.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "controller"
PACKAGES = ("controller", "engines")

# The layers of controller/, from the front door down: a module may import its own layer and those below it,
# never one above. cluster may use providers and work; those two never import each other, nor the cluster.
LAYERS = {
    "front": ("controller", "controller.__main__", "controller.cli", "controller.logs", "controller.commands"),
    "api": ("controller.api",),
    "cluster": ("controller.cluster",),
    "providers": ("controller.providers",),
    "work": ("controller.work",),
    "ipp": ("controller.ipp",),
    "store": ("controller.store",),
    "config": ("controller.config",),
    "errors": ("controller.errors", "controller.formatting"),
    "engines": ("engines",),
}
MAY_IMPORT = {
    "front": set(LAYERS),
    "api": {"cluster", "providers", "work", "ipp", "store", "config", "errors", "engines"},
    "cluster": {"providers", "work", "ipp", "store", "config", "errors", "engines"},
    "providers": {"ipp", "store", "config", "errors", "engines"},
    "work": {"ipp", "store", "config", "errors", "engines"},
    "ipp": {"store", "config", "errors", "engines"},
    "store": {"errors", "engines"},
    "config": {"errors"},
    "errors": {"engines"},
    "engines": set(),
}
# the engines' modules the master may import: the torch-free wire types, the functions it sends by reference,
# and the engine process's own helpers (each imports torch only inside the functions that run on an engine)
MASTER_SIDE_ENGINES = ("engines", "engines.spec", "engines.tasks", "engines.held", "engines.process")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for package in PACKAGES for path in sorted((REPO / package).rglob("*.py"))}


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that the module ``name`` imports, anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def closest(target: str) -> None:
        # `import a.b.c` or `from a.b import c`: the deepest known module it names
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                closest(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                closest(submodule if submodule in known else source)
    return found


def import_graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imported(name, path, set(found)) for name, path in found.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each as a path that closes."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def test_the_graph_sees_relative_function_level_and_type_checking_imports():
    graph = import_graph()
    assert "controller.store" in graph["controller.api"]  # from .store import ... at the top
    assert "controller.api" in graph["controller"]  # inside the package's lazy __getattr__
    assert "controller.work.sweep.space" in graph["controller.work.bench.workloads"]  # from ..sweep.space
    assert "controller.ipp.processes" in graph["controller.ipp.launch"]
    assert "engines.loop" in graph["engines.workloads.mnist"] and "engines.spec" in graph["engines.loop"]


def test_no_module_under_controller_or_engines_imports_itself_back_through_others():
    found = cycles(import_graph())
    assert not found, "import cycles (each group's modules reach each other): " + "; ".join(
        " <-> ".join(group) for group in found
    )


def within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def layer_of(name: str) -> str:
    """The layer of a module: the one whose prefix names it most closely (``controller`` alone is the front)."""
    best, length = "", -1
    for layer, prefixes in LAYERS.items():
        for prefix in prefixes:
            if within(name, (prefix,)) and len(prefix) > length and (prefix != "controller" or name == "controller"):
                best, length = layer, len(prefix)
    return best


def test_every_module_belongs_to_a_layer():
    unplaced = sorted(name for name in import_graph() if not layer_of(name))
    assert not unplaced, f"modules in no layer of LAYERS: {unplaced}"


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    broken = []
    for name, targets in graph.items():
        mine = layer_of(name)
        for target in targets:
            theirs = layer_of(target)
            if theirs != mine and theirs not in MAY_IMPORT[mine]:
                broken.append(f"{name} ({mine}) imports {target} ({theirs})")
    return sorted(broken)


def test_the_layers_import_one_way_only():
    """cli -> api -> cluster -> {providers, work} -> ipp -> store/config -> errors -> the engines' spec."""
    broken = layer_violations(import_graph())
    assert not broken, "imports against the layers:\n" + "\n".join(broken)


def test_the_rules_catch_an_import_up_the_layers():
    graph = {
        "controller.work.scheduler": {"controller.cluster.keeper", "controller.ipp.client"},
        "controller.providers.ssh": {"controller.work.jobs"},
        "controller.store.runs": {"controller.config"},
        "controller.api": {"controller.cluster.handle"},
        "engines.loop": {"engines.spec"},
    }
    assert layer_violations(graph) == [
        "controller.providers.ssh (providers) imports controller.work.jobs (work)",
        "controller.store.runs (store) imports controller.config (config)",
        "controller.work.scheduler (work) imports controller.cluster.keeper (cluster)",
    ]
    assert layer_of("controller") == "front" and layer_of("controller.commands.train") == "front"


def test_the_engines_import_nothing_of_the_master():
    graph = import_graph()
    found = {
        name: sorted(t for t in targets if t.startswith("controller"))
        for name, targets in graph.items()
        if name.startswith("engines")
    }
    assert not {k: v for k, v in found.items() if v}, "a slave has no controller package"


def test_the_master_imports_only_the_engines_modules_that_leave_torch_alone():
    graph = import_graph()
    used = sorted(
        {
            target
            for name, targets in graph.items()
            if name.startswith("controller")
            for target in targets
            if target.startswith("engines") and not within(target, MASTER_SIDE_ENGINES)
        }
    )
    assert not used, f"the master imports engine modules that import torch: {used}"


@pytest.mark.parametrize(
    "module",
    [
        "engines.spec",
        "engines.tasks",
        "engines.held",
        "engines.process.stopping",
        "engines.process.notices",
        "engines.process.forkserver",
        "engines.process.startup",
    ],
)
def test_the_engines_modules_the_master_imports_do_not_load_torch(module):
    loaded = loaded_after(f"import {module}")
    assert "torch" not in loaded, f"{module} imports torch"


def test_the_store_sits_below_everything_but_errors_and_the_spec():
    """Subsystems read session -> their package -> store: the store never reaches back up."""
    graph = import_graph()
    above = {}
    for name, targets in graph.items():
        outside = {t for t in targets if not t.startswith("controller.store")} - {"controller.errors", "engines.spec"}
        if name.startswith("controller.store") and outside:
            above[name] = sorted(outside)
    assert not above, f"store modules import from above the store: {above}"


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def loaded_after(statement: str) -> set[str]:
    """Top-level package names (and controller modules) loaded by ``statement`` in a fresh interpreter."""
    program = (
        f"import sys\n{statement}\n"
        "print('\\n'.join(sorted(m for m in sys.modules if '.' not in m or m.startswith('controller.'))))"
    )
    result = subprocess.run(
        [sys.executable, "-c", program], cwd=REPO, capture_output=True, text=True, timeout=120, check=True
    )
    return set(result.stdout.split())


HEAVY = {"torch", "ipyparallel", "controller.work.scheduler", "zmq"}


@pytest.mark.parametrize(
    "statement",
    [
        "import controller.work.bench.report",
        "import controller.work.bench",
        "from controller.cli import build_parser; build_parser()",
    ],
)
def test_reports_and_the_argument_parser_import_neither_torch_nor_ipyparallel(statement):
    heavy = HEAVY & loaded_after(statement)
    assert not heavy, f"{statement!r} imports {sorted(heavy)}"


def session_members() -> set[str]:
    from controller.work.session import Session

    return {name for name in vars(Session) if not name.startswith("_")}


def test_runners_use_the_session_only_for_what_it_declares():
    used = set()
    for runner in ("work/bench/runner.py", "work/sweep/runner.py"):
        tree = ast.parse((REPO / PACKAGE / runner).read_text())
        used |= {
            node.attr
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "session"
        }
    assert used and used <= session_members(), f"not in Session: {sorted(used - session_members())}"


def test_the_cluster_api_is_a_session(tmp_path):
    import inspect

    from controller.api import Cluster
    from controller.config import load_config

    ini = tmp_path / "cluster.ini"
    ini.write_text(f"[cluster]\nstate_dir = {tmp_path / 'state'}\n")
    with Cluster(load_config(ini, environ={})) as cluster:
        missing = set()
        for name in session_members():  # statically: `record` and `client` need a running cluster
            try:
                inspect.getattr_static(cluster, name)
            except AttributeError:
                missing.add(name)
    assert not missing, f"Cluster lacks {sorted(missing)}"
