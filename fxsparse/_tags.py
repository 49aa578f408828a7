"""Node tags: how fxsparse marks the nodes it creates or changes, and the one place that reads and writes them.

Every node the rewrite creates or changes carries ``node.meta["fxsparse"]`` (:data:`META_KEY`),
a :class:`Tag`: its :class:`Role` and, where it applies, the parameter, mask buffer or module
it is about. A tag reads like the dict it used to be (``tag["role"] == "masked"``), and a
:class:`Role` compares equal to its string value.

fxsparse recognizes its own nodes by these tags only, never by a node's or buffer's name: a
model's own ``torch.mul(self.gate_mask, self.gate)`` is not a mask. Where tags are lost (a
graph traced again from code, an ATen graph exported from a tagged one), :func:`retag`
restores them from a registry of the masks fxsparse made, read from the tagged graph
beforehand (:func:`mask_registry`). An exported program's ``mask * weight`` products also
carry their tag as plain data under ``node.meta["custom"]`` (:func:`set_exported_tag`), the
node metadata ``torch.export.save`` writes and ``torch.export.load`` reads back: a program
saved and loaded again still tells its masks from the model's own buffers. A TorchScript
output, which has no node metadata, holds the registry itself as an attribute
(:data:`SCRIPT_MASKS_ATTRIBUTE`, read by :func:`recorded_masks`).

Example:
    >>> import torch, fxsparse
    >>> from fxsparse import Role, tag_of
    >>> out = fxsparse.transform(torch.nn.Sequential(torch.nn.Linear(2, 2)), {"0": torch.eye(2)})
    >>> for node in out.graph.nodes:
    ...     if tag_of(node) is not None:
    ...         print(node.name, tag_of(node).role.value)
    _0_weight weight
    _0_bias param
    _0_weight_mask mask
    _0_weight_masked masked
    _0 opened
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from enum import Enum
from typing import Any

import torch
import torch.fx
from torch import nn

__all__ = [
    "META_KEY",
    "ROLES",
    "SCRIPT_MASKS_ATTRIBUTE",
    "Role",
    "Tag",
    "is_folded",
    "mask_registry",
    "recorded_masks",
    "retag",
    "role_of",
    "set_exported_tag",
    "set_tag",
    "tag_of",
    "tagged",
]

META_KEY = "fxsparse"
# The node metadata torch.export serializes (as JSON) with a program, and keeps through
# ExportedProgram.module() and run_decompositions(); fxsparse's entry in it is META_KEY.
_EXPORTED_META_KEY = "custom"
# The attribute of a TorchScript output holding its mask registry (mask buffer -> parameter).
SCRIPT_MASKS_ATTRIBUTE = "fxsparse_masks"


class Role(str, Enum):
    """What a node tagged by fxsparse does."""

    WEIGHT = "weight"
    MASK = "mask"
    MASKED = "masked"
    FOLDED = "folded"
    PARAM = "param"
    OPENED = "opened"
    MODULE = "module"
    CALLED = "called"
    GUARDS = "guards"
    FROZEN = "frozen"
    LINEAR = "linear"
    SPARSE = "sparse"
    SPARSE_WEIGHT = "sparse weight"

    @property
    def description(self) -> str:
        return _DESCRIPTIONS[self]

    def __str__(self) -> str:
        return self.value


_DESCRIPTIONS = {
    Role.WEIGHT: "fetches a masked parameter",
    Role.MASK: "fetches a mask buffer",
    Role.MASKED: "mask * weight, read by every use of the parameter",
    Role.FOLDED: (
        "a masked weight that holds mask * weight itself (fxsparse.fold), read by every use of the parameter "
        "as it is; its gradient is multiplied by the mask"
    ),
    Role.PARAM: "fetches an unmasked parameter of an opened module",
    Role.OPENED: "a leaf module call opened into its functional form",
    Role.MODULE: "fetches a module that is called with masked parameters swapped in",
    Role.CALLED: "a call of a module that stays a call, with masked parameters swapped in",
    Role.GUARDS: "checks the inputs against those a graph captured by torch.export was exported for",
    Role.FROZEN: "fetches a weight with its mask folded in (fxsparse.freeze)",
    Role.LINEAR: "a linear call of a frozen weight, tagged with the layout fxsparse.freeze chose for it",
    Role.SPARSE: "a linear call on a frozen weight stored in a sparse layout (fxsparse.freeze(layout=...))",
    Role.SPARSE_WEIGHT: "fetches a part of a sparse weight: its row pointers, column indices or values",
}

# Each role's value and what it means (the public table; Role is the type).
ROLES: dict[str, str] = {role.value: role.description for role in Role}


@dataclasses.dataclass(frozen=True, eq=False)
class Tag(Mapping[str, Any]):
    """A node's fxsparse tag.

    ``param``: the parameter the node is about (FQN); ``mask``: its mask buffer (FQN);
    ``module``: the module opened, called or fetched; ``why``: why a module stays a call;
    ``choice``: the layout ``fxsparse.freeze`` chose for a linear call (see ``LayoutChoice``).
    As a mapping it holds the fields that are set, with the choice's entries flattened in.
    """

    role: Role
    param: str | None = None
    mask: str | None = None
    module: str | None = None
    why: str | None = None
    choice: Mapping[str, Any] | None = None

    def _as_dict(self) -> dict[str, Any]:
        fields = {"role": self.role, "param": self.param, "mask": self.mask, "module": self.module, "why": self.why}
        found = {key: value for key, value in fields.items() if value is not None}
        found.update(self.choice or {})
        return found

    def __getitem__(self, key: str) -> Any:
        return self._as_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._as_dict())

    def __len__(self) -> int:
        return len(self._as_dict())

    def __repr__(self) -> str:
        shown = ", ".join(f"{key}={value!r}" for key, value in self._as_dict().items() if key != "role")
        return f"Tag({self.role.value}{', ' if shown else ''}{shown})"

    @classmethod
    def from_mapping(cls, value: Mapping[str, Any]) -> Tag:
        """A tag from the plain dict fxsparse 0.3 stored (files saved by it still load)."""
        names = {"param", "mask", "module", "why"}
        choice = {key: item for key, item in value.items() if key not in names | {"role"}}
        return cls(Role(value["role"]), **{key: value[key] for key in names if key in value}, choice=choice or None)


def tag_of(node: torch.fx.Node) -> Tag | None:
    """The node's fxsparse tag, or None for a node fxsparse did not create or change."""
    value = node.meta.get(META_KEY)
    if value is None:
        custom = node.meta.get(_EXPORTED_META_KEY)
        recorded = custom.get(META_KEY) if isinstance(custom, Mapping) else None
        return Tag.from_mapping(recorded) if isinstance(recorded, Mapping) and "role" in recorded else None
    if isinstance(value, Tag):
        return value
    if isinstance(value, Mapping) and "role" in value:
        tag = Tag.from_mapping(value)
        node.meta[META_KEY] = tag
        return tag
    return None


def role_of(node: torch.fx.Node) -> Role | None:
    """The role of the node's tag, or None for a node fxsparse did not create or change."""
    tag = tag_of(node)
    return None if tag is None else tag.role


def set_tag(node: torch.fx.Node, tag: Tag) -> None:
    node.meta[META_KEY] = tag


def set_exported_tag(node: torch.fx.Node, tag: Tag) -> None:
    """Tag a node of an exported program so that the tag survives ``torch.export.save`` and ``load``.

    torch.export writes a node's ``meta["custom"]`` with the program (as JSON) and drops the
    rest of fxsparse's metadata; the tag goes there too, as plain strings. Only call nodes
    keep it (a placeholder's is not written), so the products carry what names a mask.
    """
    set_tag(node, tag)
    plain = {key: str(value) for key, value in tag.items()}
    custom = node.meta.get(_EXPORTED_META_KEY)
    node.meta[_EXPORTED_META_KEY] = {**(custom if isinstance(custom, Mapping) else {}), META_KEY: plain}


def tagged(graph: torch.fx.Graph, *roles: Role) -> Iterator[tuple[torch.fx.Node, Tag]]:
    """Each node of ``graph`` whose tag has one of ``roles``, with its tag."""
    for node in graph.nodes:
        tag = tag_of(node)
        if tag is not None and tag.role in roles:
            yield node, tag


def mask_registry(graph: torch.fx.Graph) -> dict[str, str]:
    """The masks fxsparse made in ``graph``: mask buffer FQN -> parameter FQN, read from its tags
    (of its ``mask * weight`` products, or of its folded weights)."""
    return {str(tag.mask): str(tag.param) for _, tag in tagged(graph, Role.MASKED, Role.FOLDED)}


def is_folded(graph: torch.fx.Graph) -> bool:
    """Whether ``graph`` reads folded weights (``fxsparse.fold``): weights that hold ``mask * weight``."""
    return next(tagged(graph, Role.FOLDED), None) is not None


def recorded_masks(module: nn.Module) -> dict[str, str] | None:
    """The registry a TorchScript output records (mask buffer -> parameter), or None where it records none."""
    recorded = getattr(module, SCRIPT_MASKS_ATTRIBUTE, None) if isinstance(module, torch.jit.ScriptModule) else None
    return dict(recorded) if isinstance(recorded, Mapping) else None


def retag(graph: torch.fx.Graph, registry: Mapping[str, str], root: nn.Module | None = None) -> None:
    """Tag the ``mask * weight`` products of a graph that lost its tags, for the masks in ``registry``.

    ``registry`` (mask buffer -> parameter, from :func:`mask_registry` of the graph before it
    lost its tags) says which buffers are fxsparse's masks: a product of any other buffer is
    the model's own and stays untagged. Tracing names a tied parameter by its first name,
    which may not be the one its mask is named after; given ``root``, such a fetch is
    renamed back. Which calls were opened cannot be told from the code, so ``"opened"`` and
    ``"param"`` tags are not restored.
    """
    if not registry:
        return
    products = graph.find_nodes(op="call_function", target=torch.mul)
    products += graph.find_nodes(op="call_function", target=torch.ops.aten.mul.Tensor)  # exported again
    for product in products:
        tag = tag_of(product)
        # A product already tagged (an exported program loaded again keeps the products' tags
        # only) still gets its operands' tags back.
        if len(product.args) != 2 or product.kwargs or (tag is not None and tag.role is not Role.MASKED):
            continue
        mask, weight = product.args
        if not (isinstance(mask, torch.fx.Node) and isinstance(weight, torch.fx.Node)):
            continue
        if not (mask.op == weight.op == "get_attr"):
            continue
        buffer = str(mask.target)
        param = registry.get(buffer)
        if param is None:
            continue
        if weight.target != param:
            if root is None or not _same_parameter(root, param, str(weight.target)):
                continue
            weight.target = param
        if tag_of(weight) is None:
            set_tag(weight, Tag(Role.WEIGHT, param=param))
        if tag_of(mask) is None:
            set_tag(mask, Tag(Role.MASK, param=param, mask=buffer))
        if tag is None:
            set_tag(product, Tag(Role.MASKED, param=param, mask=buffer))


def _same_parameter(root: nn.Module, name: str, other: str) -> bool:
    try:
        return root.get_parameter(name) is root.get_parameter(other)
    except AttributeError:
        return False
