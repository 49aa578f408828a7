"""``transform``: plan → capture → rewrite → emit."""

from __future__ import annotations

import copy
import dataclasses
import gc
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode

from . import _capture, _emit, _kernels, _rewrite
from ._errors import EmitError, MaskError, TraceError, describe
from ._plan import MASK_SUFFIX, Plan, build_plan

__all__ = ["CAPTURES", "freeze", "layouts", "plan", "transform"]


CAPTURES = ("auto", "fx", "export")


def transform(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor] | None = None,
    *,
    capture: str = "auto",
    emit: str = "graph",
    example_inputs: tuple[Any, ...] | torch.Tensor | None = None,
    example_kwargs: dict[str, Any] | None = None,
    dynamic_shapes: Any = None,
    concrete_args: dict[str, Any] | None = None,
) -> Any:
    """Mask weights of ``model`` as ``torch.ao.pruning.FakeSparsity`` would, as an explicit FX graph rewrite.

    Args:
        model: any ``nn.Module`` (a ``GraphModule`` too). It is never modified, and
            the result shares no parameter or buffer storage with it.
        masks: maps a parameter's fully qualified name (``"seq.0.weight"``, any alias of
            a tied parameter) or a module's name (``"seq.0"``, meaning its ``weight``)
            to a mask of exactly the parameter's shape; bool, integer or floating, soft
            values allowed (the weight becomes ``mask * weight``). ``None`` takes the
            masks of the ``FakeSparsity`` parametrizations the model carries (as
            ``torch.ao.pruning`` sparsifiers leave them); explicit masks replace those.
        capture: how to get the model's graph. ``"fx"``: ``torch.fx`` symbolic tracing,
            which needs no inputs and keeps the model's own functions in the graph.
            ``"export"``: ``torch.export`` (non-strict) on the example inputs, which
            handles most models FX cannot (Hugging Face transformers) and gives a graph
            of ATen operators that accepts the inputs it was exported with.
            ``"auto"`` (default): ``"fx"``, and ``"export"`` if FX fails and example
            inputs are given. ``out.meta["fxsparse"]["capture"]`` says which one ran.
        emit: the output format, one of ``"graph"``, ``"parametrize"``, ``"script"``,
            ``"trace"``, ``"export"``, ``"onnx"`` (see :data:`fxsparse.EMITS`).
        example_inputs: positional inputs for capturing with ``torch.export`` and for
            ``emit="trace"``, ``"export"`` and ``"onnx"`` (a tuple; a lone tensor is
            taken as a 1-tuple).
        example_kwargs: keyword inputs for the same (``{"input_ids": ids}``).
        dynamic_shapes: dimensions that stay dynamic, as ``torch.export.export`` takes
            them (``{"input_ids": {0: Dim("batch"), 1: Dim("seq")}}``); passed to
            every export fxsparse runs. Without it, every size is fixed at the example's.
        concrete_args: inputs of ``model.forward`` to fix while tracing with FX, as in
            ``torch.fx.symbolic_trace`` (e.g. ``{"use_cache": False}``).

    Returns:
        For ``"graph"`` a ``torch.fx.GraphModule`` whose ``state_dict`` holds every key
        of ``model.state_dict()`` plus ``"<param>_mask"`` per masked parameter; for
        ``"parametrize"`` an ``nn.Module``; for ``"script"``/``"trace"`` a
        ``torch.jit.ScriptModule``; for ``"export"`` a ``torch.export.ExportedProgram``;
        for ``"onnx"`` a ``torch.onnx.ONNXProgram`` (needs ``fxsparse[onnx]``).

    Raises:
        MaskError: a mask or key is unusable (the message names it and what was expected).
        TraceError: the model cannot be captured (with ``"auto"``, the reasons of both captures).
        EmitError: ``emit`` is unknown, lacks example inputs, or its backend failed.

    Example:
        >>> import torch, fxsparse
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> out = fxsparse.transform(model, {"0": torch.rand(4, 4) > 0.5, "2.weight": torch.ones(2, 4)})
        >>> sorted(k for k in out.state_dict() if k.endswith("_mask"))
        ['0.weight_mask', '2.weight_mask']
    """
    args, kwargs = _check_arguments(capture, emit, example_inputs, example_kwargs, dynamic_shapes)
    # The pass allocates many small objects that all live on; generational GC scans
    # would only re-walk them (measured: up to 1.3x the whole transform on big models).
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        root, the_plan = _prepare(model, masks)
        if emit == "parametrize":
            return _emit.parametrized(root, the_plan)
        exported = None
        if capture == "export":
            exported = _capture.export(root, args or (), kwargs, dynamic_shapes)
        else:
            try:
                graph, the_plan = _capture.trace(root, the_plan, concrete_args)
            except TraceError as fx_failure:
                if capture == "fx":
                    raise
                root, the_plan, exported = _export_instead(model, masks, fx_failure, args, kwargs, dynamic_shapes)
        if exported is not None:
            graph, the_plan = exported.graph, dataclasses.replace(the_plan, kept={})  # hooks are in the graph
        _rewrite.rewrite(root, graph, the_plan, exported)
        # An fxsparse output captured by torch.export and traced again by FX is still an ATen graph.
        was_exported = isinstance(model, torch.fx.GraphModule) and _emit.captured_by(model) == "export"
        out = _emit.graph_module(root, graph, "export" if exported is not None or was_exported else "fx")
    finally:
        if gc_was_enabled:
            gc.enable()
    # A module registered under two names holds its mask under both; ONNX may pick either.
    mask_names = {f"{alias}{MASK_SUFFIX}" for p in the_plan.parameters for alias in p.aliases}
    return _emit.emit_as(out, emit, args, kwargs, dynamic_shapes, mask_names)


def _export_instead(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor] | None,
    fx_failure: TraceError,
    args: tuple[Any, ...] | None,
    kwargs: dict[str, Any] | None,
    dynamic_shapes: Any,
) -> tuple[nn.Module, Plan, _capture.Exported]:
    """``capture="auto"`` after FX failed: capture a fresh copy (tracing may have left attributes) with torch.export."""
    if args is None and kwargs is None:
        raise TraceError(
            f"{fx_failure} -- or pass example_inputs and/or example_kwargs: with them, fxsparse captures "
            "models that torch.fx cannot trace with torch.export instead"
        ) from fx_failure
    root, the_plan = _prepare(model, masks)
    try:
        exported = _capture.export(root, args or (), kwargs, dynamic_shapes)
    except TraceError as export_failure:
        raise TraceError(
            f"fxsparse could not capture {type(model).__name__} either way (pass capture='fx' or "
            f"capture='export' to try only one).\nWith torch.fx: {fx_failure}\nWith torch.export: {export_failure}"
        ) from export_failure
    return root, the_plan, exported


def freeze(
    out: torch.fx.GraphModule,
    *,
    layout: str = "dense",
    emit: str = "graph",
    example_inputs: tuple[Any, ...] | torch.Tensor | None = None,
    example_kwargs: dict[str, Any] | None = None,
    dynamic_shapes: Any = None,
) -> Any:
    """A copy of fxsparse's output with every mask folded into its weight, for inference.

    Each masked parameter holds ``mask * weight`` (computed once, as the graph computes
    it), the masks are gone from the graph and the ``state_dict`` (which has the model's
    own keys again), and outputs equal ``out``'s bit for bit, at the speed of the dense
    model. ``out`` itself is not changed and stays the one to train.

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
            run the model on; ``layout="auto"`` measures each layer at the input sizes they give it.
        example_kwargs: keyword inputs, the same way.
        dynamic_shapes: as for ``transform``, for ``emit="export"`` and ``"onnx"``.

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
    if emit == "parametrize":
        raise EmitError("freeze cannot emit 'parametrize': a frozen model has no masks left to parametrize")
    args, kwargs = _check_arguments("auto", emit, example_inputs, example_kwargs, dynamic_shapes)
    if layout != "dense" and emit in ("export", "onnx"):
        warnings.warn(
            f"emit={emit!r} cannot carry sparse weights (torch.export does not export sparse CSR/BSR or "
            f"semi-structured tensors): layout={layout!r} falls back to 'dense'",
            UserWarning,
            stacklevel=2,
        )
        layout = "dense"
    frozen = copy.deepcopy(out)
    masks = _rewrite.fold_masks(frozen, frozen.graph)
    if not masks:
        already = any(n.meta.get(_rewrite.META_KEY, {}).get("role") == "frozen" for n in out.graph.nodes)
        hint = " (it is frozen already: freeze the masked graph itself, with the layout= you want)" if already else ""
        raise MaskError(f"{type(out).__name__} has no mask * weight to fold{hint}: pass fxsparse.transform's output")
    frozen.recompile()
    if layout != "dense":
        _store_in_layout(frozen, masks, layout, args, kwargs)
        frozen.recompile()
    return _emit.emit_as(frozen, emit, args, kwargs, dynamic_shapes)


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


def plan(model: nn.Module, masks: Mapping[str, torch.Tensor] | None = None) -> Plan:
    """The :class:`Plan` that ``transform(model, masks)`` would carry out, without tracing.

    Example:
        >>> import torch, fxsparse
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> print(fxsparse.plan(model, {"0": torch.eye(4)}))
        Plan(1 masked parameters)
          0.weight (4, 4) float32 density 0.250
    """
    if isinstance(model, nn.Module) and not any(parametrize.is_parametrized(m) for m in model.modules()):
        return build_plan(model, _require_masks(masks, {}), {})  # no lowering, so no copy needed
    return _prepare(model, masks)[1]


def _prepare(model: nn.Module, masks: Mapping[str, torch.Tensor] | None) -> tuple[nn.Module, Plan]:
    if not isinstance(model, nn.Module):
        raise MaskError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    root = _capture.copy_model(model)
    inherited = _capture.lower_fake_sparsity(root)
    return root, build_plan(root, _require_masks(masks, inherited), inherited)


def _require_masks(
    masks: Mapping[str, torch.Tensor] | None, inherited: Mapping[str, torch.Tensor]
) -> Mapping[str, Any]:
    if masks is None and not inherited:
        raise MaskError(
            "masks is None and the model carries no FakeSparsity parametrizations; pass a mapping "
            "from parameter or module names to mask tensors, e.g. {'seq.0.weight': mask}"
        )
    return {} if masks is None else masks


def _check_arguments(
    capture: str,
    emit: str,
    example_inputs: tuple[Any, ...] | torch.Tensor | None,
    example_kwargs: dict[str, Any] | None,
    dynamic_shapes: Any,
) -> tuple[tuple[Any, ...] | None, dict[str, Any] | None]:
    if capture not in CAPTURES:
        raise TraceError(f"capture must be one of {', '.join(repr(c) for c in CAPTURES)}, got {capture!r}")
    if emit not in _emit.EMITS:
        raise EmitError(f"emit must be one of {', '.join(repr(e) for e in _emit.EMITS)}, got {emit!r}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if example_inputs is not None and not isinstance(example_inputs, tuple):
        raise EmitError(f"example_inputs must be a tuple of positional inputs, got {type(example_inputs).__name__}")
    if example_kwargs is not None and not isinstance(example_kwargs, dict):
        raise EmitError(f"example_kwargs must be a dict of keyword inputs, got {type(example_kwargs).__name__}")
    if example_inputs is None and example_kwargs is None:
        if dynamic_shapes is not None:
            raise TraceError(
                "dynamic_shapes describes dimensions of the example inputs: pass example_inputs "
                "and/or example_kwargs with it"
            )
        if capture == "export" and emit != "parametrize":  # "parametrize" captures nothing
            raise TraceError(
                "capture='export' runs the model: pass example_inputs (a tuple of positional inputs) "
                "and/or example_kwargs (a dict of keyword inputs)"
            )
        if emit in _emit.NEEDS_INPUTS:
            raise EmitError(
                f"emit={emit!r} runs the model: pass example_inputs (a tuple of positional inputs) "
                "and/or example_kwargs (a dict of keyword inputs)"
            )
    return example_inputs, example_kwargs
