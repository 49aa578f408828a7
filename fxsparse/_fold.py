"""``fold`` and ``unfold``: masks folded into the weights for training, and back.

A folded output's masked weights hold ``mask * weight`` themselves (pruned entries exactly
zero); its graph reads them as they are and masks their gradients (``_runtime.folded``), so
a training step costs what the dense model's does. The graph edits are the rewriter's
(``_rewrite.fold_into_weights``, ``_rewrite.unfold_from_weights``); this module checks what
may be folded and works on a copy unless asked not to.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Iterable
from typing import Any

import torch
import torch.fx
from torch import nn

from . import _emit, _rewrite
from ._compat import OpOverload
from ._errors import EmitError, MaskError
from ._runtime.folded import zero_pruned
from ._tags import Role, is_folded, mask_registry, tagged

# Set on an output once its load-state-dict hook is registered (the hook outlives unfold: it
# then does nothing), so folding again registers none twice.
_REFOLDS_ON_LOAD = "_fxsparse_refolds_on_load"

__all__ = ["fold", "fold_in_place", "refuse_in_place_writes", "refuse_soft_masks", "unfold"]

# Operations whose result may share the memory of their input: a write into it is a write into
# the weight. Matched by name, so both the method and torch's function of that name count.
_MAY_ALIAS = frozenset(
    {
        "getattr", "getitem", "__getitem__", "view", "view_as", "reshape", "reshape_as", "t", "transpose",
        "permute", "expand", "expand_as", "narrow", "select", "squeeze", "unsqueeze", "flatten", "unflatten",
        "movedim", "moveaxis", "swapaxes", "swapdims", "chunk", "split", "unbind", "tensor_split", "hsplit",
        "vsplit", "diagonal", "as_strided", "unfold", "detach", "contiguous", "to", "type_as", "view_as_real",
        "view_as_complex", "real", "imag", "conj", "alias", "masked_gradient", "__iter__", "ravel",
        # ATen's names, as torch.export records views (x[:2] is aten.slice)
        "slice", "split_with_sizes", "unsafe_split", "_unsafe_view", "_reshape_alias", "lift_fresh",
    }
)  # fmt: skip
_IN_PLACE_OPERATORS = frozenset(
    {
        operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
        operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift,
        operator.irshift, operator.imatmul,
    }
)  # fmt: skip


def fold(out: torch.fx.GraphModule, *, inplace: bool = False) -> torch.fx.GraphModule:
    """``out`` with its masks folded into its weights, for fine-tuning without the cost of the product.

    Each masked weight holds ``mask * weight`` itself (its pruned entries exactly zero), the
    graph multiplies nothing in the forward and reads the weight as it is, and the weight's
    gradient is multiplied by its mask on its way back, before it reaches ``weight.grad``
    (and before a DDP all-reduce or an FSDP reduce-scatter). The mask buffers, node names,
    ``state_dict`` keys, :func:`fxsparse.masks.of` and :func:`fxsparse.update_masks` stay as
    they are; each product node is tagged :attr:`Role.FOLDED <fxsparse.Role>` instead of
    ``masked``. ``fxsparse.transform(model, masks, fold=True)`` makes the same in one step.

    With fixed masks, finite weights and an optimizer that leaves an entry with zero
    gradient, zero state and zero value at zero (SGD, Adam, AdamW and the others listed in
    docs/distributed.md), every step's loss, output and effective weight equal
    ``torch.ao.pruning.FakeSparsity``'s bit for bit. Where they differ (documented there):
    a NaN or inf under a pruned entry is gone, and an entry unpruned later by
    ``update_masks`` starts from zero instead of the value FakeSparsity kept.

    Args:
        out: ``fxsparse.transform``'s output (``emit="graph"``), with binary masks.
        inplace: ``False`` (default): ``out`` is not changed, and the folded model is a copy.
            ``True``: ``out``'s own weights are folded, and ``out`` is returned. An output made
            with ``share_weights=True`` shares its weights with its model, which then holds the
            folded weights too (its pruned entries set to zero): the way to fold a model too
            big for two copies, asked for by ``inplace=True``.

    Raises:
        MaskError: ``out`` has no masks, or a mask holds values other than 0 and 1 (named).

    Example:
        >>> import torch, fxsparse
        >>> out = fxsparse.transform(torch.nn.Linear(2, 2), {"weight": torch.eye(2, dtype=torch.bool)})
        >>> folded = fxsparse.fold(out)
        >>> folded.weight[0, 1].item(), sorted(folded.state_dict()) == sorted(out.state_dict())
        (0.0, True)
    """
    _check_output(out, "fold", inplace)
    if is_folded(out.graph):
        return out if inplace else copy.deepcopy(out)
    refuse_soft_masks(_masks_of(out))
    folded = out if inplace else copy.deepcopy(out)
    fold_in_place(folded)
    return folded


def unfold(out: torch.fx.GraphModule, *, inplace: bool = False) -> torch.fx.GraphModule:
    """A folded output (:func:`fold`) as the masked graph again: every use reads ``mask * weight``.

    The weights keep their folded values (pruned entries zero): the raw values FakeSparsity
    would keep under a pruned entry are gone, so an entry unpruned later starts from zero.
    ``inplace`` as for :func:`fold`.

    Example:
        >>> import torch, fxsparse
        >>> out = fxsparse.transform(torch.nn.Linear(2, 2), {"weight": torch.eye(2)}, fold=True)
        >>> "torch.mul" in fxsparse.unfold(out).code, "torch.mul" in out.code
        (True, False)
    """
    _check_output(out, "unfold", inplace)
    unfolded = out if inplace else copy.deepcopy(out)
    _emit.edit_mode_graphs(unfolded, lambda graph, first: _rewrite.unfold_from_weights(graph))
    return unfolded


def fold_in_place(out: torch.fx.GraphModule) -> None:
    """Fold ``out``'s masks into its own weights (its masks checked binary beforehand)."""
    for graph in _emit.mode_graphs(out).values():
        refuse_in_place_writes(graph)  # before any weight is zeroed
    _emit.edit_mode_graphs(out, lambda graph, first: _rewrite.fold_into_weights(out, graph, values=first))
    if not out.__dict__.get(_REFOLDS_ON_LOAD):
        out.register_load_state_dict_post_hook(refold_after_loading)  # type: ignore[no-untyped-call]  # torch leaves it untyped
        out.__dict__[_REFOLDS_ON_LOAD] = True


def refold_after_loading(out: nn.Module, incompatible_keys: Any) -> None:
    """Zero the pruned entries of a folded output's weights again after ``load_state_dict``.

    What is loaded (a masked output's state dict, FakeSparsity's raw weights, a checkpoint)
    may hold values under pruned entries, and a folded graph reads its weights as they are:
    left there, they would count. A module-level function, so the output still pickles.
    """
    if isinstance(out, torch.fx.GraphModule) and is_folded(out.graph):
        for mask, parameter in mask_registry(out.graph).items():
            zero_pruned(out.get_parameter(parameter), out.get_buffer(mask))


def refuse_in_place_writes(graph: torch.fx.Graph) -> None:
    """A ``MaskError`` naming the weight that ``graph`` writes into, through its product or a view of it.

    The masked graph writes into a fresh ``mask * weight`` (as FakeSparsity does), which is
    harmless; a folded graph reads the weight itself, which the write would change for good
    (in ``no_grad``, call after call; with autograd on, torch refuses the write).
    """
    for product, tag in tagged(graph, Role.MASKED, Role.FOLDED):
        reached, seen = [product], {product}
        while reached:
            node = reached.pop()
            for user in node.users:
                if user in seen:
                    continue
                seen.add(user)
                name = _called_name(user)
                called = user.op in ("call_method", "call_function")
                writes = called and user.kwargs.get("out") is node
                if called and user.args and user.args[0] is node:  # the tensor a write would go into
                    writes = writes or user.kwargs.get("inplace") is True or user.target in _IN_PLACE_OPERATORS
                    writes = writes or (name.endswith("_") and not name.startswith("_"))
                if writes:
                    raise MaskError(
                        f"the model writes into the masked weight {tag.param!r} ({name or user.target} in "
                        f"node {user.name!r}); a folded weight is the parameter itself, which the write would "
                        "change for good, where FakeSparsity writes into a fresh mask * weight. Fold only a "
                        "model that does not write into its weights (fold=False keeps the product)"
                    )
                if called and name in _MAY_ALIAS:
                    reached.append(user)


def _called_name(node: torch.fx.Node) -> str:
    """The name of what ``node`` calls: ``"mul_"`` for ``x.mul_``, ``torch.mul_`` and ``aten.mul_.Tensor`` alike
    (an ATen operator's own name holds its overload, ``"mul_.Tensor"``, which no name test would match)."""
    if node.op == "call_method":
        return str(node.target)
    if isinstance(node.target, OpOverload):
        return str(node.target.overloadpacket.__name__)
    return str(getattr(node.target, "__name__", ""))


def refuse_soft_masks(masks: Iterable[tuple[str, torch.Tensor]]) -> None:
    """A ``MaskError`` naming the first parameter whose mask holds values other than 0 and 1."""
    for name, mask in masks:
        if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
            raise MaskError(
                f"mask for {name!r} has values other than 0 and 1, and a folded weight holds mask * weight: "
                "training 0.5 * w is not training w under a 0.5 mask. Fold binary masks only (fold=False "
                "keeps soft masks, as FakeSparsity does)"
            )


def _masks_of(out: torch.fx.GraphModule) -> list[tuple[str, torch.Tensor]]:
    return [(param, out.get_buffer(mask)) for mask, param in mask_registry(out.graph).items()]


def _check_output(out: torch.fx.GraphModule, caller: str, inplace: bool) -> None:
    if not isinstance(out, torch.fx.GraphModule):
        if isinstance(out, torch.nn.Module) and not isinstance(out, torch.jit.ScriptModule):
            advice = (
                "fxsparse.transform(model, masks, fold=True) makes one (masks=None lowers the FakeSparsity "
                "parametrizations a model carries)"
            )
        else:  # TorchScript, torch.export, ONNX: artifacts for inference, which no longer hold a graph to rewrite
            advice = (
                f"{caller} works on the graph before it is emitted (fxsparse.transform(model, masks, fold=True) folds "
                "it there); for inference, fxsparse.freeze(out, emit=...) folds the masks into the artifact"
            )
        raise TypeError(
            f"{caller} takes fxsparse.transform's output (emit='graph'), got {type(out).__name__}: {advice}"
        )
    if not isinstance(inplace, bool):
        raise EmitError(f"inplace must be True or False, got {inplace!r}")
    if not mask_registry(out.graph):
        raise MaskError(f"{type(out).__name__} has no masks to {caller}: pass fxsparse.transform's output")
