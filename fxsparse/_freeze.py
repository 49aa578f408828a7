"""``freeze``: fold each mask into its weight for inference, and run linear weights in the layout chosen.

The graph edits are the rewriter's (``_rewrite.fold_masks``, ``_rewrite.use_layouts``); this
module decides what to fold and which layout each weight gets (``_kernels`` measures), on
a copy of the masked model.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.fx
from torch.overrides import TorchFunctionMode

from . import _capture, _deploy, _emit, _kernels, _rewrite
from ._errors import EmitError, MaskError, describe
from ._tags import Role, mask_registry, role_of
from ._transform import check_arguments

__all__ = ["freeze", "layouts"]


def freeze(
    out: torch.fx.GraphModule,
    *,
    layout: str = "dense",
    emit: str = "graph",
    example_inputs: tuple[Any, ...] | torch.Tensor | None = None,
    example_kwargs: dict[str, Any] | None = None,
    dynamic_shapes: Any = None,
    inplace: bool = False,
) -> Any:
    """A copy of fxsparse's output with every mask folded into its weight, for inference.

    Each masked parameter holds ``mask * weight`` (computed once, as the graph computes
    it), the masks are gone from the graph and the ``state_dict`` (which has the model's
    own keys again), and outputs equal ``out``'s in eval mode bit for bit, at the speed of
    the dense model. ``out`` itself is not changed and stays the one to train.

    The frozen model is for inference: it is in eval mode, whatever mode ``out`` is in
    (``emit="graph"`` of a model traced with torch.fx in both modes can still be switched
    with ``.train()``). An output captured by torch.export in train mode (fine-tuned, say)
    keeps that mode in its graph: ``freeze`` captures the model again, in eval mode, from
    ``out``'s current weights and masks, and so needs ``example_inputs``/``example_kwargs``
    (and the ``dynamic_shapes`` you transformed with) whatever ``emit`` is.

    Args:
        out: ``fxsparse.transform``'s output (``emit="graph"``).
        layout: how each masked ``linear`` weight is stored and run (see :data:`fxsparse.LAYOUTS`):

            * ``"dense"`` (default): folded dense weights; outputs bitwise equal to ``out``'s.
            * ``"auto"``: per layer, times dense ``F.linear`` against every sparse layout its
              mask allows (CSR; BSR for block masks; 2:4 semi-structured on CUDA) on this
              machine, at the input sizes the example inputs give it (else 1 and 64 rows),
              and keeps a sparse one only where it is at least 1.1x faster at every size.
            * ``"csr"``, ``"bsr"``, ``"semi_structured"``: that layout for every masked
              ``linear`` weight (a :class:`MaskError` names any weight that cannot take it).

            A sparse layer's outputs equal the dense ones to float round-off (the sums run
            in another order): within ``rtol=1e-5, atol=1e-5`` in float32 in the tests.
            Its weight is stored as buffers ``<weight>_crow_indices``, ``<weight>_col_indices``
            and ``<weight>_values`` (semi-structured: the parameter itself). Convolution and
            embedding weights, and linear weights that are tied or also read by other
            operations, stay dense.
            :func:`fxsparse.layouts` reports each choice, its measured speed-up and why.
        emit: ``"graph"`` (a ``GraphModule``), ``"script"``, ``"trace"``, ``"export"`` or
            ``"onnx"``: the frozen model in that form, as ``transform``'s ``emit``.
            ``torch.export`` and ONNX cannot carry sparse tensors: with them a sparse
            ``layout`` falls back to ``"dense"`` with a warning.
        example_inputs: as for ``transform``: what ``emit="trace"``, ``"export"`` and ``"onnx"``
            run the model on, and what an output captured by torch.export in train mode is
            captured again with; ``layout="auto"`` measures each layer at the input sizes they give it.
        example_kwargs: keyword inputs, the same way.
        dynamic_shapes: as for ``transform``, for ``emit="export"`` and ``"onnx"``.
        inplace: ``False`` (default): ``out`` is not changed, and the frozen model is a copy
            (for a moment, two copies of the weights are in memory). ``True``: the masks are
            folded into ``out``'s own weights, one at a time, and no copy of the model is
            made: ``out`` is consumed. Use the returned model, never ``out`` again (with
            ``emit="graph"`` it is ``out`` itself, frozen; where ``out`` had to be captured
            again in eval mode, ``out`` gives up its masks and a call of it fails). The
            other emits (and a sparse ``layout``) make their artifact from the frozen
            weights as usual. An output made with ``transform(..., share_weights=True)``
            shares its weights with its model, which then holds the folded weights too.

    Example:
        >>> import torch, fxsparse
        >>> out = fxsparse.transform(torch.nn.Linear(2, 2), {"weight": torch.eye(2)})
        >>> frozen = fxsparse.freeze(out)
        >>> sorted(frozen.state_dict()), frozen.weight[0, 1].item() == 0
        (['bias', 'weight'], True)
    """
    if not isinstance(out, torch.fx.GraphModule):
        raise TypeError(f"freeze takes fxsparse.transform's output (emit='graph'), got {type(out).__name__}")
    _kernels.check_layout(layout)
    if not isinstance(inplace, bool):
        raise EmitError(f"inplace must be True or False, got {inplace!r}")
    if emit == "parametrize":
        raise EmitError("freeze cannot emit 'parametrize': a frozen model has no masks left to parametrize")
    args, kwargs = check_arguments("auto", emit, example_inputs, example_kwargs, dynamic_shapes)
    if layout != "dense" and emit in ("export", "onnx"):
        warnings.warn(
            f"emit={emit!r} cannot carry sparse weights (torch.export does not export sparse CSR/BSR or "
            f"semi-structured tensors): layout={layout!r} falls back to 'dense'",
            UserWarning,
            stacklevel=2,
        )
        layout = "dense"
    if not mask_registry(out.graph):
        already = any(role_of(n) is Role.FROZEN for n in out.graph.nodes)
        hint = " (it is frozen already: freeze the masked graph itself, with the layout= you want)" if already else ""
        raise MaskError(f"{type(out).__name__} has no mask * weight to fold{hint}: pass fxsparse.transform's output")
    if _deploy.captured_in_train_mode(out):  # its graph keeps train mode: capture the eval mode's
        frozen: torch.fx.GraphModule = _deploy.recaptured(out, args, kwargs, dynamic_shapes, inplace)
    else:
        frozen = out if inplace else copy.deepcopy(out)
        _to_eval_mode(frozen)  # before anything changes: a refusal leaves an in-place `out` as it was
    masks: dict[str, torch.Tensor] = {}  # each folded parameter's mask, from the current mode's graph
    _emit.edit_mode_graphs(frozen, lambda graph, first: masks.update(_rewrite.fold_masks(frozen, graph, first)))
    if layout != "dense":
        _store_in_layout(frozen, masks, layout, args, kwargs)
        # the layouts were chosen on this mode's graph: the frozen model keeps it alone
        if len(_emit.mode_graphs(frozen)) > 1:
            _emit.keep_mode_graphs(frozen, {frozen.training: frozen.graph})
        frozen.recompile()
    return _emit.emit_as(frozen, emit, args, kwargs, dynamic_shapes)


def _to_eval_mode(frozen: torch.fx.GraphModule) -> None:
    try:
        frozen.eval()
    except EmitError as exc:  # an FX capture of a model that traces in train mode only
        raise EmitError(
            f"freeze makes an inference model, in eval mode, and this output cannot run in eval mode: {exc}. "
            "fxsparse.transform(fxsparse.to_model(out, masks='parametrize').eval(), ...) captures the trained model "
            "in eval mode: freeze that"
        ) from exc


def layouts(frozen: torch.fx.GraphModule) -> dict[str, _kernels.LayoutChoice]:
    """How :func:`freeze` stored each masked ``linear`` weight of ``frozen``: ``{parameter: LayoutChoice}``.

    Read from the graph's node meta, so it survives copies and ``torch.save``. Empty for a
    model frozen with ``layout="dense"`` (nothing was chosen).

    Example:
        >>> import torch, fxsparse
        >>> out = fxsparse.transform(torch.nn.Linear(8, 8), {"weight": torch.eye(8)})
        >>> frozen = fxsparse.freeze(out, layout="csr")
        >>> print(fxsparse.layouts(frozen)["weight"])
        csr
    """
    if not isinstance(frozen, torch.fx.GraphModule):
        raise TypeError(f"layouts takes fxsparse.freeze's output, got {type(frozen).__name__}")
    return _kernels.layouts_in(frozen.graph)


def _store_in_layout(
    frozen: torch.fx.GraphModule,
    masks: Mapping[str, torch.Tensor],
    layout: str,
    args: tuple[Any, ...] | None,
    kwargs: dict[str, Any] | None,
) -> None:
    uses = _rewrite.frozen_linear_uses(frozen.graph)
    measuring = layout == "auto" and (args is not None or kwargs is not None)
    rows = _input_rows(frozen, uses, args, kwargs) if measuring else {}
    names: dict[int, list[str]] = {}
    for name, parameter in frozen.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    candidates = []
    for param, (linear, other) in uses.items():
        if not linear:
            continue  # a convolution's or embedding's weight: no sparse kernel here
        weight = frozen.get_parameter(param)
        blocked = ""
        if other:
            readers = ", ".join(f"{node.name} ({getattr(node.target, '__name__', node.target)})" for node in other)
            blocked = f"also read by {readers}, which needs it dense"
        elif len(names[id(weight)]) > 1:
            blocked = f"tied to {', '.join(n for n in names[id(weight)] if n != param)}: a tied weight stays dense"
        bias_node = _rewrite.bias_argument(linear[0])
        bias = None
        if isinstance(bias_node, torch.fx.Node) and bias_node.op == "get_attr":
            value = _capture.lookup(frozen, str(bias_node.target))
            bias = value if isinstance(value, torch.Tensor) else None
        rows_seen = rows.get(param, _kernels.DEFAULT_ROWS)
        candidates.append(_kernels.Candidate(param, weight, bias, masks[param], rows_seen, blocked))
    choices = _kernels.choose(candidates, layout)
    stored: dict[str, Any] = {}
    for candidate in candidates:
        chosen = choices[candidate.param].layout
        if chosen == "semi_structured":
            stored[candidate.param] = _kernels.semi_structured(candidate.weight)
        elif chosen in ("csr", "bsr"):
            stored[candidate.param] = _kernels.sparse_parts(candidate.weight, chosen, candidate.blocksize)
    _rewrite.use_layouts(frozen, frozen.graph, choices, stored)


def _input_rows(
    frozen: torch.fx.GraphModule,
    uses: Mapping[str, tuple[list[torch.fx.Node], list[torch.fx.Node]]],
    args: tuple[Any, ...] | None,
    kwargs: dict[str, Any] | None,
) -> dict[str, tuple[int, ...]]:
    """The input rows (all but the last dimension) each frozen linear weight sees on the example inputs."""
    by_weight = {id(frozen.get_parameter(param)): param for param, (linear, _) in uses.items() if linear}
    seen: dict[str, set[int]] = {}

    class Recorder(TorchFunctionMode):
        def __torch_function__(self, func: Any, types: Any, call_args: Any = (), call_kwargs: Any = None) -> Any:
            call_kwargs = call_kwargs or {}
            if func in _rewrite.LINEAR_CALLS:
                x = call_args[0] if call_args else call_kwargs.get("input")
                weight = call_args[1] if len(call_args) > 1 else call_kwargs.get("weight")
                if id(weight) in by_weight and x.shape[-1]:
                    seen.setdefault(by_weight[id(weight)], set()).add(max(x.numel() // x.shape[-1], 1))
            return func(*call_args, **call_kwargs)

    # Measuring must not change the model: no batch-norm statistics updated, no buffer written.
    buffers = {name: buffer.clone() for name, buffer in frozen.named_buffers()}
    training = frozen.training
    try:
        with torch.no_grad(), Recorder():
            frozen.eval()(*(args or ()), **(kwargs or {}))
    except Exception as exc:
        raise EmitError(
            f"layout='auto' runs the model on example_inputs/example_kwargs to learn each layer's input "
            f"size, and it failed: {describe(exc)}"
        ) from exc
    finally:
        frozen.train(training)
        with torch.no_grad():
            for name, value in buffers.items():
                frozen.get_buffer(name).copy_(value)
    return {param: tuple(sorted(rows)) for param, rows in seen.items()}
