"""Emit: turn the rewritten graph (or the plan) into the output format the caller asked for."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
import torch.fx
from torch import nn
from torch.nn.utils import parametrize

from ._errors import EmitError
from ._plan import Plan

__all__ = ["EMITS", "graph_module", "parametrized", "to_export", "to_script", "to_trace"]

EMITS: dict[str, str] = {
    "graph": "a torch.fx.GraphModule with an explicit mask * weight node per masked parameter",
    "parametrize": "a copy of the model with torch.ao.pruning.FakeSparsity registered on each masked weight",
    "script": "a torch.jit.ScriptModule scripted from the masked graph",
    "trace": "a torch.jit.ScriptModule traced from the masked graph with example_inputs",
    "export": "a torch.export.ExportedProgram of the masked graph with example_inputs",
}
NEEDS_INPUTS = frozenset({"trace", "export"})


def graph_module(root: nn.Module, graph: torch.fx.Graph) -> torch.fx.GraphModule:
    """A GraphModule running ``graph`` over ``root``'s whole module tree.

    ``GraphModule(root, graph)`` would keep only the attributes the graph reads, under
    plain ``nn.Module`` containers; keeping the whole tree keeps every key of the
    model's ``state_dict`` and lets users index ``out.seq[0]`` as before.
    """
    out = torch.fx.GraphModule(nn.Module(), torch.fx.Graph(), class_name=type(root).__name__)
    out.__dict__.update(
        _parameters=root._parameters,
        _buffers=root._buffers,
        _modules=root._modules,
        _non_persistent_buffers_set=root._non_persistent_buffers_set,
        training=root.training,
    )
    out.graph = graph  # compiles forward once
    return out


def parametrized(root: nn.Module, plan: Plan) -> nn.Module:
    """``root`` with a ``FakeSparsity(mask)`` on every name of every masked parameter."""
    from torch.ao.pruning.sparsifier.utils import FakeSparsity

    for p in plan.parameters:
        for alias in p.aliases:
            owner, _, attribute = alias.rpartition(".")
            parametrize.register_parametrization(root.get_submodule(owner), attribute, FakeSparsity(p.mask))  # type: ignore[no-untyped-call]
    return root


def to_script(gm: torch.fx.GraphModule) -> torch.jit.ScriptModule:
    # Script only what the graph reads: the rest of the module tree (user classes with
    # arbitrary Python in forward) would be compiled too and need not be scriptable.
    minimal = torch.fx.GraphModule(gm, gm.graph, class_name=gm.__class__.__name__)
    return cast(torch.jit.ScriptModule, _run("script", torch.jit.script, minimal))


def to_trace(gm: torch.fx.GraphModule, example_inputs: tuple[Any, ...]) -> torch.jit.ScriptModule:
    return cast(torch.jit.ScriptModule, _run("trace", torch.jit.trace, gm, example_inputs))


def to_export(gm: torch.fx.GraphModule, example_inputs: tuple[Any, ...]) -> torch.export.ExportedProgram:
    return cast(torch.export.ExportedProgram, _run("export", torch.export.export, gm, example_inputs, strict=False))


def _run(emit: str, backend: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return backend(*args, **kwargs)
    except Exception as exc:
        raise EmitError(
            f"emit={emit!r} failed in {backend.__module__}.{backend.__name__}: {type(exc).__name__}: {exc}; "
            "the masked graph itself is available with emit='graph'"
        ) from exc
