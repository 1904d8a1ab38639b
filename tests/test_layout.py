"""The package layout is the architecture: imaging and model never reach into serving, and the serving side
(inference path and protocol adapters) never loads TensorFlow, which lives in the model service alone.

Checked twice: statically, every import statement of every module (function-level imports too, since the
code imports heavy libraries lazily), and dynamically, by importing the adapters in a fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# package (as a module prefix) -> module prefixes it must never import
RULES: dict[str, tuple[str, ...]] = {
    "osteoscreen.imaging": ("osteoscreen.serving", "tensorflow", "keras", "training"),
    "osteoscreen.model": ("osteoscreen.serving", "training"),
    "osteoscreen.dicom_results": ("osteoscreen.serving", "osteoscreen.model", "tensorflow", "keras", "training"),
    "osteoscreen.serving": ("tensorflow", "keras", "osteoscreen.model", "training"),
    "osteoscreen.explain": ("osteoscreen.serving", "tensorflow", "keras", "training"),
    "training": ("osteoscreen.serving",),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, module: str) -> set[str]:
    """Every module an import statement in `source` names (relative imports resolved against `module`)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".")[: -node.level] if module else []
                base = ".".join([*package, base] if base else package)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return found


def violations(source: str, module: str) -> list[str]:
    out = []
    for package, forbidden in RULES.items():
        if module == package or module.startswith(package + "."):
            for name in sorted(imported_modules(source, module)):
                hit = next((f for f in forbidden if name == f or name.startswith(f + ".")), None)
                if hit:
                    out.append(f"{module} imports {name} ({package} must not import {hit})")
    return out


def project_modules() -> list[Path]:
    return sorted(p for root in ("osteoscreen", "training") for p in (REPO / root).rglob("*.py")
                  if "_generated" not in p.parts)


def test_layers_hold_for_every_module():
    problems = [v for path in project_modules() for v in violations(path.read_text(), module_name(path))]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(("module", "source"), [
    ("osteoscreen.imaging.decode", "def f():\n    from osteoscreen.serving import metrics\n"),
    ("osteoscreen.model.bundle", "import osteoscreen.serving.inference\n"),
    ("osteoscreen.serving.grpc.v2", "def f():\n    import tensorflow as tf\n"),
    ("osteoscreen.serving.http", "from osteoscreen.model import bundle\n"),
    ("osteoscreen.serving.grpc.screening", "from ...model.bundle import load\n"),
    ("training.train", "from osteoscreen import serving\nfrom osteoscreen.serving import inference\n"),
])
def test_a_forbidden_import_is_caught(module, source):
    assert violations(source, module), f"{source!r} in {module} should break a layering rule"


def test_allowed_imports_pass():
    assert not violations("from osteoscreen.model.specs import INPUT_SIZE\nimport numpy\n", "osteoscreen.imaging.decode")
    assert not violations("from osteoscreen.serving import metrics\nimport grpc\n", "osteoscreen.serving.grpc.server")


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
