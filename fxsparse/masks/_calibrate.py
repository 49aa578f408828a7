"""The calibration engine: run calibration batches through fxsparse's own captured graph and
hand each selected weight the inputs that reach it.

The model is captured as :func:`fxsparse.transform` captures it (``torch.fx``, or
``torch.export`` on the first batch for a model FX cannot trace) with ``share_weights=True``
(the capture holds the model's own parameters: no copy of the weights) and an all-ones mask
on each selected weight, folded out of the graph again (``_rewrite.fold_masks`` with
``values=False``: nothing is written) so that every use of a selected weight reads the
parameter itself. The graph is then run
node by node with ``torch.fx.Interpreter``, every calibration batch together (one
environment per batch): no forward hooks, no assumption about the model's structure.

At each use of a selected weight (a ``linear`` call, or ``addmm``/``mm``/``matmul`` with the
weight as the right operand, a transformers ``Conv1D``) the engine folds the activation
that multiplies the weight into that weight's statistic. After a weight's last use has
its statistic, ``decide`` turns it into the weight's new value, which (with
``sequential=True``) the capture reads from a tensor of its own (never written into the
model's) from before that use runs until after it, so every later layer sees the pruned
earlier ones, and then goes back to the model's weight, so that the pruned values held at
once are those of the weights being decided (and what ``decide``'s caller keeps). Values
are dropped once their last user ran, so at any moment the batches' live activations are
those of one point of the graph.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch
import torch.fx
from torch import nn

from .._capture import copy_model
from .._compat import PyTreeCodeGen, codegen_of, set_codegen, tree_leaves, tree_structure
from .._errors import MaskError
from .._rewrite import LINEAR_CALLS, fold_masks
from .._runtime.guards import check_input_structure
from .._tags import Role, mask_registry, tagged
from .._transform import transform

__all__ = ["Batch", "Statistic", "Use", "batches_of", "calibrate"]

Batch = tuple[tuple[Any, ...], dict[str, Any]]
S = TypeVar("S")

# The right operand is the weight, stored [in, out]: transformers' Conv1D runs addmm(bias, x, weight).
_ADDMM = (torch.addmm, torch.ops.aten.addmm.default)
_MATMUL = (torch.mm, torch.matmul, torch.ops.aten.mm.default, torch.ops.aten.matmul.default)


@dataclass(frozen=True)
class Use:
    """One use of a selected weight in the graph: the call, and the node of its activation ``X``.

    ``input_axis`` is the weight's input dimension: 1 for ``linear`` (``[out, in]``),
    0 for ``addmm``/``mm``/``matmul`` (``[in, out]``).
    """

    call: torch.fx.Node
    activation: torch.fx.Node
    input_axis: int


@dataclass(frozen=True)
class Statistic(Generic[S]):
    """How a weight's statistic is built: ``update(state, x)`` folds one batch's activation
    ``x`` (``[tokens, in_features]``, the model's dtype) into ``state`` (``None`` at first)."""

    update: Callable[[S | None, torch.Tensor], S]


# (name, weight [out, in], statistic) -> (bool mask, new weight), both [out, in]
Decide = Callable[[str, torch.Tensor, Any], tuple[torch.Tensor, torch.Tensor]]


def batches_of(calibration: Iterable[Any]) -> list[Batch]:
    """Each calibration input as ``(args, kwargs)``: a tensor, a tuple (or list) of positional
    inputs, or a mapping of keyword inputs (a Hugging Face batch)."""
    if isinstance(calibration, (torch.Tensor, Mapping)) or not isinstance(calibration, Iterable):
        raise MaskError(
            "calibration must be an iterable of model inputs (a list of tensors, of tuples or of dicts), got "
            f"{type(calibration).__name__}: wrap a single batch in a list, [batch]"
        )
    batches: list[Batch] = []
    for index, item in enumerate(calibration):
        if isinstance(item, torch.Tensor):
            batches.append(((item,), {}))
        elif isinstance(item, (tuple, list)):
            batches.append((tuple(item), {}))
        elif isinstance(item, Mapping):
            batches.append(((), dict(item)))
        else:
            raise MaskError(
                f"calibration batch {index} must be a tensor, a tuple of positional inputs or a dict of keyword "
                f"inputs, got {type(item).__name__}"
            )
    if not batches:
        raise MaskError("calibration is empty: pass at least one batch of model inputs")
    return batches


def calibrate(
    model: nn.Module,
    names: list[str],
    batches: list[Batch],
    statistic: Statistic[Any],
    decide: Decide,
    *,
    sequential: bool,
    progress: bool | None,
    weights: bool = True,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each weight in ``names`` decided from its inputs over ``batches``: ``{name: (mask, new
    weight)}``, in the weight's own shape and orientation, in graph order.

    ``decide(name, weight, statistic)`` sees the weight as ``[out, in]`` (a ``Conv1D`` weight
    transposed) as the working copy holds it, and returns its mask and new value, ``[out, in]``.
    The model is not changed: the work happens on fxsparse's capture of it, which holds the
    model's own parameters (no copy of the weights) and reads a pruned weight (``sequential``)
    from a tensor of its own, from the weight's decision to its last use only.
    ``weights=False``: the new values are not returned (an empty tensor stands in), so at most
    one of them is held at a time.
    """
    if not names:
        return {}
    working = _working_copy(model, names, batches[0])
    positions = {node: index for index, node in enumerate(working.graph.nodes)}
    uses = _uses(working, names, positions)
    order = sorted(names, key=lambda name: positions[uses[name][-1].call])
    last_use = {uses[name][-1].call: name for name in names}
    use_of = {use.call: (name, use) for name in names for use in uses[name]}
    shared_by = _shared_statistics(uses)
    bar = _Progress(len(names), progress)
    aliases: dict[int, list[str]] = {}
    for alias, parameter in working.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(parameter), []).append(alias)
    restore: dict[torch.fx.Node, tuple[list[str], nn.Parameter]] = {}

    interpreters = [torch.fx.Interpreter(working, garbage_collect_values=True) for _ in batches]
    reader = _input_reader(working)
    pytree = isinstance(codegen_of(working.graph), PyTreeCodeGen)
    for index, (interpreter, (args, kwargs)) in enumerate(zip(interpreters, batches, strict=True)):
        if pytree:
            _same_shapes_as_the_first(index, (args, kwargs), batches[0])
            check_input_structure(working, args, kwargs)
        interpreter.env = {}
        interpreter.args_iter = iter(reader(*args, **kwargs))

    states: dict[str, Any] = {}
    cached: dict[torch.fx.Node, Any] = {}  # a statistic of one activation, for every weight reading only it
    decided: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    remaining = len(names)
    # No autograd: the model's parameters require gradients, and a graph recorded over the batches
    # would keep every layer's inputs, and every pruned weight, alive to the end.
    with torch.no_grad():
        for node in working.graph.nodes:
            if remaining == 0 or node.op == "output":
                break
            found = use_of.get(node)
            if found is not None:
                name, use = found
                if shared_by.get(name) is not None:
                    if use.activation not in cached:
                        cached[use.activation] = _accumulate(statistic, None, interpreters, use)
                    states[name] = cached[use.activation]
                else:
                    states[name] = _accumulate(statistic, states.get(name), interpreters, use)
                if last_use.get(node) == name:
                    original = working.get_parameter(name)
                    mask, new = _decide(original, name, use.input_axis, states.pop(name), decide)
                    if sequential:  # the uses from here on read the pruned weight, the model's stays as it is
                        pruned = nn.Parameter(new.to(original.dtype), requires_grad=False)
                        _put(working, aliases[id(original)], pruned)
                        for interpreter in interpreters:
                            interpreter.env.update([(n, pruned) for n, v in interpreter.env.items() if v is original])
                        restore[node] = (aliases[id(original)], original)
                    decided[name] = (mask, new if weights else _NOT_KEPT)
                    remaining -= 1
                    bar.step(name)
            for interpreter in interpreters:
                interpreter.env[node] = interpreter.run_node(node)
                for dead in interpreter.user_to_last_uses.get(node, []):
                    del interpreter.env[dead]
            if node in restore:  # the weight's last use ran: its pruned value is needed no more
                _put(working, *restore.pop(node))
            for dead in interpreters[0].user_to_last_uses.get(node, []):
                cached.pop(dead, None)
    bar.close()
    return {name: decided[name] for name in order}


_NOT_KEPT = torch.empty(0)


def _put(working: torch.fx.GraphModule, aliases: list[str], value: nn.Parameter) -> None:
    """``value`` as the parameter of ``working`` under every name of a (possibly tied) weight."""
    for alias in aliases:
        owner, _, attribute = alias.rpartition(".")
        working.get_submodule(owner)._parameters[attribute] = value


def _same_shapes_as_the_first(index: int, batch: Batch, first: Batch) -> None:
    """A model captured by torch.export runs the shapes of the batch it was captured on only."""
    shapes = [tuple(leaf.shape) for leaf in tree_leaves(batch) if isinstance(leaf, torch.Tensor)]
    expected = [tuple(leaf.shape) for leaf in tree_leaves(first) if isinstance(leaf, torch.Tensor)]
    if shapes != expected:
        raise MaskError(
            f"calibration batch {index} has input shapes {shapes}, the first batch {expected}: fxsparse captured "
            "the model with torch.export on the first batch, and runs every batch through that graph; give "
            "every batch the same shapes (pad or cut the sequences to one length)"
        )


def _working_copy(model: nn.Module, names: list[str], first: Batch) -> torch.fx.GraphModule:
    """fxsparse's capture of ``model`` in eval mode, every selected weight read directly by its uses."""
    if not isinstance(model, nn.Module):
        raise MaskError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    source = model
    if model.training:
        # Calibration runs the model as it is used (dropout off); the caller's own mode is left alone.
        source = copy_model(model, share_parameters=True).eval()
    # Views of one element: transform makes each mask its own (and they are dropped right after).
    one = torch.ones((), dtype=torch.bool)
    ones = {name: one.expand(source.get_parameter(name).shape) for name in names}
    args, kwargs = first
    # The model's own weights, not a copy: calibration only reads them (a pruned weight is a tensor of its own).
    working: torch.fx.GraphModule = transform(
        source, ones, example_inputs=args or None, example_kwargs=kwargs or None, share_weights=True
    )
    del ones
    registry = mask_registry(working.graph)
    fold_masks(working, working.graph, values=False)  # the graph alone: the model's weights are not written
    for mask in registry:
        owner, _, buffer = mask.rpartition(".")
        del working.get_submodule(owner)._buffers[buffer]
    working.recompile()
    return working


def _uses(
    working: torch.fx.GraphModule, names: list[str], positions: Mapping[torch.fx.Node, int]
) -> dict[str, list[Use]]:
    """Every use of each selected weight, in graph order; a ``MaskError`` names a weight used otherwise."""
    found: dict[str, list[Use]] = {name: [] for name in names}
    by_parameter = {id(working.get_parameter(name)): name for name in names}
    for fetch, tag in tagged(working.graph, Role.FROZEN):
        name = by_parameter.get(id(working.get_parameter(str(tag.param))))
        if name is None:
            continue
        for user in fetch.users:
            found[name].append(_use(name, user, fetch))
    for name, uses in found.items():
        if not uses:
            raise MaskError(
                f"{name}: the model's forward does not use this weight on the calibration inputs, so it has no "
                "inputs to rank by; leave it out (exclude=)"
            )
        axes = {use.input_axis for use in uses}
        if len(axes) > 1:
            raise MaskError(f"{name} is used both as [out, in] (linear) and as [in, out] (matmul); cannot rank it")
        uses.sort(key=lambda use: positions[use.call])
    return found


def _use(name: str, call: torch.fx.Node, fetch: torch.fx.Node) -> Use:
    if call.op == "call_function" and call.target in LINEAR_CALLS:
        weight = call.args[1] if len(call.args) > 1 else call.kwargs.get("weight")
        activation = call.args[0] if call.args else call.kwargs.get("input")
        if weight is fetch and activation is not fetch and isinstance(activation, torch.fx.Node):
            return Use(call, activation, 1)
    # addmm(bias, x, weight) and x @ weight: the weight is the right operand, [in, out].
    right_operand = (
        (call.target in _ADDMM and not set(call.kwargs) - {"beta"} and len(call.args) == 3)
        or (call.target in _MATMUL and not call.kwargs and len(call.args) == 2)
    ) and call.op == "call_function"
    if right_operand and call.args[-1] is fetch and call.args[-2] is not fetch:
        activation = call.args[-2]
        if isinstance(activation, torch.fx.Node):
            return Use(call, activation, 0)
    what = call.target if call.op == "call_function" else f"{call.op} {call.target}"
    raise MaskError(
        f"{name}: calibrated masks (wanda, sparsegpt) rank the inputs of a Linear, F.linear, addmm or "
        f"transformers Conv1D weight, but the model uses {name} in {getattr(what, '__name__', what)} "
        f"({call.format_node()}); leave it out (exclude=) or mask it with fxsparse.masks.magnitude"
    )


def _shared_statistics(uses: Mapping[str, list[Use]]) -> dict[str, torch.fx.Node | None]:
    """The activation whose statistic a weight can share with others (q, k and v reading one input):
    that of its only use; ``None`` for a weight used more than once."""
    return {name: (found[0].activation if len(found) == 1 else None) for name, found in uses.items()}


def _accumulate(statistic: Statistic[Any], state: Any, interpreters: list[torch.fx.Interpreter], use: Use) -> Any:
    for interpreter in interpreters:
        value = interpreter.env[use.activation]
        if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dim() < 1:
            raise MaskError(
                f"the input of {use.call.format_node()} is not a floating-point tensor "
                f"({type(value).__name__}); cannot rank its weight"
            )
        state = statistic.update(state, value.reshape(-1, value.shape[-1]))
    return state


def _decide(
    parameter: nn.Parameter, name: str, input_axis: int, state: Any, decide: Decide
) -> tuple[torch.Tensor, torch.Tensor]:
    if parameter.dim() != 2:
        raise MaskError(f"{name}: calibrated masks need a 2-D weight, got shape {tuple(parameter.shape)}")
    weight = parameter.detach() if input_axis == 1 else parameter.detach().t()
    mask, new = decide(name, weight, state)
    if input_axis == 0:
        mask, new = mask.t(), new.t()
    return mask.contiguous(), new.contiguous()


def _input_reader(working: torch.fx.GraphModule) -> Callable[..., tuple[Any, ...]]:
    """A function that binds ``(*args, **kwargs)`` to the graph's placeholders as its forward does
    (defaults, keyword names, torch.export's flattening), returning their values in order."""
    graph = torch.fx.Graph()
    copies = [graph.node_copy(node) for node in working.graph.find_nodes(op="placeholder")]
    graph.output(tuple(copies))
    codegen = codegen_of(working.graph)
    if isinstance(codegen, PyTreeCodeGen):
        codegen = copy.copy(codegen)
        info: Any = codegen.pytree_info
        codegen.pytree_info = type(info)(info.orig_args, info.in_spec, tree_structure(tuple(range(len(copies)))))
    set_codegen(graph, codegen)
    reader = torch.fx.GraphModule(nn.Module(), graph)
    return lambda *args, **kwargs: tuple(reader(*args, **kwargs))


class _Progress:
    """``calibrating: 3/12 weights (model.layers.0.mlp.up_proj)`` on stderr, rewritten in place."""

    def __init__(self, total: int, show: bool | None) -> None:
        self.total, self.done = total, 0
        self.show = sys.stderr.isatty() if show is None else bool(show)

    def step(self, name: str) -> None:
        self.done += 1
        if self.show:
            sys.stderr.write(f"\rcalibrating: {self.done}/{self.total} weights ({name})\033[K")
            sys.stderr.flush()

    def close(self) -> None:
        if self.show:
            sys.stderr.write("\n")
            sys.stderr.flush()
