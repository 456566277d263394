"""The direction of imports: the core package never imports the Shapes miniature (``omnigen2.shapes``).

Shapes plugs into the core through names a checkpoint gives in model_index.json (entry points, see
``omnigen2.loading.NAMED_KEYS``); only the miniature itself and the ShapesBench module may import it. Every module
under src/omnigen2 is parsed (no import runs), every import statement read, at any depth (inside functions too),
relative ones resolved against the module's package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
FORBIDDEN = "omnigen2.shapes"
ALLOWED = ("omnigen2.shapes", "omnigen2.eval.shapesbench")  # the miniature and its benchmark


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def imported_names(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, dotted name) of everything ``source`` (the module ``module``) imports: ``import a.b`` gives a.b,
    ``from a import b`` gives a and a.b (b may be a module), relative imports resolved; ``importlib.import_module``
    and ``__import__`` of a constant string count too."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - (node.level - 1)]
                base_name = ".".join([*base, *([node.module] if node.module else [])])
            else:
                base_name = node.module
            found.append((node.lineno, base_name))
            found += [(node.lineno, f"{base_name}.{alias.name}") for alias in node.names if alias.name != "*"]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def shapes_imports(source: str, module: str, is_package: bool = False) -> list[str]:
    """The imports of ``omnigen2.shapes`` in ``source``, as "line N: name"."""
    return [
        f"line {line}: {name}" for line, name in imported_names(source, module, is_package) if _within(name, FORBIDDEN)
    ]


def modules() -> list[tuple[str, Path]]:
    found = []
    for path in sorted((SRC / "omnigen2").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        found.append((".".join(parts), path))
    return found


def test_core_does_not_import_shapes():
    offending = {}
    for module, path in modules():
        name = module.removesuffix(".__init__")
        if any(_within(name, allowed) for allowed in ALLOWED):
            continue
        hits = shapes_imports(path.read_text(), name, is_package=path.name == "__init__.py")
        if hits:
            offending[str(path.relative_to(SRC))] = hits
    assert not offending, f"modules outside omnigen2.shapes and ShapesBench import it: {offending}"
    assert len(modules()) > 20  # the walk found the package


@pytest.mark.parametrize(
    ("source", "module"),
    [
        ("import omnigen2.shapes", "omnigen2.cli"),
        ("import omnigen2.shapes.judge as j", "omnigen2.cli"),
        ("from omnigen2.shapes.tasks import MATCHES", "omnigen2.pipelines.pipeline_chat"),
        ("from omnigen2 import shapes", "omnigen2.cli"),
        ("from ..shapes.judge import verdict_of", "omnigen2.pipelines.pipeline_chat"),
        ("from .. import shapes", "omnigen2.pipelines.pipeline_chat"),
        ("from .shapes import grammar", "omnigen2.loading"),
        ("def f():\n    if True:\n        from ..shapes.grammar import in_grammar\n", "omnigen2.pipelines.x"),
        ("import importlib\nimportlib.import_module('omnigen2.shapes.protocol')", "omnigen2.loading"),
    ],
)
def test_checker_finds_shapes_imports(source, module):
    assert shapes_imports(source, module), source


def test_checker_resolves_package_relative_imports():
    assert shapes_imports("from .shapes import protocol", "omnigen2", is_package=True)
    assert shapes_imports("from ..shapes import world", "omnigen2.eval", is_package=True)
    assert not shapes_imports("from .shapes import x", "omnigen2.eval", is_package=True)  # omnigen2.eval.shapes


@pytest.mark.parametrize(
    ("source", "module"),
    [
        ("from .eval.shapesbench import evaluate_model", "omnigen2.cli"),  # ShapesBench, lazily in the CLI
        ("from . import shapesbench as sb", "omnigen2.eval.other"),
        ("import omnigen2.shapes_extra", "omnigen2.cli"),
        ("from .reflection import PROMPTED", "omnigen2.pipelines.pipeline_chat"),
        ("x = 'omnigen2.shapes'", "omnigen2.loading"),  # a string is not an import
    ],
)
def test_checker_passes_other_imports(source, module):
    assert not shapes_imports(source, module), source
