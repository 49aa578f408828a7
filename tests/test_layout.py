"""The package layout: imports flow one way, and no module borrows another's private names."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "fxsparse"
# The pipeline, in order: each may import only those before it.
PIPELINE = ("fxsparse._errors", "fxsparse._plan", "fxsparse._capture", "fxsparse._rewrite", "fxsparse._emit")
# What the user-facing packages and the command line build on; the core never imports them.
OUTSIDE_THE_CORE = (
    "fxsparse.masks",
    "fxsparse.structured",
    "fxsparse.viz",
    "fxsparse._cli",
    "fxsparse._demo",
    "fxsparse.__main__",
)


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(name: str, path: Path) -> list[tuple[str, str | None]]:
    """(module, imported name or None) for each import in the file, relative ones resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(part for part in (base, node.module or "") if part)
            found += [(module, alias.name) for alias in node.names]
    return found


def test_no_module_imports_a_private_name_of_another() -> None:
    modules = _modules()
    borrowed = []
    for name, path in modules.items():
        for module, imported in _imports(name, path):
            if not module.startswith("fxsparse") or imported is None or module == name:
                continue
            is_module = f"{module}.{imported}" in modules
            if imported.startswith("_") and not imported.startswith("__") and not is_module:
                borrowed.append(f"{name} imports {imported} from {module}")
    assert not borrowed, "make a shared name public within the package (no underscore):\n" + "\n".join(borrowed)


def test_imports_flow_one_way() -> None:
    modules = _modules()
    backwards = []
    for name, path in modules.items():
        targets = set()
        for module, imported in _imports(name, path):
            targets.add(f"{module}.{imported}" if f"{module}.{imported}" in modules else module)
        for target in targets:
            if name in PIPELINE and target in PIPELINE and PIPELINE.index(target) > PIPELINE.index(name):
                backwards.append(f"{name} imports {target}, later in the pipeline")
            core = not name.startswith(OUTSIDE_THE_CORE) and name != "fxsparse"
            if core and target.startswith(OUTSIDE_THE_CORE):
                backwards.append(f"{name} (core) imports {target}")
            if name.startswith("fxsparse.structured") and target.startswith("fxsparse.masks"):
                backwards.append(f"{name} imports {target}: masks.channels builds on structured, not the other way")
            if name == "fxsparse.viz._diff" and target == "fxsparse.viz._draw":
                backwards.append(f"{name} imports {target}: drawing builds on the diff, not the other way")
    assert not backwards, "\n".join(sorted(backwards))
