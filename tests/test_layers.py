"""The package's layers: every import points down, and the core needs no evaluation packages."""

import ast
import subprocess
import sys
from pathlib import Path

import diffopt

PACKAGE = Path(diffopt.__file__).parent
CORE = (
    "util",
    "ir",
    "quant",
    "capture",
    "passes",
    "runtime",
    "sampling",
    "measure",
    "export",
    "optimize",
    "pipelines",
    "serving",
)
# what each layer may import (besides itself); anything not listed is refused
CORE_TOOLS = {"util", "ir", "quant", "capture", "passes", "runtime", "sampling", "measure", "export", "optimize"}
ALLOWED = {
    "version": set(),
    "util": set(),
    "ir": {"util"},
    "quant": {"util", "ir"},
    "capture": {"util", "ir"},
    "passes": {"util", "ir", "quant"},
    "runtime": {"util", "ir"},
    "sampling": {"util", "ir", "runtime"},
    "measure": {"util", "ir", "quant", "passes", "runtime", "sampling"},
    "export": {"util", "ir", "quant", "runtime"},
    "optimize": {"util", "ir", "capture", "passes", "runtime"},
    "pipelines": CORE_TOOLS - {"quant"},
    "models": {"util", "ir", "runtime", "sampling"},
    "evaluation": CORE_TOOLS | {"models"},
    "serving": {"util", "ir", "runtime", "sampling", "passes", "pipelines"},
    "cli": CORE_TOOLS | {"pipelines", "serving", "models", "evaluation"},
    "__init__": {"util", "ir", "capture", "passes", "runtime", "sampling", "measure", "optimize", "pipelines"},
}


def _layer(module: str) -> str:
    """``diffopt.passes.base`` -> ``passes``."""
    return module.split(".")[1] if module.count(".") else "__init__"


def _imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
    return [name for name in found if name == "diffopt" or name.startswith("diffopt.")]


def test_every_import_points_down_the_layers():
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(("diffopt", *path.relative_to(PACKAGE).with_suffix("").parts))
        layer = _layer(module.removesuffix(".__init__"))
        assert layer in ALLOWED, f"{module} is in no known layer: add it to ALLOWED"
        for imported in _imports(path):
            target = _layer(imported)
            if target not in (layer, "version") and target not in ALLOWED[layer]:
                wrong.append(f"{module} imports {imported}")
    assert not wrong, "imports that run against the layers:\n" + "\n".join(wrong)


def test_the_core_imports_without_scikit_learn_or_scipy():
    script = (
        "import sys, importlib, pkgutil\n"
        "for blocked in ('sklearn', 'scipy', 'matplotlib', 'ray'): sys.modules[blocked] = None\n"
        "import diffopt\n"
        f"core = {CORE!r}\n"
        "for info in pkgutil.walk_packages(diffopt.__path__, 'diffopt.'):\n"
        "    if info.name.split('.')[1] in core: importlib.import_module(info.name)\n"
        "print('imported', sorted(m for m in sys.modules if m.startswith('diffopt.')).__len__())\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout.split()[-1]) > 30  # the core modules really were imported


def test_the_tree_follows_the_ruff_config():
    root = PACKAGE.parent
    for command in (["check", "."], ["format", "--check", "."]):
        result = subprocess.run(
            [sys.executable, "-m", "ruff", *command], cwd=root, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, f"ruff {' '.join(command)}:\n{result.stdout[-3000:]}{result.stderr[-1000:]}"
