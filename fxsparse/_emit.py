"""Emit: turn the rewritten graph (or the plan) into the output format the caller asked for."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from . import _capture
from ._errors import EmitError
from ._plan import Plan
from ._rewrite import retag
from ._runtime import call_with_parameters

__all__ = ["EMITS", "MaskedGraphModule", "graph_module", "parametrized", "to_export", "to_script", "to_trace"]

EMITS: dict[str, str] = {
    "graph": "a torch.fx.GraphModule with an explicit mask * weight node per masked parameter",
    "parametrize": "a copy of the model with torch.ao.pruning.FakeSparsity registered on each masked weight",
    "script": "a torch.jit.ScriptModule scripted from the masked graph",
    "trace": "a torch.jit.ScriptModule traced from the masked graph with example_inputs",
    "export": "a torch.export.ExportedProgram of the masked graph with example_inputs",
}
NEEDS_INPUTS = frozenset({"trace", "export"})


@functools.cache
def _graph_module_only() -> frozenset[str]:
    """Instance attributes a GraphModule keeps for its code; everything else is the module's own state."""
    return frozenset(vars(torch.fx.GraphModule(nn.Module(), torch.fx.Graph()))) - frozenset(vars(nn.Module()))


class MaskedGraphModule(torch.fx.GraphModule):
    """The ``GraphModule`` fxsparse returns: the graph over the model's whole module tree.

    ``GraphModule(root, graph)`` keeps only the attributes the graph reads, under plain
    containers, and rebuilds itself that way on ``copy.deepcopy`` and pickling (so
    unused parameters vanish and non-persistent buffers turn persistent). This one
    keeps every module, parameter, buffer (persistent or not), hook and attribute of
    the model, so ``state_dict`` round-trips exactly through every copy and save.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> MaskedGraphModule:
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied  # before the state: a submodule may refer back to its root
        state = copy.deepcopy(_module_state(self), memo)
        return _assemble(state, copy.deepcopy(self.graph, memo), type(self).__name__, copied)

    def __reduce__(self) -> tuple[Any, ...]:
        # GraphModule pickles its code, not its Graph (the code is the stable format);
        # ours adds the module state the code-based rebuild would drop.
        return (_unpickle, (super().__reduce__(), _module_state(self), type(self).__name__))


def graph_module(root: nn.Module, graph: torch.fx.Graph) -> MaskedGraphModule:
    """A ``MaskedGraphModule`` running ``graph`` over ``root``'s whole module tree and state."""
    return _assemble(_module_state(root), graph, type(root).__name__)


def _module_state(module: nn.Module) -> dict[str, Any]:
    graph_module_only = _graph_module_only()
    return {key: value for key, value in vars(module).items() if key not in graph_module_only}


def _assemble(
    state: dict[str, Any], graph: torch.fx.Graph, class_name: str, out: MaskedGraphModule | None = None
) -> MaskedGraphModule:
    if out is None:
        out = MaskedGraphModule.__new__(MaskedGraphModule)
    torch.fx.GraphModule.__init__(out, nn.Module(), torch.fx.Graph(), class_name=class_name)
    out.__dict__.update(state)
    # Unpickling traces the code again with this tracer: it finds parameters by a dict, not by a scan.
    out._tracer_cls = _capture.Tracer
    out.graph = graph  # compiles forward once
    return out


def _unpickle(reduced: tuple[Any, ...], state: dict[str, Any], class_name: str) -> MaskedGraphModule:
    rebuild, arguments = reduced
    graph = rebuild(*arguments).graph
    retag(graph)
    return _assemble(state, graph, class_name)


def parametrized(root: nn.Module, plan: Plan) -> nn.Module:
    """``root`` with a ``FakeSparsity(mask)`` on every name of every masked parameter."""
    from torch.ao.pruning.sparsifier.utils import FakeSparsity

    for p in plan.parameters:
        for alias in p.aliases:
            owner, _, attribute = alias.rpartition(".")
            parametrization = FakeSparsity(p.mask)  # type: ignore[no-untyped-call]
            parametrize.register_parametrization(root.get_submodule(owner), attribute, parametrization)
    return root


def to_script(gm: torch.fx.GraphModule) -> torch.jit.ScriptModule:
    calls = gm.graph.find_nodes(op="call_function", target=call_with_parameters)
    kept = {str(n.args[0].target): n.meta.get("fxsparse", {}).get("why", "kept") for n in calls}
    if kept:
        reasons = "; ".join(f"{name!r} {why}" for name, why in sorted(kept.items()))
        raise EmitError(
            f"emit='script' cannot compile modules that fxsparse calls with their masked parameters swapped in "
            f"({reasons}): TorchScript cannot swap parameters; use emit='trace' or emit='export'"
        )
    renormed = [n.name for n in gm.graph.find_nodes(op="call_function", target=F.embedding) if n.kwargs.get("max_norm")]
    if renormed:
        raise EmitError(
            f"emit='script' would compute {', '.join(renormed)} wrongly: TorchScript's embedding ignores "
            "max_norm (a torch bug, with or without masks); use emit='trace' or emit='export'"
        )

    # Script only what the graph reads: the rest of the module tree (user classes with
    # arbitrary Python in forward) would be compiled too and need not be scriptable.
    def script_graph() -> Any:
        return torch.jit.script(torch.fx.GraphModule(gm, gm.graph, class_name=type(gm).__name__))

    return cast(torch.jit.ScriptModule, _run("script", script_graph))


def to_trace(gm: torch.fx.GraphModule, example_inputs: tuple[Any, ...]) -> torch.jit.ScriptModule:
    return cast(torch.jit.ScriptModule, _run("trace", torch.jit.trace, gm, example_inputs))


def to_export(gm: torch.fx.GraphModule, example_inputs: tuple[Any, ...]) -> torch.export.ExportedProgram:
    return cast(torch.export.ExportedProgram, _run("export", torch.export.export, gm, example_inputs, strict=False))


def _run(emit: str, backend: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return backend(*args, **kwargs)
    except Exception as exc:
        raise EmitError(
            f"emit={emit!r} failed: {type(exc).__name__}: {exc}; the masked graph itself is available with emit='graph'"
        ) from exc
