"""Emit: turn the rewritten graph (or the plan) into the output format the caller asked for."""

from __future__ import annotations

import copy
import functools
import importlib.util
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from . import _capture
from ._compat import (
    HigherOrderOperator,
    OpOverload,
    PyTreeCodeGen,
    codegen_of,
    compiled_code,
    record_on_script_module,
    set_codegen,
    set_tracer_class,
    use_compiled_code,
)
from ._errors import EmitError, describe
from ._plan import KEPT_ROOT, MASK_SUFFIX, MODEL_CLASS, Plan
from ._runtime.guards import check_input_structure
from ._runtime.swap import call_with_parameters, root_view, swap_lock
from ._tags import (
    META_KEY,
    SCRIPT_MASKS_ATTRIBUTE,
    Role,
    Tag,
    mask_registry,
    retag,
    set_exported_tag,
    set_tag,
    tag_of,
)

_ROOT_CLASS = "_fxsparse_root_class"  # the class of a root kept as a call (see _fxsparse_root)

__all__ = [
    "EMITS",
    "MaskedGraphModule",
    "emit_as",
    "graph_module",
    "model_state",
    "parametrized",
    "to_export",
    "to_onnx",
    "to_script",
    "to_trace",
]

EMITS: dict[str, str] = {
    "graph": "a torch.fx.GraphModule with an explicit mask * weight node per masked parameter",
    "parametrize": "a copy of the model with torch.ao.pruning.FakeSparsity registered on each masked weight",
    "script": "a torch.jit.ScriptModule scripted from the masked graph (torch.fx captures only)",
    "trace": "a torch.jit.ScriptModule traced from the masked graph with the example inputs",
    "export": "a torch.export.ExportedProgram of the masked graph with the example inputs",
    "onnx": "a torch.onnx.ONNXProgram in which each mask is a named initializer feeding a visible Mul",
}
NEEDS_INPUTS = frozenset({"trace", "export", "onnx"})


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

    # TorchScript compiles a module's properties unless told not to; this one is Python's business.
    __jit_unused_properties__ = [KEPT_ROOT]  # noqa: RUF012

    @property
    def _fxsparse_root(self) -> nn.Module:
        """The model's root module, over this module's own state: called with its masked parameters
        swapped in, where its ``forward`` cannot be traced (a bare ``nn.LSTM`` given as the model)."""
        root_class = self.__dict__.get(_ROOT_CLASS)
        if root_class is None:
            raise AttributeError(f"{type(self).__name__} calls no root module of its own: its graph traced the model")
        return root_view(root_class, self.__dict__)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        bound: dict[bool, dict[str, bool]] | None = self.__dict__.get(_MODES_BOUND)
        if bound is not None:
            self._refuse_modes_not_traced(bound.get(self.training, {}))
        # A graph that swaps masked weights into kept modules changes them for the call: calls
        # from several threads take turns (the others, with no swap, share nothing mutable).
        # Whether it swaps is decided when its code is made (recompile, a mode switch), not per call.
        if not self.__dict__.get(_SWAPS, True) or torch.compiler.is_compiling():
            return super().__call__(*args, **kwargs)
        with swap_lock(self):
            return super().__call__(*args, **kwargs)

    def _refuse_modes_not_traced(self, modes_read: dict[str, bool]) -> None:
        """The graph holds the branches its modules' code took on ``self.training`` when traced:
        a module switched to the other mode since (``out.get_submodule(name).eval()``) would not follow."""
        for name, training in modes_read.items():
            module: nn.Module = self
            for part in name.split(".") if name else ():
                module = module._modules[part]  # type: ignore[assignment]  # get_submodule's checks cost 10x
            if module.training is not training:
                now, then = ("train", "eval") if module.training else ("eval", "train")
                raise EmitError(
                    f"module {name!r} is in {now} mode, but the graph this model runs in "
                    f"{'train' if self.training else 'eval'} mode was traced with it in {then} mode: its code "
                    f"depends on the mode, and a traced graph keeps the branch it took. Set it back "
                    f"(out.get_submodule({name!r}).{'train' if then == 'train' else 'eval'}()), switch the "
                    "whole model with out.train()/out.eval(), or transform the model with its modules in the "
                    "modes you will run them in"
                )

    def __deepcopy__(self, memo: dict[int, Any]) -> MaskedGraphModule:
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied  # before the state: a submodule may refer back to its root
        state = copy.deepcopy(_module_state(self), memo)
        graph = copy.deepcopy(self.graph, memo)
        modes = copy.deepcopy(self.__dict__.get(_MODES), memo)  # the current graph is one of them: copied once
        return _assemble(state, graph, type(self).__name__, copied, modes)

    def __reduce__(self) -> tuple[Any, ...]:
        # GraphModule pickles its generated code and traces it again on loading, which
        # cannot rebuild a graph of ATen operators (torch.export's) and renames nodes,
        # dropping their tags. The nodes themselves pickle as plain data.
        modes = self.__dict__.get(_MODES)
        state = _module_state(self)
        if not _importable(state.get(MODEL_CLASS)):  # a class defined in a function: pickled without it
            state.pop(MODEL_CLASS, None)
        if modes is None:
            return (_unpickle_graph, (state, _graph_as_data(self.graph), type(self).__name__))
        graphs = {mode: _graph_as_data(graph) for mode, graph in modes.items()}
        return (_unpickle_graph, (state, None, type(self).__name__, graphs))

    def train(self, mode: bool = True) -> MaskedGraphModule:
        """Set the mode, as ``nn.Module.train`` does, and run the graph traced in that mode.

        A model whose code reads ``self.training`` (dropout, stochastic depth) traces to a
        different graph in each mode; fxsparse keeps both (``MaskedGraphModule`` then holds
        one per mode) and switches between their compiled code here.
        """
        modes: dict[bool, torch.fx.Graph] | None = self.__dict__.get(_MODES)
        if modes is not None and mode not in modes:
            (kept,) = modes
            raise EmitError(
                f"this model runs in {'train' if kept else 'eval'} mode only: its code depends on the mode "
                f"(it reads self.training) and it keeps the graph of that mode alone (fxsparse.freeze with a "
                f"sparse layout keeps one, and so does transform where torch.fx cannot trace the model in the "
                f"other mode); cannot switch it to {'train' if mode else 'eval'} mode"
            )
        super().train(mode)
        if modes is not None and modes[mode] is not self.graph:
            compiled = self.__dict__.get(_COMPILED, {}).get(mode)
            if compiled is not None and compiled[0] is modes[mode]:
                use_compiled_code(self, compiled)
                self._note_swaps()
            else:
                self.graph = modes[mode]  # compiles it
        return self

    def recompile(self) -> torch.fx.graph.PythonCode:
        python_code = super().recompile()
        self._note_swaps()
        # The current graph is the current mode's (a graph set or edited by hand too); its code, kept for switching.
        modes = self.__dict__.get(_MODES)
        if modes is not None:
            modes[self.training] = self.graph
            compiled = self.__dict__.setdefault(_COMPILED, {})
            compiled[self.training] = compiled_code(self)
        return python_code

    def _note_swaps(self) -> None:
        """Note whether the code now run swaps masked weights into kept modules (so a call takes the lock)."""
        self.__dict__[_SWAPS] = bool(self.graph.find_nodes(op="call_function", target=call_with_parameters))


# MaskedGraphModule attributes: its graph for each mode where the modes trace differently, and their compiled code.
_MODES = "_fxsparse_mode_graphs"
_COMPILED = "_fxsparse_mode_code"
# Whether the current graph calls call_with_parameters (set with its code; unknown: taken as yes).
_SWAPS = "_fxsparse_swaps"
# Where a graph depends on modes: for each mode of the root, the modes of the modules whose code it ran, by name.
_MODES_BOUND = "_fxsparse_modes_bound"


def mode_graphs(gm: torch.fx.GraphModule) -> dict[bool, torch.fx.Graph]:
    """``gm``'s graph per mode (``True``: training): two where the modes trace differently, else its one graph."""
    modes = gm.__dict__.get(_MODES)
    return dict(modes) if modes is not None else {gm.training: gm.graph}


def keep_mode_graphs(gm: torch.fx.GraphModule, modes: dict[bool, torch.fx.Graph]) -> None:
    """Keep ``modes`` (holding ``gm.graph`` under ``gm.training``) as ``gm``'s graphs; drop others' code."""
    gm.__dict__[_MODES] = dict(modes)
    gm.__dict__.pop(_COMPILED, None)
    gm.recompile()


def edit_mode_graphs(gm: torch.fx.GraphModule, edit: Callable[[torch.fx.Graph, bool], None]) -> None:
    """Edit each mode's graph of ``gm`` (``edit(graph, first)``, the current one first), and make its code again.

    Only the first edit changes ``gm``'s weights: the other mode's graph reads the same ones.
    """
    modes = mode_graphs(gm)
    edit(gm.graph, True)
    for graph in modes.values():
        if graph is not gm.graph:
            edit(graph, False)
    if len(modes) > 1:  # the other mode's code, made from its graph before, would run the old graph
        keep_mode_graphs(gm, modes)
    else:
        gm.recompile()


def graph_module(
    root: nn.Module,
    graph: torch.fx.Graph,
    capture: str,
    modes: dict[bool, torch.fx.Graph] | None = None,
    modes_bound: dict[bool, dict[str, bool]] | None = None,
) -> MaskedGraphModule:
    """A ``MaskedGraphModule`` running ``graph`` over ``root``'s whole module tree and state.

    ``out.meta["fxsparse"]["capture"]`` records which capture made the graph (``"fx"`` or ``"export"``).
    ``modes``, where the model traces differently in train and eval mode, holds the graph of
    each (``graph`` is the one of ``root.training``); the output switches with its mode.
    ``modes_bound``, where the graphs depend on modes, holds for each mode of the root the
    modes of the modules whose code its graph ran: a call with any other refuses.
    """
    if not isinstance(getattr(root, "meta", {}), dict):
        raise EmitError(
            f"the model has an attribute 'meta' ({type(root.meta).__name__}), the name torch.fx.GraphModule "
            "keeps its metadata under: rename the attribute"
        )
    _adopt_subgraphs(root, graph)
    state = _module_state(root)
    if not isinstance(root, torch.fx.GraphModule):  # an output transformed again keeps its model's class
        state[MODEL_CLASS] = type(root)
    if graph.find_nodes(op="get_attr", target=KEPT_ROOT):
        state.setdefault(_ROOT_CLASS, type(root))  # a plain attribute: copies and pickles keep it
    state.pop(_MODES_BOUND, None)  # of an output transformed again: this graph's are below
    if modes_bound is not None:
        state[_MODES_BOUND] = {mode: {k: bool(v) for k, v in read.items()} for mode, read in modes_bound.items()}
    out = _assemble(state, graph, type(root).__name__, modes=modes)
    out.meta[META_KEY] = {"capture": capture}
    checks = [key for key, hook in out._forward_pre_hooks.items() if hook is check_input_structure]
    if _captured_with_pytree(graph) and not checks:
        out.register_forward_pre_hook(check_input_structure, with_kwargs=True)
    elif not _captured_with_pytree(graph):
        for key in checks:  # of an export capture traced again by FX: its inputs are plain now
            del out._forward_pre_hooks[key]
            out._forward_pre_hooks_with_kwargs.pop(key, None)
    return out


def _captured_with_pytree(graph: torch.fx.Graph) -> bool:
    """Whether the graph takes its inputs as torch.export does (flattened by a pytree spec)."""
    return isinstance(codegen_of(graph), PyTreeCodeGen)


def _adopt_subgraphs(root: nn.Module, graph: torch.fx.Graph) -> None:
    """Make the branch and body graphs of control-flow operators (``torch.cond``) MaskedGraphModules.

    torch.export stores them as GraphModules whose pickling traces their code again,
    which fails for its graphs; ours pickle their nodes.
    """
    for node in graph.find_nodes(op="get_attr"):
        if node.target == KEPT_ROOT:  # the model's root itself: no subgraph
            continue
        owner_name, _, name = str(node.target).rpartition(".")
        owner = root.get_submodule(owner_name)
        subgraph = getattr(owner, name)
        if isinstance(subgraph, torch.fx.GraphModule) and not isinstance(subgraph, MaskedGraphModule):
            _adopt_subgraphs(subgraph, subgraph.graph)
            setattr(owner, name, _assemble(_module_state(subgraph), subgraph.graph, type(subgraph).__name__))


def captured_by(gm: torch.fx.GraphModule) -> str:
    """``"export"`` for a graph captured by ``torch.export``, else ``"fx"``."""
    return str(gm.meta.get(META_KEY, {}).get("capture", "fx"))


def model_state(out: torch.fx.GraphModule) -> dict[str, Any]:
    """The model's own state in ``out`` (a shallow copy of its ``__dict__``): what the graph module adds left out."""
    state = _module_state(out)
    if _captured_with_pytree(out.graph):  # compiling such a graph sets these on its module
        state.pop("_in_spec", None)
        state.pop("_out_spec", None)
    return state


def _importable(cls: type | None) -> bool:
    """Whether pickle can store ``cls`` by reference (its module and qualified name lead back to it)."""
    if cls is None:
        return False
    found: Any = sys.modules.get(cls.__module__)
    for part in cls.__qualname__.split("."):
        found = getattr(found, part, None)
    return found is cls


def _module_state(module: nn.Module) -> dict[str, Any]:
    graph_module_only = _graph_module_only() - {"meta"}  # GraphModule.meta is state worth keeping
    graph_module_only |= {_MODES, _COMPILED, _SWAPS}  # graphs and code, handled as such
    state = vars(module)
    root_class = state.get(_ROOT_CLASS)
    if root_class is not None:  # the model's root lives in this state: it says what of it to copy
        state = root_class.__getstate__(root_view(root_class, state))
    return {key: value for key, value in state.items() if key not in graph_module_only}


def _assemble(
    state: dict[str, Any],
    graph: torch.fx.Graph,
    class_name: str,
    out: MaskedGraphModule | None = None,
    modes: dict[bool, torch.fx.Graph] | None = None,
) -> MaskedGraphModule:
    if out is None:
        out = MaskedGraphModule.__new__(MaskedGraphModule)
    torch.fx.GraphModule.__init__(out, nn.Module(), torch.fx.Graph(), class_name=class_name)
    out.__dict__.update(state)
    root_class = state.get(_ROOT_CLASS)
    if root_class is not None and root_class.__setstate__ is not nn.Module.__setstate__:
        root_class.__setstate__(root_view(root_class, out.__dict__), dict(state))  # rebuilds what it left out
    # FX traces a GraphModule's code again with its tracer (transforming an output again does);
    # this one finds parameters by a dict, not by a scan, and keeps InputGuards a call.
    set_tracer_class(out, _capture.Tracer)
    if modes is not None:
        out.__dict__[_MODES] = dict(modes)
    out.graph = graph  # compiles forward once
    return out


@dataclass(frozen=True)
class _NodeRef:
    name: str


@dataclass(frozen=True)
class _Operator:
    """An operator overload (``torch.ops.aten.add.Tensor``) or higher-order operator, by name: neither pickles."""

    namespace: str
    name: str
    overload: str

    def resolve(self) -> Any:
        operator = getattr(getattr(torch.ops, self.namespace), self.name)
        return getattr(operator, self.overload) if self.overload else operator


def _graph_as_data(graph: torch.fx.Graph) -> tuple[list[tuple[Any, ...]], torch.fx.graph.CodeGen]:
    """Each node's op, name, target, arguments (other nodes by name), type and fxsparse tag; and the codegen."""

    def as_data(value: Any) -> Any:
        if isinstance(value, torch.fx.Node):
            return _NodeRef(value.name)
        if isinstance(value, OpOverload):  # __name__ is "<name>.<overload>" ("add.Tensor", "relu.default")
            name, _, overload = value.__name__.rpartition(".")
            return _Operator(value.namespace, name, overload)
        if isinstance(value, HigherOrderOperator):  # torch.cond, ...: registered by name
            return _Operator("higher_order", value.name(), "")  # type: ignore[no-untyped-call]
        return value

    def each_as_data(value: Any) -> Any:
        return torch.fx.node.map_aggregate(value, as_data)

    nodes = [
        (
            node.op,
            node.name,
            as_data(node.target),
            each_as_data(node.args),
            each_as_data(node.kwargs),
            node.type,
            tag_of(node),
        )
        for node in graph.nodes
    ]
    return nodes, codegen_of(graph)


def _graph_from_data(data: tuple[list[tuple[Any, ...]], torch.fx.graph.CodeGen]) -> torch.fx.Graph:
    nodes, codegen = data
    graph = torch.fx.Graph(tracer_cls=_capture.Tracer)
    set_codegen(graph, codegen)
    made: dict[str, torch.fx.Node] = {}

    def live(value: Any) -> Any:
        if isinstance(value, _NodeRef):
            return made[value.name]
        return value.resolve() if isinstance(value, _Operator) else value

    for op, name, target, args, kwargs, type_expr, tag in nodes:
        node = graph.create_node(
            op,
            live(target),
            torch.fx.node.map_aggregate(args, live),
            torch.fx.node.map_aggregate(kwargs, live),
            name,
            type_expr,
        )
        if node.name != name:
            raise RuntimeError(f"unpickling renamed node {name!r} to {node.name!r}")  # names are code: keep them
        if tag is not None:
            set_tag(node, tag if isinstance(tag, Tag) else Tag.from_mapping(tag))  # 0.3 stored dicts
        made[name] = node
    return graph


def _unpickle_graph(
    state: dict[str, Any],
    data: tuple[list[tuple[Any, ...]], torch.fx.graph.CodeGen] | None,
    class_name: str,
    modes_data: dict[bool, tuple[list[tuple[Any, ...]], torch.fx.graph.CodeGen]] | None = None,
) -> MaskedGraphModule:
    if modes_data is None:
        assert data is not None
        return _assemble(state, _graph_from_data(data), class_name)
    modes = {mode: _graph_from_data(graph) for mode, graph in modes_data.items()}
    return _assemble(state, modes[state["training"]], class_name, modes=modes)


def _unpickle(reduced: tuple[Any, ...], state: dict[str, Any], class_name: str) -> MaskedGraphModule:
    """Loads what fxsparse 0.1.0 pickled: a GraphModule's code, traced again (with ``_capture.Tracer``)."""
    rebuild, arguments = reduced
    rebuilt = rebuild(*arguments)
    retag(rebuilt.graph, _legacy_mask_registry(rebuilt), rebuilt)
    return _assemble(state, rebuilt.graph, class_name)


def _legacy_mask_registry(module: nn.Module) -> dict[str, str]:
    """The masks of a file fxsparse 0.1.0 wrote, which recorded none: each ``<param>_mask`` buffer beside its parameter.

    The one place a mask is known by its name: such files carry nothing else to tell, and
    fxsparse 0.1.0 named every mask that way.
    """
    parameters = {name for name, _ in module.named_parameters(remove_duplicate=False)}
    buffers = (name for name, _ in module.named_buffers(remove_duplicate=False))
    return {name: name.removesuffix(MASK_SUFFIX) for name in buffers if name.removesuffix(MASK_SUFFIX) in parameters}


def parametrized(root: nn.Module, plan: Plan) -> nn.Module:
    """``root`` with a ``FakeSparsity(mask)`` on every name of every masked parameter."""
    from torch.ao.pruning.sparsifier.utils import FakeSparsity

    for p in plan.parameters:
        for alias in p.aliases:
            owner, _, attribute = alias.rpartition(".")
            parametrization = FakeSparsity(p.mask)  # type: ignore[no-untyped-call]
            parametrize.register_parametrization(root.get_submodule(owner), attribute, parametrization)
    return root


def emit_as(
    gm: torch.fx.GraphModule,
    emit: str,
    args: tuple[Any, ...] | None,
    kwargs: dict[str, Any] | None,
    dynamic_shapes: Any,
    mask_names: Iterable[str] = (),
) -> Any:
    """``gm`` in the form ``emit`` names (any of :data:`EMITS` but ``"parametrize"``, which needs the plan)."""
    if emit == "script":
        return to_script(gm)
    if emit == "trace":
        return to_trace(gm, args, kwargs)
    if emit == "export":
        return to_export(gm, args or (), kwargs, dynamic_shapes)
    if emit == "onnx":
        return to_onnx(gm, args or (), kwargs, dynamic_shapes, mask_names)
    return gm


def to_script(gm: torch.fx.GraphModule) -> torch.jit.ScriptModule:
    if captured_by(gm) == "export":
        raise EmitError(
            "emit='script' is not available for a model captured with torch.export: TorchScript cannot compile "
            "its graph (ATen operator overloads, pytree input handling); use emit='trace', 'export' or 'onnx'"
        )
    calls = gm.graph.find_nodes(op="call_function", target=call_with_parameters)
    kept = {str(n.args[0].target): (tag.why if (tag := tag_of(n)) and tag.why else "kept") for n in calls}
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

    return _with_mask_record(cast(torch.jit.ScriptModule, _run("script", script_graph)), gm)


def to_trace(
    gm: torch.fx.GraphModule, args: tuple[Any, ...] | None, kwargs: dict[str, Any] | None
) -> torch.jit.ScriptModule:
    if args is not None and kwargs is not None:
        raise EmitError(
            "emit='trace' takes example_inputs or example_kwargs, not both: torch.jit.trace cannot mix them"
        )
    # strict=False: models that return dicts (Hugging Face's ModelOutput) are traceable too.
    traced = _run("trace", torch.jit.trace, gm, args, example_kwarg_inputs=kwargs, strict=False)
    return _with_mask_record(cast(torch.jit.ScriptModule, traced), gm)


def _with_mask_record(compiled: torch.jit.ScriptModule, gm: torch.fx.GraphModule) -> torch.jit.ScriptModule:
    """``compiled`` holding the registry of the masks ``gm`` applies: TorchScript keeps no node tags,
    and a model's own ``<name>_mask`` buffer must not be taken for one of fxsparse's."""
    record_on_script_module(compiled, SCRIPT_MASKS_ATTRIBUTE, mask_registry(gm.graph))
    return compiled


def to_export(
    gm: torch.fx.GraphModule, args: tuple[Any, ...], kwargs: dict[str, Any] | None, dynamic_shapes: Any
) -> torch.export.ExportedProgram:
    with _capture.EXPORT_LOCK:
        exported = _run("export", torch.export.export, gm, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    program = cast(torch.export.ExportedProgram, exported)
    _tag_exported(program, mask_registry(gm.graph))
    return program


def _tag_exported(program: torch.export.ExportedProgram, registry: Mapping[str, str]) -> None:
    """Tag the ``mask * weight`` products of an exported masked graph (export makes new nodes, without tags).

    ``registry`` holds the masks fxsparse made (mask buffer -> parameter): the program's
    inputs that are those buffers, and the products that read them, get their tags back;
    the products' tags are written so that ``torch.export.save`` keeps them.
    """
    signature = program.graph_signature
    buffers, parameters = signature.inputs_to_buffers, signature.inputs_to_parameters
    for placeholder in program.graph.find_nodes(op="placeholder"):
        param = registry.get(buffers.get(placeholder.name, ""))
        if param is None:
            continue
        set_tag(placeholder, Tag(Role.MASK, param=param, mask=buffers[placeholder.name]))
        for product in placeholder.users:
            if product.target is not torch.ops.aten.mul.Tensor or len(product.args) != 2:
                continue
            weight = product.args[1]
            if isinstance(weight, torch.fx.Node) and parameters.get(weight.name) is not None:
                set_tag(weight, Tag(Role.WEIGHT, param=param))
                set_exported_tag(product, Tag(Role.MASKED, param=param, mask=buffers[placeholder.name]))


def to_onnx(
    gm: torch.fx.GraphModule,
    args: tuple[Any, ...],
    kwargs: dict[str, Any] | None,
    dynamic_shapes: Any,
    mask_names: Iterable[str],
) -> Any:
    """An ``ONNXProgram`` whose masks are named initializers, each feeding a ``Mul`` the optimizer leaves alone.

    ``torch.onnx.export`` optimizes by default, and its constant folding multiplies
    each mask into its weight (two initializers) ahead of time: the mask vanishes into
    an anonymous tensor. The same optimizer runs here, told not to fold what reads a mask.
    """
    for module in ("onnx", "onnxscript"):
        if importlib.util.find_spec(module) is None:
            raise EmitError(
                f"emit='onnx' needs the packages onnx and onnxscript ({module} is missing): "
                "pip install 'fxsparse[onnx]'"
            )
    import onnxscript.optimizer
    import onnxscript.rewriter.onnx_fusions

    with _capture.EXPORT_LOCK:
        program = _run(
            "onnx",
            torch.onnx.export,
            gm,
            args,
            kwargs=kwargs,
            dynamic_shapes=dynamic_shapes,
            dynamo=True,
            optimize=False,
            verbose=False,
        )
    masks = set(mask_names)

    def reads_a_mask(value: Any) -> bool:
        if value is None:
            return False
        if value.name in masks and value.is_initializer():
            return True
        producer = value.producer()  # a Cast of a bool mask to the weight's dtype
        return producer is not None and producer.op_type == "Cast" and reads_a_mask(producer.inputs[0])

    def should_fold(node: Any) -> bool | None:
        return False if any(reads_a_mask(value) for value in node.inputs) else None

    _run("onnx", onnxscript.optimizer.optimize_ir, program.model, should_fold=should_fold)
    _run("onnx", onnxscript.rewriter.onnx_fusions.fuse, program.model)  # as torch.onnx.export(optimize=True)
    return program


def _run(emit: str, backend: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return backend(*args, **kwargs)
    except Exception as exc:
        raise EmitError(
            f"emit={emit!r} failed: {describe(exc)}\n(the masked graph itself is available with emit='graph')"
        ) from exc
