"""The shape of the code: no import cycle under controller/, and light modules stay light.

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


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted((REPO / PACKAGE).rglob("*.py"))}


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
                base = base[:len(base) - (node.level - 1)]
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


def test_no_module_under_controller_imports_itself_back_through_others():
    found = cycles(import_graph())
    assert not found, "import cycles (each group's modules reach each other): " + "; ".join(
        " <-> ".join(group) for group in found)


def test_the_store_sits_below_everything_but_its_schema_and_errors():
    """Subsystems read session -> their package -> store: the store never reaches back up."""
    graph = import_graph()
    allowed = {"controller.store.schema", "controller.errors"}
    above = {}
    for name, targets in graph.items():
        outside = {t for t in targets if not t.startswith("controller.store")} - allowed
        if name.startswith("controller.store") and outside:
            above[name] = sorted(outside)
    assert not above, f"store modules import from above the store: {above}"


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def loaded_after(statement: str) -> set[str]:
    """Top-level package names (and controller modules) loaded by ``statement`` in a fresh interpreter."""
    program = (f"import sys\n{statement}\n"
               "print('\\n'.join(sorted(m for m in sys.modules if '.' not in m or m.startswith('controller.'))))")
    result = subprocess.run([sys.executable, "-c", program], cwd=REPO, capture_output=True, text=True,
                            timeout=120, check=True)
    return set(result.stdout.split())


HEAVY = {"torch", "ipyparallel", "controller.work.scheduler", "zmq"}


@pytest.mark.parametrize("statement", [
    "import controller.work.bench.report",
    "import controller.work.bench",
    "from controller.cli import build_parser; build_parser()",
])
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
        used |= {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
                 and isinstance(node.value, ast.Name) and node.value.id == "session"}
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
