"""torch's private APIs: each one fxsparse uses still exists, and only fxsparse._compat reaches them."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from fxsparse._compat import MODULE_STATE_ATTRIBUTES, PRIVATE_APIS

PACKAGE = Path(__file__).parent.parent / "fxsparse"


@pytest.mark.parametrize("api", PRIVATE_APIS)
def test_private_torch_api_still_exists(api: str) -> None:
    module_name, _, attributes = api.partition(":")
    try:
        value: object = importlib.import_module(module_name)
    except ImportError as exc:
        pytest.fail(f"torch no longer has the module {module_name!r}, which fxsparse uses ({api}): {exc}")
    for attribute in attributes.split("."):
        if attribute == "_erased":  # an instance attribute of fx.Node, set in __init__
            import torch.fx

            value = torch.fx.Graph().placeholder("x")
        elif attribute == "_tracer_cls":  # an instance attribute of GraphModule
            import torch.fx

            value = torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph())
        elif attribute == "_codegen":  # an instance attribute of fx.Graph
            import torch.fx

            value = torch.fx.Graph()
        elif attribute == "_c" and isinstance(value, type):  # set on each compiled module
            import torch

            value = torch.jit.script(torch.nn.ReLU())
        elif attribute == "_guards_code" and isinstance(value, type):  # set on each ExportedProgram
            import torch

            value = torch.export.export(torch.nn.ReLU(), (torch.ones(1),))
        assert hasattr(value, attribute), f"torch no longer has {api}, a private API fxsparse uses (see _compat.py)"
        value = getattr(value, attribute)


def _private_torch_names(tree: ast.AST) -> list[tuple[int, str]]:
    """Imports of private torch names, and attribute chains rooted at ``torch`` with a private part."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "torch":
            parts = node.module.split(".") + [alias.name for alias in node.names]
            if any(part.startswith("_") for part in parts):
                found.append((node.lineno, f"from {node.module} import {', '.join(a.name for a in node.names)}"))
        elif isinstance(node, ast.Import):
            found += [
                (node.lineno, f"import {a.name}") for a in node.names if "._" in a.name and a.name.startswith("torch")
            ]
        elif isinstance(node, ast.Attribute):
            owner = ast.unparse(node.value)
            if _private(node.attr) and owner not in ("self", "cls") and node.attr not in MODULE_STATE_ATTRIBUTES:
                # A private attribute of an object torch made (an operator's _schema, a module's _c).
                found.append((node.lineno, f"{owner}.{node.attr}"))
            chain = [node.attr]
            value: ast.expr = node.value
            while isinstance(value, ast.Attribute):
                chain.append(value.attr)
                value = value.value
            private = any(part.startswith("_") and not part.startswith("__") for part in chain)
            if isinstance(value, ast.Name) and value.id == "torch" and private:
                found.append((node.lineno, ".".join(["torch", *reversed(chain)])))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and len(node.args) > 1:
            name = node.args[1]  # getattr(torch, "_C"), setattr(module, "_x", ...)
            if node.func.id in ("getattr", "setattr", "hasattr", "delattr") and _private_string(name):
                found.append((node.lineno, f"{node.func.id}(..., {ast.unparse(name)})"))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("torch."):
            dotted = " " not in node.value and any(part.startswith("_") for part in node.value.split("."))
            if dotted:  # importlib.import_module("torch.x._y"), a private logger's name
                found.append((node.lineno, repr(node.value)))
    return found


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _private_string(node: ast.expr) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str) and _private(node.value)


def test_the_private_name_check_finds_what_it_looks_for() -> None:
    code = """
import torch._C
from torch.fx.graph import _PyTreeCodeGen
torch._C._nn.linear
op._schema.name
getattr(torch, "_C")
module._parameters
self._cache
"""
    found = [name for _, name in _private_torch_names(ast.parse(code))]
    assert "import torch._C" in found and "from torch.fx.graph import _PyTreeCodeGen" in found
    assert "torch._C._nn.linear" in found and "op._schema" in found and "getattr(..., '_C')" in found
    assert not [name for name in found if "_parameters" in name or "_cache" in name]


def test_no_module_but_compat_reaches_a_private_torch_name() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "_compat.py":
            continue
        for line, name in _private_torch_names(ast.parse(path.read_text())):
            offenders.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {name}")
    # Nested attribute chains report once per depth; one line each is enough to act on.
    assert not sorted(set(offenders)), "private torch names outside fxsparse/_compat.py:\n" + "\n".join(
        sorted(set(offenders))
    )


@pytest.mark.parametrize("attribute", sorted(MODULE_STATE_ATTRIBUTES))
def test_module_state_attributes_fxsparse_reads_still_exist(attribute: str) -> None:
    import torch

    assert hasattr(torch.nn.Module(), attribute), f"nn.Module no longer has {attribute!r}, which fxsparse reads"
