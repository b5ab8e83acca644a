"""The core's modules form layers: each imports only the layers below it, type hints included."""

from __future__ import annotations

import ast
from pathlib import Path

import alchemy_scope

PACKAGE = Path(alchemy_scope.__file__).parent
# Bottom to top; ARCHITECTURE.md draws the same picture.
LAYERS = [
    "_errors",
    "_aiosqlite",
    "_scope",
    "_insight",
    "_shared",
    "_guard",
    "_lifecycle",
    "_replicas",
    "_pgbouncer",
    "_database",
    "_middleware",
    "pytest_plugin",
    "__init__",
]


def imported_modules(path: Path) -> set[str]:
    """The alchemy_scope modules that ``path`` imports, under TYPE_CHECKING too."""
    imported: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module is None:
                imported.update(alias.name for alias in node.names)
            else:
                imported.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("alchemy_scope."):
            imported.add((node.module or "").split(".")[1])
    return imported


def test_every_core_module_has_a_layer() -> None:
    """A new module gets a place in the layers before it is used."""
    assert {path.stem for path in PACKAGE.glob("*.py")} == set(LAYERS)


def test_modules_import_only_the_layers_below_them() -> None:
    """No import circle, not even a type-level one: each module imports only lower layers."""
    for rank, name in enumerate(LAYERS):
        below = set(LAYERS[:rank])
        upward = imported_modules(PACKAGE / f"{name}.py") - below
        assert not upward, f"{name} imports {sorted(upward)} from its own layer or above"
