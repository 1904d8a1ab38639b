"""The package layout is the architecture, computed from the code: no import cycles, between packages or
between modules, and every import goes down a declared layer order. The front (serving) never reaches the model
layer or TensorFlow, which live in the model service alone.

Checked statically, from every import statement of every module (function-level imports too, since the code
imports heavy libraries lazily), and dynamically, by importing the serving side in a fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Lowest first. A module may import its own package and the packages of lower layers; packages in one layer are
# independent of each other. `osteoscreen.cli` and `service.py` are the applications on top.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("osteoscreen", "osteoscreen._generated"),  # the package's version; the stubs the build generates
    ("osteoscreen.types",),
    ("osteoscreen.errors",),
    ("osteoscreen.settings", "osteoscreen.codegen"),
    ("osteoscreen.resources",),
    ("osteoscreen.security",),
    ("osteoscreen.imaging",),
    ("osteoscreen.intended_use",),
    ("osteoscreen.results",),
    ("osteoscreen.explain", "osteoscreen.dicom_results"),
    ("osteoscreen.model", "osteoscreen.client"),
    ("osteoscreen.serving", "training"),
    ("osteoscreen.screening",),  # batch screening on Ray: the model in its actors, the node's store-back
    ("osteoscreen.cli", "service"),
)
# The front's processes must start without TensorFlow (the model service holds it and the GPU), so these never
# import the model layer or a deep-learning framework, however far below them it sits in the layer order.
TENSORFLOW_FREE = ("osteoscreen.imaging", "osteoscreen.intended_use", "osteoscreen.results", "osteoscreen.explain",
                   "osteoscreen.dicom_results", "osteoscreen.serving", "osteoscreen.client")
FRAMEWORKS = ("tensorflow", "keras", "osteoscreen.model")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    paths = [REPO / "service.py", *(p for root in ("osteoscreen", "training") for p in (REPO / root).rglob("*.py"))]
    return {module_name(p): p for p in sorted(paths) if "_generated" not in p.parts}


def imported_modules(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module an import statement in `source` names (relative imports resolved against `module`)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join([*package, base] if base else package)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return found


def layer_of(module: str) -> tuple[int, str] | None:
    """(rank, package) of the longest declared package that holds `module`."""
    best = None
    for rank, packages in enumerate(LAYERS):
        for package in packages:
            if (module == package or module.startswith(package + ".")) and (best is None or len(package) > len(best[1])):
                best = (rank, package)
    return best


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    own = layer_of(module)
    assert own is not None, f"{module} is in no declared layer"
    out = []
    for name in sorted(imported_modules(source, module, is_package)):
        if own[1] in TENSORFLOW_FREE and any(name == f or name.startswith(f + ".") for f in FRAMEWORKS):
            out.append(f"{module} imports {name}: {own[1]} must run without TensorFlow and the model layer")
        target = layer_of(name)
        if target is None or target[1] == own[1] or target[1] == "osteoscreen" and name != "osteoscreen":
            continue  # outside the project, or within one package
        if target[0] >= own[0]:
            out.append(f"{module} imports {name}: {own[1]} (layer {own[0]}) may only import lower layers, not "
                       f"{target[1]} (layer {target[0]})")
    return out


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    graph = {}
    for name, path in modules.items():
        names = imported_modules(path.read_text(), name, path.name == "__init__.py")
        graph[name] = {n for n in names if n in modules and n != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                item = stack.pop()
                on_stack.discard(item)
                component.append(item)
                if item == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    def package(module: str) -> str:
        return layer_of(module)[1]

    out: dict[str, set[str]] = {}
    for module, targets in graph.items():
        out.setdefault(package(module), set()).update(package(t) for t in targets if package(t) != package(module))
    return out


def test_every_import_goes_down_the_layers():
    problems = [v for name, path in project_modules().items()
                for v in violations(path.read_text(), name, path.name == "__init__.py")]
    assert not problems, "\n".join(problems)


def test_no_import_cycles_between_modules_or_packages():
    graph = import_graph()
    assert not cycles(graph), f"module cycles: {cycles(graph)}"
    packages = package_graph(graph)
    assert not cycles(packages), f"package cycles: {cycles(packages)}"


def test_every_module_has_a_layer():
    assert [m for m in project_modules() if layer_of(m) is None] == []


@pytest.mark.parametrize(("module", "source"), [
    ("osteoscreen.imaging.decode", "def f():\n    from osteoscreen.serving import metrics\n"),
    ("osteoscreen.imaging.decode", "from osteoscreen.model.specs import BACKBONE_NAMES\n"),
    ("osteoscreen.model.bundle", "import osteoscreen.serving.inference\n"),
    ("osteoscreen.serving.grpc.v2", "def f():\n    import tensorflow as tf\n"),
    ("osteoscreen.serving.http", "from osteoscreen.model import bundle\n"),
    ("osteoscreen.serving.grpc.screening", "from ...model.bundle import load\n"),
    ("osteoscreen.dicom_results.sc", "from osteoscreen.explain import overlay\n"),  # one layer: independent
    ("training.train", "from osteoscreen import serving\nfrom osteoscreen.serving import inference\n"),
    ("osteoscreen.types", "from osteoscreen.errors import ImageDecodeError\n"),
])
def test_a_forbidden_import_is_caught(module, source):
    assert violations(source, module), f"{source!r} in {module} should break a layering rule"


def test_allowed_imports_pass():
    assert not violations("from osteoscreen.types import INPUT_SIZE\nimport numpy\n", "osteoscreen.imaging.decode")
    assert not violations("from osteoscreen.serving import metrics\nimport grpc\n", "osteoscreen.serving.grpc.server")
    assert not violations("from . import metrics\n", "osteoscreen.serving", is_package=True)


def test_a_cycle_is_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_serving_side_never_loads_tensorflow():
    """Importing every adapter and the inference path leaves TensorFlow unloaded (transitive imports too)."""
    modules = [module_name(p) for p in (REPO / "osteoscreen" / "serving").rglob("*.py")]
    code = ("import importlib, sys\n"
            f"for m in {modules!r}:\n    importlib.import_module(m)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]", f"serving imports loaded {result.stdout.strip()}"


def test_every_package_says_what_it_holds():
    for init in sorted((REPO / "osteoscreen").rglob("__init__.py")):
        if "_generated" in init.parts:
            continue
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc.split()) >= 10, f"{init.relative_to(REPO)} needs a docstring saying what it holds"
