"""A griffe extension for the API reference (docs/api.md): fxsparse's docstrings, read as Google style.

The docstrings are Google style with two habits from Sphinx, which mkdocstrings would print
as they are: cross-references written as reST roles (``:func:`transform```,
``:class:`~fxsparse.Plan```), and examples under ``Example:``, which Google style reads as a
note, turning each ``>>>`` line into a quotation. This extension, run by mkdocstrings when it
loads the package (mkdocs.yml), rewrites both before the docstrings are parsed: a role becomes
a link to the name's heading on the reference page when the name is public (``fxsparse``,
``fxsparse.masks`` and ``fxsparse.viz`` export it), and code text otherwise; ``Example:``
becomes ``Examples:``, whose ``>>>`` blocks render as code (doctest flags trimmed).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|func|data|meth|attr|mod|exc|obj|const):`(~?)([^`]+)`")
EXAMPLE_HEADER = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)
PUBLIC_MODULES = ("fxsparse.viz", "fxsparse.masks", "fxsparse")  # most specific first


class SphinxHabits(griffe.Extension):
    """Rewrites reST roles and ``Example:`` sections in every docstring of the ``fxsparse`` package."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        if pkg.path != "fxsparse":
            return
        public = {
            f"{module}.{name}"
            for module in PUBLIC_MODULES
            for name in (pkg if module == "fxsparse" else pkg[module.removeprefix("fxsparse.")]).exports or ()
        }
        for obj in _walk(pkg):
            if obj.docstring is not None:
                obj.docstring.value = rewrite(obj.docstring.value, obj.path, public)


def rewrite(text: str, path: str, public: set[str]) -> str:
    """``text`` with its roles as links or code, and ``Example:`` as ``Examples:``."""

    def link(role: re.Match[str]) -> str:
        short, name = role[1] == "~", role[2].strip().removesuffix("()").lstrip(".")
        shown = name.rsplit(".", 1)[-1] if short else name
        target = _public_path(name, path, public)
        return f"[`{shown}`][{target}]" if target else f"`{shown}`"

    return EXAMPLE_HEADER.sub(r"\1Examples:", ROLE.sub(link, text))


def _public_path(name: str, path: str, public: set[str]) -> str | None:
    """The public path ``name`` stands for, read from the docstring of the object at ``path``."""
    if name in public:
        return name
    own = [module for module in PUBLIC_MODULES if path.startswith(module + ".")]  # its own package first
    for module in [*own, *PUBLIC_MODULES]:
        if f"{module}.{name}" in public:
            return f"{module}.{name}"
    return None


def _walk(obj: griffe.Object) -> list[griffe.Object]:
    found = [obj]
    for member in obj.members.values():
        if not member.is_alias and isinstance(member, griffe.Object):
            found += _walk(member)
    return found
