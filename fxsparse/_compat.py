"""Every private torch API fxsparse uses, in one place.

torch may rename or remove any of these in a release without notice. Calling them only
from here keeps that risk visible: ``tests/test_compat.py`` resolves each name in
:data:`PRIVATE_APIS` and fails naming the one a torch release took away, and a second test
checks that no other fxsparse module touches a private torch name.

What each is for:

- ``torch.nn.utils.stateless._reparametrize_module``: a kept module called with its masked
  parameters swapped in for one call (``torch.func.functional_call`` refuses to run under
  ``torch.jit.trace``);
- ``torch._subclasses.fake_tensor.FakeTensor``: what ``torch.export`` leaves on modules while
  it runs (removed again after capture);
- ``torch.export._unlift`` helpers and ``ExportedProgram._guards_code``: torch.export's own
  guards on the inputs, which ``InputGuards`` checks as data;
- ``torch.fx.graph._PyTreeCodeGen`` and ``Graph._codegen``: the pytree input handling of a
  graph captured by ``torch.export``, kept when a graph is pickled as data;
- ``torch._ops.OpOverload``/``HigherOrderOperator``: ATen operators and ``torch.cond`` in a
  graph, pickled by name;
- ``torch.utils._pytree``: input structures of exported graphs, and their key paths; the
  tensors among a custom autograd Function's arguments;
- ``GraphModule._graph``, ``_code``, ``_lineno_map``, ``_prologue_start``: a graph's compiled
  code, kept per train/eval mode so that switching modes does not compile again;
- ``torch._C._nn.linear``: what ``F.linear`` is in a traced graph;
- ``torch.ops.aten._sparse_{csr,bsr}_tensor_unsafe``: a sparse weight rebuilt from its parts
  per call without re-validating them (fxsparse checks the input width itself);
- ``torch.fx.node._get_qualified_name``: the printable name of a node's function;
- ``GraphModule._tracer_cls``: the tracer FX uses when it traces a GraphModule's code again;
- ``Node._erased``: whether a node was erased (a rolled-back trace);
- ``torch.nn.modules.module._global_*``: hooks registered for every module;
- ``torch.sparse`` semi-structured ``_DTYPE_SHAPE_CONSTRAINTS``: the shapes 2:4 kernels take;
- ``ScriptModule._c._register_attribute`` with ``torch._C``'s ``DictType``/``StringType``: the
  record of a TorchScript output's masks, an attribute ``torch.jit.save`` writes (a Python
  attribute set on a ``ScriptModule`` is lost there, and ``torch.jit.trace`` keeps none);
- ``torch._export.passes._node_metadata_hook._EMPTY_NN_MODULE_STACK_KEY``: the module-stack
  entry torch.export gives nodes its passes made outside any module (drawings skip it).

Not counted as private, and used elsewhere: an ``nn.Module``'s own registries
(:data:`MODULE_STATE_ATTRIBUTES`: ``_parameters``, ``_buffers``, ``_modules``,
``_forward_hooks``, ``_forward_pre_hooks`` and the other hook registries). They are the module's state, which
``nn.Module``'s own ``__getattr__``, ``state_dict`` and ``__call__`` read and which
``torch.nn.utils.parametrize``, ``prune`` and every model-surgery library rely on; fxsparse
reads them to see a module's own parameters and hooks without its ``__getattr__`` (which
returns a parametrization's computed tensor) and deletes entries from a copy it owns. The
test also refuses any other private attribute reached outside this module, on any object.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.fx
from torch import nn

__all__ = [
    "EMPTY_MODULE_STACK_KEY",
    "FAKE_TENSOR_LOGGER",
    "MODULE_STATE_ATTRIBUTES",
    "ONNX_REGISTRATION_LOGGER",
    "PRIVATE_APIS",
    "FakeTensor",
    "HigherOrderOperator",
    "OpOverload",
    "PyTreeCodeGen",
    "codegen_of",
    "compiled_code",
    "export_input_guards",
    "global_module_hooks",
    "is_erased",
    "keystr",
    "linear_c",
    "overrides_call_impl",
    "qualified_name",
    "record_on_script_module",
    "reparametrize_module",
    "semi_structured_shape_constraints",
    "set_codegen",
    "set_tracer_class",
    "sparse_compressed_tensor_unsafe",
    "sympy_interp",
    "tree_leaves",
    "tree_structure",
    "use_compiled_code",
]

# Dotted names (module path, then attribute path) of every private API this module reaches.
PRIVATE_APIS: tuple[str, ...] = (
    "torch.nn.utils.stateless:_reparametrize_module",
    "torch._subclasses.fake_tensor:FakeTensor",
    "torch.export._unlift:_get_input_paths",
    "torch.export._unlift:_get_input_guards_for_graph",
    "torch.export._unlift:_force_ep_signature_match",
    "torch.export._unlift:_force_gm_signature_match",
    "torch.export:ExportedProgram._guards_code",
    "torch.fx.graph:_PyTreeCodeGen",
    "torch.fx.graph:Graph._codegen",
    "torch._ops:OpOverload",
    "torch._ops:HigherOrderOperator",
    "torch.utils._pytree:tree_structure",
    "torch.utils._pytree:keystr",
    "torch.utils._pytree:tree_leaves",
    "torch._C._nn:linear",
    "torch:ops.aten._sparse_csr_tensor_unsafe",
    "torch:ops.aten._sparse_bsr_tensor_unsafe",
    "torch.fx.node:_get_qualified_name",
    "torch.fx:GraphModule._tracer_cls",
    "torch.fx:Node._erased",
    "torch.nn:Module._call_impl",
    "torch.nn.modules.module:_global_forward_hooks",
    "torch.nn.modules.module:_global_forward_pre_hooks",
    "torch.nn.modules.module:_global_backward_hooks",
    "torch.nn.modules.module:_global_backward_pre_hooks",
    "torch.fx.experimental.symbolic_shapes:SYMPY_INTERP",
    "torch.sparse:SparseSemiStructuredTensorCUTLASS._DTYPE_SHAPE_CONSTRAINTS",
    "torch.jit:RecursiveScriptModule._c",
    "torch._C:ScriptModule._register_attribute",
    "torch._C:DictType",
    "torch._C:StringType.get",
    "torch._export.passes._node_metadata_hook:_EMPTY_NN_MODULE_STACK_KEY",
)

from torch._export.passes._node_metadata_hook import (  # noqa: E402
    _EMPTY_NN_MODULE_STACK_KEY as EMPTY_MODULE_STACK_KEY,
)
from torch._ops import HigherOrderOperator, OpOverload  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensor  # noqa: E402
from torch.fx.graph import _PyTreeCodeGen as PyTreeCodeGen  # noqa: E402
from torch.fx.node import _get_qualified_name  # noqa: E402
from torch.nn.modules import module as _module_impl  # noqa: E402
from torch.nn.utils.stateless import _reparametrize_module  # noqa: E402
from torch.utils import _pytree  # noqa: E402

# nn.Module's registries of its own state, which other modules may read (see above).
MODULE_STATE_ATTRIBUTES = frozenset(
    {
        "_parameters",
        "_buffers",
        "_modules",
        "_forward_hooks",
        "_forward_pre_hooks",
        "_forward_pre_hooks_with_kwargs",
        "_backward_hooks",
        "_backward_pre_hooks",
    }
)


def overrides_call_impl(module_class: type[nn.Module]) -> bool:
    """Whether a module class runs its own ``_call_impl`` (what ``nn.Module.__call__`` runs around ``forward``)."""
    return module_class._call_impl is not nn.Module._call_impl


# Loggers of torch's private modules, by name: fxsparse quiets their tracebacks where it reports the error itself.
FAKE_TENSOR_LOGGER = "torch._subclasses.fake_tensor"
ONNX_REGISTRATION_LOGGER = "torch.onnx._internal.exporter._registration"

linear_c: Callable[..., torch.Tensor] = torch._C._nn.linear


def reparametrize_module(module: nn.Module, tensors: dict[str, torch.Tensor]) -> AbstractContextManager[None]:
    """``module`` with ``tensors`` (by relative name) in place of its parameters, for a ``with`` block."""
    return _reparametrize_module(module, tensors)


def global_module_hooks() -> Iterator[dict[Any, Any]]:
    """The hook registries ``nn.Module.__call__`` consults for every module."""
    for name in (
        "_global_forward_hooks",
        "_global_forward_pre_hooks",
        "_global_backward_hooks",
        "_global_backward_pre_hooks",
    ):
        yield getattr(_module_impl, name)


def codegen_of(graph: torch.fx.Graph) -> torch.fx.graph.CodeGen:
    return graph._codegen


def set_codegen(graph: torch.fx.Graph, codegen: torch.fx.graph.CodeGen) -> None:
    graph._codegen = codegen


def set_tracer_class(gm: torch.fx.GraphModule, tracer: type[torch.fx.Tracer]) -> None:
    """The tracer FX uses when it traces ``gm``'s code again (pickling, transforming it again)."""
    gm._tracer_cls = tracer


def is_erased(node: torch.fx.Node) -> bool:
    return bool(node._erased)


def qualified_name(function: Callable[..., Any]) -> str:
    return _get_qualified_name(function)


def tree_structure(value: Any) -> Any:
    return _pytree.tree_structure(value)


def tree_leaves(value: Any) -> list[Any]:
    return list(_pytree.tree_leaves(value))


def compiled_code(gm: torch.fx.GraphModule) -> tuple[Any, ...]:
    """What ``GraphModule.recompile`` made of ``gm``'s graph: the graph, its code and forward (to switch back to)."""
    return (gm._graph, gm._code, gm._lineno_map, gm._prologue_start, type(gm).forward)


def use_compiled_code(gm: torch.fx.GraphModule, compiled: tuple[Any, ...]) -> None:
    """Make ``gm`` run what :func:`compiled_code` returned, without compiling again."""
    graph, gm._code, gm._lineno_map, gm._prologue_start, type(gm).forward = compiled
    gm._graph = graph
    graph.owning_module = gm


def keystr(path: Sequence[Any]) -> str:
    return _pytree.keystr(tuple(path))


def sparse_compressed_tensor_unsafe(
    crow_indices: torch.Tensor, col_indices: torch.Tensor, values: torch.Tensor, size: list[int], blocked: bool
) -> torch.Tensor:
    """A CSR tensor (``blocked``: BSR, ``values`` holding the blocks) from its parts, unchecked (fast);
    in the values' dtype and device, not the default ones (a trace records them as constants)."""
    if blocked:
        bsr: torch.Tensor = torch.ops.aten._sparse_bsr_tensor_unsafe(
            crow_indices, col_indices, values, size, dtype=values.dtype, device=values.device
        )
        return bsr
    csr: torch.Tensor = torch.ops.aten._sparse_csr_tensor_unsafe(
        crow_indices, col_indices, values, size, dtype=values.dtype, device=values.device
    )
    return csr


def semi_structured_shape_constraints(semi_structured_class: Any, dtype: torch.dtype) -> Any:
    """The minimum shape a 2:4 kernel of ``semi_structured_class`` takes in ``dtype`` (None: unsupported dtype)."""
    return semi_structured_class._DTYPE_SHAPE_CONSTRAINTS.get(dtype)


def sympy_interp() -> dict[str, Any]:
    """The functions torch.export's guard conditions call (``Eq``, ``Mod``, ...), by name."""
    from torch.fx.experimental.symbolic_shapes import SYMPY_INTERP

    return dict(SYMPY_INTERP)


def record_on_script_module(module: torch.jit.ScriptModule, name: str, value: dict[str, str]) -> None:
    """Store ``value`` as attribute ``name`` of a compiled module, where ``torch.jit.save`` keeps it."""
    string = torch._C.StringType.get()
    module._c._register_attribute(name, torch._C.DictType(string, string), value)


def export_input_guards(program: torch.export.ExportedProgram, unlifted: nn.Module, graph: torch.fx.Graph) -> Any:
    """torch.export's own guards on the inputs of ``program``: ``(conditions, input key paths)``.

    Each condition is Python source over ``L[...]`` sources, one per flat input path; this is
    what ``ExportedProgram.module()`` compiles into its (unpicklable) guard function.
    """
    unlift: Any = importlib.import_module("torch.export._unlift")  # private and untyped
    signature = inspect.signature(unlifted.forward)
    paths = unlift._get_input_paths(program.example_inputs, signature)
    code = unlift._get_input_guards_for_graph(graph.find_nodes(op="placeholder"), program.range_constraints, paths)
    recorded = unlift._force_ep_signature_match(program._guards_code, paths)
    code += unlift._force_gm_signature_match(recorded, signature)
    return code, paths


# ATen operators with private names, as torch.export's graphs hold them (structured pruning's op semantics).
ATEN_PRIVATE_OPS: dict[str, Any] = {
    name: getattr(torch.ops.aten, name)
    for name in (
        "_to_copy", "_native_batch_norm_legit_functional", "_native_batch_norm_legit_no_training",
        "_native_batch_norm_legit", "_convolution", "_unsafe_view", "_log_softmax", "_softmax",
        "_adaptive_avg_pool2d",
    )
}  # fmt: skip
