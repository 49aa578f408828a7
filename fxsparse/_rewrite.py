"""The rewrite: the one place fxsparse edits a graph.

For each masked parameter the graph fetches the weight and its mask buffer once and
multiplies them in one ``mul`` node (``mask * weight``, as ``FakeSparsity`` computes
it); every use of the parameter reads that product. Leaf modules that own a masked
parameter (``nn.Linear``, ``nn.Conv*d``, ``nn.Embedding``) are opened in place into the
functional call their ``forward`` makes, keeping the node's name::

    seq_0_weight = getattr(self.seq, "0").weight
    seq_0_weight_mask = getattr(self.seq, "0").weight_mask
    seq_0_weight_masked = torch.mul(seq_0_weight_mask, seq_0_weight)
    seq_0_bias = getattr(self.seq, "0").bias
    seq_0 = torch._C._nn.linear(x, seq_0_weight_masked, seq_0_bias)

Every node the rewrite creates or changes carries a :class:`~fxsparse._tags.Tag` (its
:class:`~fxsparse._tags.Role`, the parameter, mask buffer or module it is about): see
``_tags``, which owns them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
import torch.fx
from torch import nn

from ._capture import MISSING, Exported, lookup
from ._compat import linear_c
from ._errors import TraceError
from ._plan import ADDED_ATTRIBUTES, KEPT_ROOT, MaskedParameter, Plan
from ._runtime.folded import masked_gradient, zero_pruned
from ._runtime.sparse_ops import bsr_linear, csr_linear
from ._runtime.swap import call_with_parameters
from ._tags import Role, Tag, retag, set_tag, tag_of, tagged

__all__ = [
    "LINEAR_CALLS",
    "bias_argument",
    "fold_into_weights",
    "fold_masks",
    "frozen_linear_uses",
    "rewrite",
    "unfold_from_weights",
    "use_layouts",
]


def rewrite(
    root: nn.Module,
    graph: torch.fx.Graph,
    plan: Plan,
    exported: Exported | None = None,
    registry: Mapping[str, str] | None = None,
    *,
    masks: str = "copy",
) -> None:
    """Register the plan's mask buffers on ``root`` and mask every use in ``graph``, in place.

    ``masks``: ``"copy"`` (default) registers copies, so the output shares no tensor with the
    plan; ``"adopt"`` registers the plan's own tensors (the caller asked for shared memory:
    ``transform(share_weights=True)``, or hands over masks it owns); ``"registered"`` leaves
    the buffers a rewrite of another graph of the same root registered.

    For a graph captured by ``torch.export`` (``exported``, whose ``graph`` is ``graph``), also
    install on ``root`` what the graph reads besides the model's state, and call the input
    guards first thing. ``registry`` names the masks of an fxsparse output being transformed
    again (mask buffer -> parameter, see ``_tags.mask_registry``), whose graph lost its tags
    when it was captured again.
    """
    if masks not in ("copy", "adopt", "registered"):
        raise ValueError(f"masks must be 'copy', 'adopt' or 'registered', got {masks!r}")
    for p in plan.parameters:
        if masks != "registered":
            mask = p.mask.clone() if masks == "copy" else p.mask
            root.get_submodule(p.owner).register_buffer(p.mask_attribute, mask, persistent=True)
    if exported is not None:
        _adopt_exported(root, graph, exported)
    retag(graph, registry or {}, root)
    _Rewriter(graph, plan).run()
    graph.lint()


def fold_masks(root: nn.Module, graph: torch.fx.Graph, values: bool = True) -> dict[str, torch.Tensor]:
    """Fold each ``mask * weight`` of ``graph`` into its weight, in place: the parameter takes
    the product's value (computed once, by the same ``torch.mul``, so outputs stay bit for
    bit the same), every use reads the parameter, and the mask buffer is removed from
    ``root``. Returns each folded parameter's name and mask.

    A weight folded for training already (:func:`fold_into_weights`) holds its product: it
    is read as it is, and its value is not computed again (nothing is allocated for it).

    ``values=False`` edits ``graph`` alone, for a second graph over the same ``root`` (a
    model's other mode) whose parameters and buffers the first fold already changed.
    """
    folded = {}
    for product, tag in list(tagged(graph, Role.MASKED, Role.FOLDED)):
        mask_node, weight_node = product.args
        assert isinstance(mask_node, torch.fx.Node) and isinstance(weight_node, torch.fx.Node)
        if values:
            parameter = root.get_parameter(str(weight_node.target))
            mask = folded[str(tag.param)] = root.get_buffer(str(mask_node.target))
            if tag.role is Role.MASKED:
                with torch.no_grad():
                    parameter.copy_(torch.mul(mask, parameter))  # what the product node computes
            owner, _, buffer = str(mask_node.target).rpartition(".")
            del root.get_submodule(owner)._buffers[buffer]
        product.replace_all_uses_with(weight_node)
        graph.erase_node(product)
        if not mask_node.users:
            graph.erase_node(mask_node)
        set_tag(weight_node, Tag(Role.FROZEN, param=tag.param))
    graph.lint()
    return folded


def fold_into_weights(root: nn.Module, graph: torch.fx.Graph, values: bool = True) -> None:
    """Fold each ``mask * weight`` of ``graph`` into its weight for training, in place.

    The parameter takes the product's value (its pruned entries set to zero: a NaN or inf
    there too), and the product node becomes ``masked_gradient(mask, weight)``, which reads
    the weight as it is and masks its gradient; the mask buffer stays. ``values=False`` edits
    ``graph`` alone (a model's other mode, whose weights the first call folded).
    """
    for product, tag in list(tagged(graph, Role.MASKED)):
        mask_node, weight_node = product.args
        assert isinstance(mask_node, torch.fx.Node) and isinstance(weight_node, torch.fx.Node)
        if values:
            zero_pruned(root.get_parameter(str(weight_node.target)), root.get_buffer(str(mask_node.target)))
        product.target = masked_gradient
        set_tag(product, dataclasses.replace(tag, role=Role.FOLDED))
    graph.lint()


def unfold_from_weights(graph: torch.fx.Graph) -> None:
    """Undo :func:`fold_into_weights` in ``graph``: each folded weight is read through ``mask * weight`` again.

    The weights keep their values (pruned entries zero): the masks multiply them again.
    """
    for folded, tag in list(tagged(graph, Role.FOLDED)):
        folded.target = torch.mul
        set_tag(folded, dataclasses.replace(tag, role=Role.MASKED))
    graph.lint()


LINEAR_CALLS = (linear_c, torch.nn.functional.linear, torch.ops.aten.linear.default)


def frozen_linear_uses(graph: torch.fx.Graph) -> dict[str, tuple[list[torch.fx.Node], list[torch.fx.Node]]]:
    """Each frozen weight's linear calls (weight in the second slot), and its other users."""
    uses = {}
    for fetch, tag in tagged(graph, Role.FROZEN):
        linear: list[torch.fx.Node] = []
        other: list[torch.fx.Node] = []
        for user in fetch.users:
            is_linear = user.op == "call_function" and user.target in LINEAR_CALLS
            (linear if is_linear and _weight_argument(user) is fetch else other).append(user)
        uses[str(tag.param)] = (linear, other)
    return uses


def _weight_argument(call: torch.fx.Node) -> Any:
    return call.args[1] if len(call.args) > 1 else call.kwargs.get("weight")


def bias_argument(call: torch.fx.Node) -> Any:
    return call.args[2] if len(call.args) > 2 else call.kwargs.get("bias")


def use_layouts(
    root: nn.Module,
    graph: torch.fx.Graph,
    choices: Mapping[str, Any],
    stored: Mapping[str, Mapping[str, torch.Tensor] | torch.Tensor],
) -> None:
    """Run each frozen linear weight in its chosen layout, in place.

    ``choices`` maps a parameter to its ``_kernels.LayoutChoice``; ``stored`` maps each
    parameter that changes layout to what replaces it: a ``SparseSemiStructuredTensor``
    (the parameter takes it; the ``linear`` call stays), or the CSR/BSR parts, which become
    buffers ``<weight>_crow_indices``, ``<weight>_col_indices`` and ``<weight>_values`` read by
    a ``csr_linear``/``bsr_linear`` call in place of ``linear``, the dense parameter gone.
    Every linear call of a frozen weight is tagged with its choice.
    """
    for param, (linear, _) in frozen_linear_uses(graph).items():
        choice = choices.get(param)
        if choice is None:
            continue
        for call in linear:
            # An opened call keeps its role and module; another linear call becomes "linear".
            tag = tag_of(call) or Tag(Role.LINEAR)
            set_tag(call, dataclasses.replace(tag, param=param, choice=choice.as_meta()))
        if choice.layout == "dense":
            continue
        owner_name, _, attribute = param.rpartition(".")
        owner = root.get_submodule(owner_name)
        replacement = stored[param]
        if isinstance(replacement, torch.Tensor):  # semi-structured: same call, another tensor
            owner._parameters[attribute] = nn.Parameter(replacement, requires_grad=False)
            continue
        fetch = _weight_argument(linear[0])
        with graph.inserting_before(fetch):
            parts = []
            for part, value in replacement.items():
                owner.register_buffer(f"{attribute}_{part}", value)
                node = graph.get_attr(f"{param}_{part}")
                set_tag(node, Tag(Role.SPARSE_WEIGHT, param=param, choice={"layout": choice.layout}))
                parts.append(node)
        kernel = csr_linear if choice.layout == "csr" else bsr_linear
        out_features, in_features = (int(size) for size in owner._parameters[attribute].shape)  # type: ignore[union-attr]
        for call in linear:
            x = call.args[0] if call.args else call.kwargs["input"]
            bias = bias_argument(call)
            call.target = kernel
            call.args = (x, *parts, bias, out_features, in_features)
            call.kwargs = {}
            set_tag(call, dataclasses.replace(tag_of(call) or Tag(Role.SPARSE), role=Role.SPARSE))
        graph.erase_node(fetch)
        del owner._parameters[attribute]
    graph.lint()


def _adopt_exported(root: nn.Module, graph: torch.fx.Graph, exported: Exported) -> None:
    graph.owning_module = root  # type: ignore[assignment]  # what it now runs over, for lint's checks
    renamed: dict[str, str] = {}
    for target, value in exported.attributes.items():
        existing = lookup(root, target)
        if existing is value:
            continue
        # A constant export named after nothing in the model may still collide with an attribute.
        name = target if existing is MISSING else _free_name(root, target.replace(".", "_"))
        _record_added(root, _install(root, name, value))
        renamed[target] = name
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module") and renamed.get(str(node.target), node.target) != node.target:
            node.target = renamed[str(node.target)]
    name = _free_name(root, "_input_guards")
    root.add_module(name, exported.guards)
    _record_added(root, name)
    placeholders = graph.find_nodes(op="placeholder")
    where = graph.inserting_after(placeholders[-1]) if placeholders else graph.inserting_before(None)
    with where:
        guards = graph.call_module(name, tuple(placeholders))
    set_tag(guards, Tag(Role.GUARDS, module=name))


def _free_name(root: nn.Module, name: str) -> str:
    candidate, number = name, 0
    while hasattr(root, candidate):
        number += 1
        candidate = f"{name}_{number}"
    return candidate


def _record_added(root: nn.Module, dotted: str) -> None:
    """Note an attribute fxsparse added to the model's tree, which the model built again leaves out."""
    root.__dict__.setdefault(ADDED_ATTRIBUTES, []).append(dotted)


def _install(root: nn.Module, dotted: str, value: Any) -> str:
    """Set ``dotted`` on ``root``, making missing containers; returns the outermost name it made."""
    owner = root
    *path, name = dotted.split(".")
    made = None
    for index, part in enumerate(path):
        if not isinstance(getattr(owner, part, None), nn.Module):
            owner.add_module(part, nn.Module())
            made = made or ".".join(path[: index + 1])
        owner = getattr(owner, part)
    if isinstance(value, nn.Module):
        owner.add_module(name, value)
    else:
        setattr(owner, name, value)  # a plain attribute, not a buffer: state_dict keeps the model's keys
    return made or dotted


class _Rewriter:
    def __init__(self, graph: torch.fx.Graph, plan: Plan) -> None:
        self.graph = graph
        self.plan = plan
        self.by_alias = plan.by_alias()
        self.masked: dict[str, torch.fx.Node] = {}
        self.plain: dict[str, torch.fx.Node] = {}
        self.modules: dict[str, torch.fx.Node] = {}
        self.under: dict[str, dict[str, str]] | None = None

    def run(self) -> None:
        for node in list(self.graph.nodes):
            if node.op == "get_attr":
                p = self.by_alias.get(str(node.target))
                if p is not None:
                    self._mask_fetch(node, p)
            elif node.op == "call_module" and node.target in self.plan.opened:
                self._open(node)
            elif node.op == "call_module" and node.target in self.plan.kept:
                self._call_with_masked(node)
            elif node.op == "call_function" and node.target is call_with_parameters:
                self._swap_in_new_masks(node)  # a kept call from an earlier transform
        for node in self.graph.find_nodes(op="call_module"):
            if node.target in self.plan.traced_into or node.target in self.plan.opened:
                raise TraceError(f"module {node.target!r} holds a masked parameter but stayed a leaf call")
        self._refuse_unmasked_module_reads()
        self._multiply_at_first_use()

    def _multiply_at_first_use(self) -> None:
        """Move each ``mask * weight`` (and its mask's read) to just before its first use.

        torch.export reads every parameter at the top of its graph: multiplied there, every
        masked weight's product would be alive at once for the whole forward, one more copy of
        the masked weights (a 12 GiB model ran out of memory in training on it).
        """
        position = {node: index for index, node in enumerate(self.graph.nodes)}
        for product in self.masked.values():
            first = min(product.users, key=position.__getitem__, default=None)
            if first is not None and position[first] > position[product] + 1:
                mask = product.args[0]
                assert isinstance(mask, torch.fx.Node) and len(mask.users) == 1  # _multiply made it for product
                first.prepend(mask)
                first.prepend(product)

    def _refuse_unmasked_module_reads(self) -> None:
        """No module holding a masked parameter may reach code as an object, but to be called with them swapped in.

        Whatever else receives it (a function marked with ``torch.fx.wrap``) would read its parameters unmasked.
        """
        for node in self.graph.find_nodes(op="get_attr"):
            name = str(node.target)
            held = self._masked_under(name) if name else {p.name: p.name for p in self.plan.parameters}
            readers = [
                user for user in node.users if not (user.target is call_with_parameters and user.args[0] is node)
            ]
            if held and readers:
                functions = ", ".join(sorted({getattr(u.target, "__qualname__", str(u.target)) for u in readers}))
                shown = ", ".join(sorted(held.values())[:3]) + (", ..." if len(held) > 3 else "")
                raise TraceError(
                    f"module {name or '(root)'!r}, which holds masked parameters ({shown}), is passed as an object "
                    f"to {functions}, which fxsparse cannot see into: it would read them unmasked. Call the module "
                    "in forward (self.fc(x)) and pass its output to the function instead"
                )

    def _mask_fetch(self, fetch: torch.fx.Node, p: MaskedParameter) -> None:
        if not fetch.users:  # a dead read (torch.export keeps one per name of a tied parameter)
            self.graph.erase_node(fetch)
            return
        product = self.masked.get(p.name)
        if product is not None:
            fetch.replace_all_uses_with(product)
            self.graph.erase_node(fetch)
            return
        fetch.target = p.name
        set_tag(fetch, Tag(Role.WEIGHT, param=p.name))
        with self.graph.inserting_before(fetch.next):
            product = self._multiply(fetch, p)
        fetch.replace_all_uses_with(product, delete_user_cb=lambda user: user is not product)

    def _multiply(self, weight: torch.fx.Node, p: MaskedParameter) -> torch.fx.Node:
        mask = self.graph.get_attr(p.mask_name)
        set_tag(mask, Tag(Role.MASK, param=p.name, mask=p.mask_name))
        product = self.graph.call_function(torch.mul, (mask, weight), name=f"{weight.name}_masked")
        set_tag(product, Tag(Role.MASKED, param=p.name, mask=p.mask_name))
        self.masked[p.name] = product
        return product

    def _fetch(self, name: str) -> torch.fx.Node:
        """The node reading parameter ``name``, masked if it is; inserted at the current point."""
        p = self.by_alias.get(name)
        if p is not None:
            product = self.masked.get(p.name)
            if product is None:
                weight = self.graph.get_attr(p.name)
                set_tag(weight, Tag(Role.WEIGHT, param=p.name))
                product = self._multiply(weight, p)
            return product
        fetch = self.plain.get(name)
        if fetch is None:
            fetch = self.plain[name] = self.graph.get_attr(name)
            set_tag(fetch, Tag(Role.PARAM, param=name))
        return fetch

    def _open(self, call: torch.fx.Node) -> None:
        opened = self.plan.opened[call.target]  # type: ignore[index]
        if len(call.args) == 1 and not call.kwargs:
            (x,) = call.args
        elif not call.args and set(call.kwargs) == {"input"}:
            x = call.kwargs["input"]
        else:
            raise TraceError(
                f"cannot open the call of {opened.name!r}: expected one input, "
                f"got args {call.args} kwargs {call.kwargs}"
            )
        with self.graph.inserting_before(call):
            tensors = [None if slot is None else self._fetch(slot) for slot in opened.parameters]
        call.op = "call_function"
        call.target = opened.opening.function
        call.args = (x, *tensors)
        call.kwargs = dict(zip(opened.opening.attributes, opened.constants, strict=True))
        set_tag(call, Tag(Role.OPENED, module=opened.name))

    def _masked_under(self, module: str) -> dict[str, str]:
        """The masked parameters held by ``module``: name relative to it -> FQN."""
        if module == KEPT_ROOT:
            return {alias: alias for p in self.plan.parameters for alias in p.aliases}
        if self.under is None:
            self.under = {}
            for p in self.plan.parameters:
                for alias in p.aliases:
                    parts = alias.split(".")
                    for depth in range(1, len(parts)):
                        prefix = ".".join(parts[:depth])
                        self.under.setdefault(prefix, {})[".".join(parts[depth:])] = alias
        return self.under.get(module, {})

    def _call_with_masked(self, call: torch.fx.Node) -> None:
        name = str(call.target)
        with self.graph.inserting_before(call):
            module = self.modules.get(name)
            if module is None:
                module = self.modules[name] = self.graph.create_node("get_attr", name, name=f"{call.name}_module")
                set_tag(module, Tag(Role.MODULE, module=name))
            swapped = {relative: self._fetch(alias) for relative, alias in self._masked_under(name).items()}
        call.op = "call_function"
        call.target = call_with_parameters
        call.args = (module, swapped, *call.args)
        set_tag(call, Tag(Role.CALLED, module=name, why=self.plan.kept[name]))

    def _swap_in_new_masks(self, call: torch.fx.Node) -> None:
        module, swapped, *args = call.args
        name = str(module.target)  # type: ignore[union-attr]
        new = {relative: alias for relative, alias in self._masked_under(name).items() if relative not in swapped}  # type: ignore[operator]
        if new:
            with self.graph.inserting_before(call):
                added = {relative: self._fetch(alias) for relative, alias in new.items()}
            call.args = (module, {**swapped, **added}, *args)  # type: ignore[dict-item]
