"""``transform``: plan → capture → rewrite → emit."""

from __future__ import annotations

import dataclasses
import traceback
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.nn.utils import parametrize

from . import _capture, _emit, _fold, _functions, _rewrite
from ._errors import EmitError, MaskError, TraceError
from ._plan import MASK_SUFFIX, Plan, build_plan
from ._tags import is_folded, mask_registry

__all__ = ["CAPTURES", "check_arguments", "plan", "transform"]


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
    share_weights: bool = False,
    fold: bool = False,
) -> Any:
    """Mask weights of ``model`` as ``torch.ao.pruning.FakeSparsity`` would, as an explicit FX graph rewrite.

    Args:
        model: any ``nn.Module`` (a ``GraphModule`` too). It is never modified, and
            the result shares no parameter or buffer storage with it (unless ``share_weights``).
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
        share_weights: ``False`` (default): the output works on a copy of the model's
            weights. ``True``: the output holds the model's own parameters (the same
            ``nn.Parameter`` objects, weights and biases) instead of copies, so a model too
            big for two copies in memory can be pruned: the output aliases the model's
            weights, and training one trains the other (an optimizer over
            ``out.parameters()`` updates ``model``'s, and ``fxsparse.freeze(out,
            inplace=True)`` folds the masks into them). fxsparse itself still changes
            neither the model's structure (modules, hooks, parametrizations) nor its values.
            Buffers are copied even so (a few, small): batch-norm statistics the output
            updates in train mode do not reach the model. The masks given are not copied
            either where they already are ``bool`` (or the weight's dtype) on the weight's
            device: the output's mask buffers are those tensors, so change neither
            afterwards (``fxsparse.update_masks`` replaces masks safely).
        fold: ``False`` (default): the graph computes ``mask * weight`` on every forward, as
            FakeSparsity does. ``True``: for fine-tuning without the product's cost, each masked
            weight holds ``mask * weight`` itself (pruned entries exactly zero), the graph reads
            it as it is, and its gradient is multiplied by the mask before anything else sees it
            (see :func:`fxsparse.fold`, which does the same to an output, and
            :func:`fxsparse.unfold`). Binary masks only; ``emit="graph"`` only; not with
            ``share_weights=True``, which would write the zeros into the model's own weights
            (``fxsparse.fold(out, inplace=True)`` does that, when asked).

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
    args, kwargs = check_arguments(capture, emit, example_inputs, example_kwargs, dynamic_shapes)
    _check_fold(model, fold, share_weights, emit)
    # Python's garbage collector stays as the caller has it: it is process-wide, and other threads
    # (and the model's own forward, which capture runs) must not find it switched off.
    root, the_plan = _prepare(model, masks, share_weights)
    if fold:  # before the capture: a soft mask is refused at once
        _fold.refuse_soft_masks((p.name, p.mask) for p in the_plan.parameters)
    if emit == "parametrize":
        return _emit.parametrized(root, the_plan)
    exported = None
    modes: dict[bool, torch.fx.Graph] | None = None
    modes_bound: dict[bool, dict[str, bool]] | None = None
    traced_through: list[type[torch.autograd.Function]] = []  # custom Functions whose backward is lost
    if capture == "export":
        exported = _export(root, args or (), kwargs, dynamic_shapes, traced_through)
    else:
        try:
            with _functions.autograd_functions(keep=True) as traced_through:
                modes_read: dict[str, bool] = {}
                graph, the_plan = _capture.trace(root, the_plan, concrete_args, modes_read)
                modes, modes_bound, the_plan = _trace_other_mode(root, graph, the_plan, concrete_args, modes_read)
        except TraceError as fx_failure:
            if capture == "fx":
                raise
            traced_through = []
            # The failed trace's copy goes before the export makes another: the frames of its
            # traceback hold it (a whole model's weights, unless shared).
            _forget_the_frames_of(fx_failure)
            del root, the_plan
            root, the_plan, exported = _export_instead(
                model, masks, fx_failure, args, kwargs, dynamic_shapes, traced_through, share_weights
            )
    if exported is not None:
        graph, the_plan = exported.graph, dataclasses.replace(the_plan, kept={})  # hooks are in it
        modes = modes_bound = None
    # An fxsparse output transformed again: its masks, as its own graph's tags record them
    # (the new capture traced its code again and lost them).
    registry = mask_registry(model.graph) if isinstance(model, torch.fx.GraphModule) else {}
    _capture.refuse_reads_of_the_original(model, root, graph, exported, share_weights)
    other_mode = None if modes is None else modes.get(not root.training)
    if other_mode is not None:
        _capture.refuse_reads_of_the_original(model, root, other_mode, None, share_weights)
    # Sharing weights, the masks given are shared too (documented); else the output owns copies.
    masks_held = "adopt" if share_weights else "copy"
    _rewrite.rewrite(root, graph, the_plan, exported, registry, masks=masks_held)
    if other_mode is not None:
        _rewrite.rewrite(root, other_mode, the_plan, None, registry, masks="registered")
    # An fxsparse output captured by torch.export and traced again by FX is still an ATen graph.
    was_exported = isinstance(model, torch.fx.GraphModule) and _emit.captured_by(model) == "export"
    capture_used = "export" if exported is not None or was_exported else "fx"
    out = _emit.graph_module(root, graph, capture_used, modes, modes_bound)
    if fold:
        _fold.fold_in_place(out)  # the output's own weights: copies of the model's (share_weights is refused)
    for function in traced_through:
        how = (
            "torch.export inlines every custom autograd.Function"
            if exported is not None
            else ("torch.fx traced through it: generated code cannot spell its other arguments")
        )
        warnings.warn(
            f"the custom autograd.Function {function.__module__}.{function.__qualname__} is not kept as a call "
            f"({how}): the output computes its forward's operations, and autograd differentiates those, not "
            f"{function.__qualname__}.backward, so gradients through it may differ from the model's"
            + (" (capture='fx' keeps it as a call)" if exported is not None else ""),
            UserWarning,
            stacklevel=2,
        )
    # A module registered under two names holds its mask under both; ONNX may pick either.
    mask_names = {f"{alias}{MASK_SUFFIX}" for p in the_plan.parameters for alias in p.aliases}
    return _emit.emit_as(out, emit, args, kwargs, dynamic_shapes, mask_names)


def _check_fold(model: nn.Module, fold: bool, share_weights: bool, emit: str) -> None:
    if not isinstance(fold, bool):
        raise MaskError(f"fold must be True or False, got {fold!r}")
    if isinstance(model, torch.fx.GraphModule) and is_folded(model.graph):
        raise MaskError(
            "this output is folded (its weights hold mask * weight, fxsparse.fold): transform "
            "fxsparse.unfold(out) instead, or change its masks in place with fxsparse.update_masks"
        )
    if not fold:
        return
    if share_weights:
        raise MaskError(
            "fold=True with share_weights=True would write mask * weight (zeros at every pruned entry) into "
            "the model's own parameters, which the output shares. Pass share_weights=False (the output folds "
            "its own copy), or ask for it explicitly: out = fxsparse.transform(model, masks, share_weights=True); "
            "fxsparse.fold(out, inplace=True)"
        )
    if emit != "graph":
        raise EmitError(
            f"fold=True makes a model to train, which only emit='graph' keeps as such, got emit={emit!r}; "
            "for an inference artifact, fxsparse.freeze(out, emit=...) folds the masks"
        )


def _forget_the_frames_of(failure: BaseException) -> None:
    """Clear the local variables of the finished frames ``failure`` and its causes passed through."""
    seen: set[int] = set()
    chained: BaseException | None = failure
    while chained is not None and id(chained) not in seen:
        seen.add(id(chained))
        traceback.clear_frames(chained.__traceback__)
        chained = chained.__cause__ or chained.__context__


def _export(
    root: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any] | None,
    dynamic_shapes: Any,
    traced_through: list[type[torch.autograd.Function]],
) -> _capture.Exported:
    """``_capture.export``, adding the custom autograd Functions it inlined to ``traced_through``."""
    with _functions.autograd_functions(keep=False) as inlined:
        exported = _capture.export(root, args, kwargs, dynamic_shapes)
    traced_through.extend(inlined)
    return exported


def _trace_other_mode(
    root: nn.Module,
    graph: torch.fx.Graph,
    plan: Plan,
    concrete_args: dict[str, Any] | None,
    modes_read: dict[str, bool],
) -> tuple[dict[bool, torch.fx.Graph] | None, dict[bool, dict[str, bool]] | None, Plan]:
    """Trace ``root`` again in the other mode (``train``/``eval``): a graph per mode where they differ.

    FX runs Python branches on ``self.training`` once and keeps the branch taken (timm's
    DropPath, ``F.dropout(x, p, self.training)``): such a graph would keep the mode it
    was traced in after ``out.train()``/``out.eval()``. Returns the graphs (``None`` where
    both modes trace the same code; the given mode's graph alone where the other mode cannot
    be traced, and the output then refuses to switch), the modes of the modules whose
    ``training`` each mode's graph read (``None`` where nothing depends on them), and the
    plan. The modules' own modes are left as found.
    """
    if not modes_read:  # no code the trace ran read a training flag: the other mode traces the same
        return None, None, plan
    modes = [(module, module.training) for module in root.modules()]
    given = root.training
    other = not given
    other_modes_read: dict[str, bool] = {}
    try:
        root.train(other)
        other_graph, plan = _capture.trace(root, plan, concrete_args, other_modes_read)
    except (TraceError, EmitError):
        # The model's code traces in the mode it was given only (`torch.rand(x.shape[0], 1)` on a
        # train-mode branch), or it is an fxsparse output that runs in one mode (EmitError on the
        # switch): keep that mode's graph alone, and refuse a switch rather than run it wrongly.
        return {given: graph}, {given: modes_read}, plan
    finally:
        for module, training in modes:
            module.training = training
    bound = {given: modes_read, other: other_modes_read}
    if _same_nodes(graph, other_graph):
        # One graph for both modes, as traced with every module in one mode or the other; a module
        # in the other mode than the root's (a frozen block) may have traced a branch of its own.
        mixed = any(training is not root.training for training in modes_read.values())
        return None, bound if mixed else None, plan
    return {root.training: graph, other: other_graph}, bound, plan


def _same_nodes(first: torch.fx.Graph, second: torch.fx.Graph) -> bool:
    """Whether two traces made the same nodes: ops, names, targets and arguments (nodes by name)."""

    def described(node: torch.fx.Node) -> tuple[Any, ...]:
        arguments = torch.fx.node.map_arg((node.args, node.kwargs), lambda argument: argument.name)
        return node.op, node.name, node.target, repr(arguments)

    return len(first.nodes) == len(second.nodes) and all(
        described(a) == described(b) for a, b in zip(first.nodes, second.nodes, strict=True)
    )


def _export_instead(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor] | None,
    fx_failure: TraceError,
    args: tuple[Any, ...] | None,
    kwargs: dict[str, Any] | None,
    dynamic_shapes: Any,
    traced_through: list[type[torch.autograd.Function]],
    share_weights: bool,
) -> tuple[nn.Module, Plan, _capture.Exported]:
    """``capture="auto"`` after FX failed: capture a fresh copy (tracing may have left attributes) with torch.export."""
    if args is None and kwargs is None:
        raise TraceError(
            f"{fx_failure} -- or pass example_inputs and/or example_kwargs: with them, fxsparse captures "
            "models that torch.fx cannot trace with torch.export instead"
        ) from fx_failure
    root, the_plan = _prepare(model, masks, share_weights)
    try:
        exported = _export(root, args or (), kwargs, dynamic_shapes, traced_through)
    except TraceError as export_failure:
        # The export's reason first: it is about the inputs given, which the user can change.
        raise TraceError(
            f"fxsparse could not capture {type(model).__name__} either way (pass capture='fx' or "
            f"capture='export' to try only one).\nWith torch.export: {export_failure}\nWith torch.fx: {fx_failure}"
        ) from export_failure
    return root, the_plan, exported


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


def _prepare(
    model: nn.Module, masks: Mapping[str, torch.Tensor] | None, share_weights: bool = False
) -> tuple[nn.Module, Plan]:
    if not isinstance(model, nn.Module):
        raise MaskError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(share_weights, bool):
        raise MaskError(f"share_weights must be True or False, got {share_weights!r}")
    root = _capture.copy_model(model, share_parameters=share_weights)
    inherited = _capture.lower_fake_sparsity(root)
    # Sharing, the masks given are taken as they are too (where already bool or in the weight's
    # dtype, on its device): a language model's masks are half its bfloat16 weights' size.
    return root, build_plan(root, _require_masks(masks, inherited), inherited, copy_masks=not share_weights)


def _require_masks(
    masks: Mapping[str, torch.Tensor] | None, inherited: Mapping[str, torch.Tensor]
) -> Mapping[str, Any]:
    if masks is None and not inherited:
        raise MaskError(
            "masks is None and the model carries no FakeSparsity parametrizations; pass a mapping "
            "from parameter or module names to mask tensors, e.g. {'seq.0.weight': mask}"
        )
    return {} if masks is None else masks


def check_arguments(
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
