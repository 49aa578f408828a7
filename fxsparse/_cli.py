"""The ``fxsparse`` command line."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import inspect
import logging
import os
import sys
import time
import warnings
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.export
import torch.fx

from ._compat import ONNX_REGISTRATION_LOGGER
from ._errors import FxsparseError, MaskError, percent_hint
from ._tags import Role, role_of

# Model files are pickles (torch.save), or hold pickles (torch.export's .pt2) or code (TorchScript):
# loading one runs whatever its maker put in it. A file from elsewhere is opened only when the user says so.
TRUST_SOURCE = (
    "load SOURCE even when it is a model file (torch.save .pt, torch.export .pt2, TorchScript): such a file is a "
    "pickle, and loading it runs any code its maker put in it, so fxsparse refuses model files without this flag. "
    "Pass it only for files you made or trust"
)
SOURCE = (
    "the model: a factory, package.module:function (called with no arguments; modules in the current folder are "
    "found after the installed packages), or, with --trust-source only, a model or fxsparse output saved with "
    "torch.save, or a torch.export .pt2 file"
)


class _Parser(argparse.ArgumentParser):
    """argparse, with its error messages made safe for a terminal: they quote file contents,
    mask keys and module names, which may hold escape codes."""

    def error(self, message: str) -> NoReturn:
        from .masks._check import printable

        super().error(printable(message))


def main(argv: Sequence[str] | None = None) -> int:
    from fxsparse import __version__

    from ._demo import DEMOS

    parser = _Parser(prog="fxsparse", description="Weight masks as an explicit torch.fx graph rewrite.")
    parser.add_argument("--version", action="version", version=f"fxsparse {__version__} (torch {torch.__version__})")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="mask a small model, check it against FakeSparsity, write and reload graph, export, TorchScript, ONNX",
    )
    demo.add_argument(
        "--model",
        choices=list(DEMOS),
        default="tiny-lm",
        help="tiny-lm: fxsparse's own model, traced by torch.fx; gpt2-tiny: a Hugging Face GPT-2 from a tiny "
        "config (random weights, needs transformers), captured by torch.export (default: %(default)s)",
    )
    demo.add_argument("--out", type=Path, default=Path("fxsparse-demo"), help="output folder (default: %(default)s)")
    demo.add_argument("--sparsity", type=float, default=0.5, help="fraction of each weight to prune (default: 0.5)")
    demo.add_argument("--seed", type=int, default=0, help="random seed for weights and inputs (default: 0)")
    draw = commands.add_parser(
        "draw", help="draw a model's FX graph (or a saved fxsparse output's): SVG or PNG, or --html for the viewer"
    )
    draw.add_argument("source", help=SOURCE)
    draw.add_argument("--trust-source", action="store_true", help=TRUST_SOURCE)
    picture = "picture to write; its suffix picks the format: .svg, .png, .jpg, .json, .dot (the source only), "
    picture += "or .pdf (PDF needs Graphviz's dot: apt-get install graphviz)"
    draw.add_argument("--out", type=Path, help=f"{picture} (default: graph.svg, or none when --html is given)")
    depth = "draw this many levels of modules, each deeper one as a box (default: what fits 1,500 nodes)"
    full = "draw every node, even of a big graph (no compacting, folding or collapsing)"
    draw.add_argument("--depth", type=_depth, default=None, help=depth)
    draw.add_argument("--full", action="store_true", help=full)
    viewer = "write the interactive viewer here (one HTML file, opens offline; needs no Graphviz)"
    draw.add_argument("--html", type=Path, help=viewer)
    diff = commands.add_parser(
        "diff", help="transform a model and show what changed: text, a picture, and with --html a report"
    )
    diff.add_argument("source", help=SOURCE)
    diff.add_argument("--trust-source", action="store_true", help=TRUST_SOURCE)
    masks = diff.add_mutually_exclusive_group()
    masks.add_argument(
        "--masks", type=Path, help="a mask file: safetensors (fxsparse masks, save_masks) or .pt (loaded as data only)"
    )
    masks.add_argument(
        "--sparsity",
        type=float,
        default=0.5,
        help="prune this fraction of each Linear, Conv1d/2d/3d and Hugging Face Conv1D weight by magnitude "
        "(default: %(default)s)",
    )
    diff.add_argument("--out", type=Path, help=f"{picture} (default: diff.svg, or none when --html is given)")
    diff.add_argument("--depth", type=_depth, default=None, help=depth)
    diff.add_argument("--full", action="store_true", help=full)
    diff.add_argument("--html", type=Path, help="write a standalone HTML report here, with the interactive viewer")
    make = commands.add_parser("masks", help="make a mask file for a model: magnitude, N:M or block masks")
    make.add_argument("source", help=SOURCE)
    make.add_argument("--trust-source", action="store_true", help=TRUST_SOURCE)
    make.add_argument(
        "--recipe",
        default="magnitude",
        help="magnitude (unstructured), N:M such as 2:4, or block (with --block) (default: %(default)s)",
    )
    make.add_argument(
        "--sparsity", type=float, default=0.5, help="fraction to prune, magnitude and block (default: 0.5)"
    )
    make.add_argument("--block", default="4x4", help="block shape for --recipe block, ROWSxCOLUMNS (default: 4x4)")
    make.add_argument("--global", dest="scope", action="store_const", const="global", default="layer",
                      help="magnitude: rank all selected weights together instead of layer by layer")  # fmt: skip
    make.add_argument(
        "--include", action="append", help="module-name glob to mask (repeatable; default: Linear, Conv1D)"
    )
    make.add_argument("--exclude", action="append", help="module-name glob to leave out (repeatable)")
    make.add_argument("--out", type=Path, default=Path("masks.safetensors"), help="mask file (default: %(default)s)")
    make.add_argument("--packed", action="store_true", help="store masks as bits, 8 to a byte (safetensors only)")
    checker = commands.add_parser("check", help="check a mask file against a model: shapes, densities, patterns")
    checker.add_argument("source", help=SOURCE)
    checker.add_argument("--trust-source", action="store_true", help=TRUST_SOURCE)
    checker.add_argument(
        "--masks",
        type=Path,
        help="mask file (.safetensors or .pt, read as data only); default: the masks the model applies itself (an "
        "fxsparse output or a FakeSparsity-parametrized model saved with torch.save, loaded with --trust-source). A "
        "model with neither has nothing to check: the command then fails (exit status 2)",
    )
    checker.add_argument("--pattern", help="require this pattern of every mask: N:M such as 2:4, or 'block 4x4'")
    checker.add_argument(
        "--groups",
        action="store_true",
        help="list the model's dependency groups (what structured pruning removes together); needs --input-shape "
        "or --token-ids. Without --masks, only the groups are listed",
    )
    _add_example_inputs(checker)
    prune = _add_prune(commands)
    shrinker = _add_shrink(commands)
    args = parser.parse_args(argv)
    command = {
        "demo": demo, "draw": draw, "diff": diff, "masks": make, "check": checker, "prune": prune, "shrink": shrinker,
    }[args.command]  # fmt: skip
    try:
        with _working_folder_last() if _is_factory(getattr(args, "source", "")) else contextlib.nullcontext():
            return _run(parser, command, args)
    except (FxsparseError, OSError) as error:  # what no command caught: still a sentence, never a traceback
        _fail(command, str(error))
    except Exception as error:
        _fail(command, f"{type(error).__name__}: {error} (a bug in fxsparse? please report it with the command)")


def _run(parser: argparse.ArgumentParser, command: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from ._demo import DEMOS

    loading = {"trust": getattr(args, "trust_source", False)}
    if args.command == "masks":
        return run_masks(command, args)
    if args.command == "prune":
        return run_prune(command, args)
    if args.command == "shrink":
        return run_shrink(command, args)
    if args.command == "check" and args.groups:
        return run_groups(command, args)
    if args.command == "check":
        return run_check(command, args.source, args.masks, args.pattern, **loading)
    if args.command in ("draw", "diff") and args.out is not None:
        _check_format(command, args.out)
    if args.command == "draw":
        out = args.out if args.out is not None or args.html is not None else Path("graph.svg")
        return run_draw(command, args.source, out, args.depth, args.full, args.html, **loading)
    if not 0.0 <= args.sparsity <= 1.0:
        command.error(f"--sparsity must be between 0 and 1, got {args.sparsity}" + percent_hint(args.sparsity))
    if args.command == "diff":
        out = args.out if args.out is not None or args.html is not None else Path("diff.svg")
        return run_diff(command, args.source, args.masks, args.sparsity, out, args.depth, args.full, args.html,
                        **loading)  # fmt: skip
    if not 0 <= args.seed < 2**63:
        parser.error(f"--seed must be between 0 and 2**63 - 1, got {args.seed}")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out must be a folder, but {args.out} is a file")
    needs = DEMOS[args.model][1]
    if needs is not None and importlib.util.find_spec(needs) is None:
        parser.error(f"--model {args.model} needs the {needs} package: pip install {needs}")
    return run_demo(args.model, args.out, args.sparsity, args.seed)


def run_demo(name: str, out_dir: Path, sparsity: float, seed: int) -> int:
    import fxsparse

    from ._demo import DEMOS

    # TorchScript is deprecated in torch 2.13 and warns on every call; the demo writes it on purpose.
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message="The TorchScript type system", category=UserWarning)
    # torch's own noise: it warns when it copies a pytree spec, and logs that torchvision's ops are absent.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)`", category=FutureWarning)
    logging.getLogger(ONNX_REGISTRATION_LOGGER).setLevel(logging.ERROR)
    demo = DEMOS[name][0](seed)
    model, inputs, other = demo.model, demo.inputs, demo.other_inputs
    masks = fxsparse.masks.magnitude(model, sparsity)
    print(f"fxsparse demo: {demo.description}; {len(masks)} projection weights", flush=True)

    options: dict[str, Any] = {"example_kwargs": inputs, "dynamic_shapes": demo.dynamic_shapes}
    start = time.perf_counter()
    out = fxsparse.transform(model, masks, **options)
    elapsed = time.perf_counter() - start
    capture = out.meta[fxsparse.META_KEY]["capture"]
    products = [n for n in out.graph.nodes if role_of(n) is Role.MASKED]
    density = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    how = "torch.fx" if capture == "fx" else "torch.export (torch.fx cannot trace it)"
    print(f"  masks      {sparsity:.0%} magnitude sparsity per layer (density {density:.3f})")
    print(f"  transform  {elapsed:.2f} s, captured with {how}: {len(products)} mask*weight nodes", flush=True)

    reference = fxsparse.transform(model, masks, emit="parametrize")
    with torch.no_grad():
        expected = {id(x): demo.logits(reference(**x)) for x in (inputs, other)}
    equal = _outputs_equal(out, demo.logits, (inputs, other), expected)
    print(f"  check      bitwise equal to torch.ao.pruning.FakeSparsity at two input shapes: {_yes(equal)}", flush=True)

    out_dir.mkdir(parents=True, exist_ok=True)
    checks = [equal]
    (out_dir / "graph.py").write_text(out.code)
    torch.save(out.state_dict(), out_dir / "state_dict.pt")
    masks_kept = sum(k.endswith("_mask") for k in torch.load(out_dir / "state_dict.pt"))
    checks.append(masks_kept == len(masks))
    print(f"  wrote      {out_dir / 'state_dict.pt'} ({masks_kept} masks kept), {out_dir / 'graph.py'} (the code)")

    exported = fxsparse.transform(model, masks, emit="export", **options)
    torch.export.save(exported, out_dir / "model.pt2")
    reloaded = torch.export.load(out_dir / "model.pt2").module()
    checks.append(_outputs_equal(reloaded, demo.logits, (inputs, other), expected))
    print(f"             {out_dir / 'model.pt2'} (torch.export, reloaded equal: {_yes(checks[-1])})", flush=True)

    if capture == "fx":
        torch.jit.save(fxsparse.transform(model, masks, emit="script"), str(out_dir / "model.script.pt"))
        scripted = torch.jit.load(str(out_dir / "model.script.pt"))  # type: ignore[no-untyped-call]
        checks.append(_outputs_equal(scripted, demo.logits, (inputs, other), expected))
        print(f"             {out_dir / 'model.script.pt'} (TorchScript, reloaded equal: {_yes(checks[-1])})")
    else:
        print("             no TorchScript: it cannot compile a graph captured with torch.export")

    from . import viz

    before = fxsparse.transform(model, {}, **options)  # the same capture, no masks
    page = viz.report(before, out, out_dir / "report.html", title=f"fxsparse demo: {demo.description}")
    print(f"             {page} (the graph before and after, what changed, how sparse: open it in a browser)")
    if importlib.util.find_spec("graphviz") is None:
        print("             (static pictures in the report too: pip install 'fxsparse[viz]')")
    if all(importlib.util.find_spec(package) for package in ("onnx", "onnxscript", "onnxruntime")):
        checks.append(_write_onnx(fxsparse.transform(model, masks, emit="onnx", **options), out_dir, demo, expected))
    else:
        print("             no ONNX: pip install 'fxsparse[onnx]' onnxruntime to write and check model.onnx")
    if not all(checks):
        print("fxsparse demo: FAILED, outputs differ", file=sys.stderr)
    return 0 if all(checks) else 1


_FORMATS = ("svg", "png", "jpg", "jpeg", "json", "plain", "dot", "gv", "xdot", "pdf")


def _whole_number(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number, ``minimum`` or more."""

    def parse(text: str) -> int:
        try:
            number = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, {minimum} or more; got {text!r}") from None
        if number < minimum:
            raise argparse.ArgumentTypeError(f"must be {minimum} or more, got {number}")
        return number

    return parse


_depth = _whole_number(0)
_positive = _whole_number(1)


def _check_format(parser: argparse.ArgumentParser, out: Path) -> None:
    """Refuse a picture format no renderer writes before any work is done."""
    suffix = out.suffix.lstrip(".").lower()
    if suffix not in _FORMATS:
        parser.error(
            f"--out {out}: the suffix picks the format, and {'.' + suffix if suffix else 'no suffix'} is not "
            f"one of {', '.join('.' + f for f in _FORMATS)}"
        )


def _fail(command: argparse.ArgumentParser, message: str) -> NoReturn:
    """End the command with ``message`` on stderr and exit status 2, as argparse does for a bad
    argument, without the usage lines (the arguments were fine: a file could not be written)."""
    from .masks._check import printable

    print(f"{command.prog}: error: {printable(message)}", file=sys.stderr)
    raise SystemExit(2)


def _is_factory(source: str) -> bool:
    return ":" in source and not Path(source).exists()


@contextlib.contextmanager
def _working_folder_last() -> Iterator[None]:
    """The current folder on ``sys.path`` while a command runs a ``module:function`` factory,
    where a user's own modules live (the console script's path lacks it), and after the
    installed packages: a ``safetensors.py`` or ``torch.py`` left in a download folder must
    not stand in for the real one. Other commands never search it."""
    folder = os.getcwd()
    if folder in sys.path or "" in sys.path:  # already searched, where the interpreter put it (python -c)
        yield
        return
    sys.path.append(folder)
    try:
        yield
    finally:
        if folder in sys.path:
            sys.path.remove(folder)


def _load(
    parser: argparse.ArgumentParser, source: str, *, trust: bool = False
) -> torch.nn.Module | torch.export.ExportedProgram:
    """A model from ``package.module:function`` (called with no arguments) or, when ``trust``
    (``--trust-source``) is given, a ``torch.save`` file or a ``torch.export`` ``.pt2`` file."""
    if _is_factory(source):
        module_name, _, function_name = source.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), function_name)
        except Exception as error:  # an import error, or whatever the module raised on import
            parser.error(f"cannot load the model factory {source!r}: {type(error).__name__}: {error}")
        if not callable(factory):
            parser.error(f"{source!r} is a {type(factory).__name__} object, not a function that makes a model")
        try:
            inspect.signature(factory).bind()
        except TypeError as error:
            parser.error(f"{source!r} must be callable with no arguments: {error}")
        except ValueError:
            pass  # no signature to read (a builtin): call it and see
        try:
            model = factory()
        except Exception as error:
            parser.error(f"{source!r} raised {type(error).__name__}: {error}")
    elif not Path(source).is_file():
        parser.error(f"{source!r} is neither a file nor a model factory such as mypackage.models:make_model")
    elif not trust:
        parser.error(
            f"{source} is a model file, and fxsparse loads model files only with --trust-source: torch.save and "
            "torch.export .pt2 files are pickles (TorchScript holds code), and loading one runs any code its maker "
            "put in it. Pass --trust-source if you made the file or trust who did, or pass the factory that makes "
            "the model, package.module:function"
        )
    elif Path(source).suffix == ".pt2":
        _register_transformers_outputs(Path(source))
        try:
            return torch.export.load(source)
        except Exception as error:
            parser.error(f"cannot load {source} with torch.export.load: {type(error).__name__}: {error}")
    else:
        try:
            with warnings.catch_warnings():  # a TorchScript file: refused below, with the reason
                warnings.filterwarnings("ignore", message=".*looks like a TorchScript archive", category=UserWarning)
                model = torch.load(source, weights_only=False)  # the user vouched for it: --trust-source
        except Exception as error:
            parser.error(f"cannot load {source} with torch.load: {type(error).__name__}: {error}")
    if isinstance(model, torch.jit.ScriptModule):
        parser.error(f"{source!r} is TorchScript, which has no FX graph to draw; draw the model it was made from")
    if not isinstance(model, torch.nn.Module):
        parser.error(f"{source!r} gave an object of type {type(model).__name__}, not a torch.nn.Module")
    return model


def _load_masks(parser: argparse.ArgumentParser, path: Path) -> dict[str, torch.Tensor]:
    """A mask file (safetensors, or ``.pt`` read as data only): it cannot run code."""
    from .masks._files import load_masks

    try:
        masks = load_masks(path)
    except MaskError as error:
        parser.error(f"--masks: {error}")
    if not masks:
        parser.error(f"--masks: {path} holds no masks (an empty dict)")
    return masks


def _prunable(module: torch.nn.Module, name: str) -> bool:
    """What ``fxsparse diff --sparsity`` masks: projections (Linear, Conv1D) and convolutions."""
    from .masks._makers import is_linear_like

    return is_linear_like(module) or isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d))


_REPORT_IN_PYTHON = (
    "fxsparse.viz.report(fxsparse.transform(model, {}, example_kwargs=...), "
    "fxsparse.transform(model, masks, example_kwargs=...), 'report.html')"
)
_VIEW_IN_PYTHON = "fxsparse.viz.view(fxsparse.transform(model, masks, example_kwargs=...), path='graph.html')"


def _register_transformers_outputs(path: Path) -> None:
    """Import transformers' output classes when the program at ``path`` returns one.

    torch.export.load rebuilds an output's pytree class only once its package has registered it
    (transformers does on import); without, a transformers model's .pt2 (``fxsparse demo --model
    gpt2-tiny`` writes one) failed to load with a warning and no reason."""
    if "transformers.modeling_outputs" in sys.modules or importlib.util.find_spec("transformers") is None:
        return
    try:
        with zipfile.ZipFile(path) as archive:
            mentions = any(
                b"transformers.modeling_outputs." in archive.read(name)
                for name in archive.namelist()
                if name.endswith(".json") and "/models/" in f"/{name}"
            )
    except (OSError, zipfile.BadZipFile):
        return  # torch.export.load says what is wrong with the file
    if mentions:
        importlib.import_module("transformers.modeling_outputs")


def _graph_of(
    parser: argparse.ArgumentParser, model: torch.nn.Module, in_python: str = _REPORT_IN_PYTHON
) -> torch.fx.GraphModule:
    if isinstance(model, torch.fx.GraphModule):
        return model
    try:
        return torch.fx.symbolic_trace(model)
    except Exception as error:
        parser.error(
            f"torch.fx cannot trace {type(model).__name__} ({type(error).__name__}: {str(error).splitlines()[0]}); "
            "the commands need a model FX can trace. For others (Hugging Face models), use the Python API with "
            f"example inputs: {in_python}"
        )


def run_draw(
    parser: argparse.ArgumentParser,
    source: str,
    out: Path | None,
    depth: int | None,
    full: bool,
    html: Path | None = None,
    *,
    trust: bool = False,
) -> int:
    from . import viz

    loaded = _load(parser, source, trust=trust)
    graph = loaded if isinstance(loaded, torch.export.ExportedProgram) else _graph_of(parser, loaded, _VIEW_IN_PYTHON)
    nodes = len(graph.graph.nodes)
    if out is not None:
        _say(f"drawing {_count(nodes, 'node')}")
        dot = viz.draw(graph, title=source, **_drawing_options(depth, full))
        path = _render(parser, viz, dot, out)
        print(f"fxsparse draw: {_count(nodes, 'node')} -> {path}")
    if html is not None:
        try:
            written = viz.view(graph, path=html, title=source)
        except OSError as error:
            _fail(parser, f"cannot write the viewer {html}: {error}")
        print(f"fxsparse draw: viewer -> {written}")
    return 0


def run_masks(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    import fxsparse

    if not 0.0 <= args.sparsity <= 1.0:
        parser.error(f"--sparsity must be between 0 and 1, got {args.sparsity}" + percent_hint(args.sparsity))
    model = _load(parser, args.source, trust=args.trust_source)
    if isinstance(model, torch.export.ExportedProgram):
        parser.error(f"{args.source!r} is an exported program; masks need the model: pass its factory")
    chosen = {"include": args.include, "exclude": args.exclude}
    recipe = args.recipe.lower()
    started = time.perf_counter()
    try:
        if recipe == "magnitude":
            masks = fxsparse.masks.magnitude(model, args.sparsity, scope=args.scope, **chosen)
        elif recipe == "block":
            rows, _, columns = args.block.lower().partition("x")
            if not (rows.isdigit() and columns.isdigit() and int(rows) > 0 and int(columns) > 0):
                parser.error(f"--block must be ROWSxCOLUMNS such as 4x4, got {args.block!r}")
            masks = fxsparse.masks.block(model, args.sparsity, (int(rows), int(columns)), **chosen)
            _warn_untiled(masks, (int(rows), int(columns)), args.sparsity)
        elif (n_m := recipe.split(":")) and len(n_m) == 2 and all(part.isdigit() for part in n_m):
            masks = fxsparse.masks.n_m(model, int(n_m[0]), int(n_m[1]), **chosen)
        else:
            parser.error(f"--recipe must be magnitude, N:M (such as 2:4) or block, got {args.recipe!r}")
    except fxsparse.MaskError as error:
        parser.error(_as_flags(str(error)))
    if not masks:
        parser.error(f"{args.source!r}: no weight selected (Linear and Conv1D by default; see --include)")
    elapsed = time.perf_counter() - started
    try:
        path = fxsparse.save_masks(masks, args.out, packed=args.packed)
    except Exception as error:  # a full disk: OSError, safetensors' SafetensorError, torch.save's RuntimeError
        _fail(parser, f"cannot write {args.out}: {type(error).__name__}: {error}")
    kept = sum(int(mask.sum()) for mask in masks.values()) / sum(mask.numel() for mask in masks.values())
    print(f"fxsparse masks: {_count(len(masks), 'mask')} ({recipe}, density {kept:.3f}) in {elapsed:.2f} s -> {path}")
    return 0


def _as_flags(message: str) -> str:
    """A message of the Python API with its keywords (``exclude=``) spelled as this command's flags."""
    for keyword in ("exclude", "include"):
        message = message.replace(f"({keyword}=)", f"(--{keyword})")
    return message


def _warn_untiled(masks: dict[str, torch.Tensor], block: tuple[int, int], sparsity: float) -> None:
    """Say which weights ``block`` does not tile: their edge blocks are cut short (as
    ``fxsparse.masks.block`` documents), so their density is not the one asked for."""
    for name, mask in masks.items():
        rows, columns = (mask.shape[0], mask[0].numel()) if mask.dim() > 1 else (1, mask.numel())
        if rows % block[0] or columns % block[1]:
            density = int(mask.sum()) / mask.numel()
            print(
                f"fxsparse masks: warning: --block {block[0]}x{block[1]} does not tile {name!r} (shape "
                f"{tuple(mask.shape)}, blocked as {rows}x{columns}): the blocks at its edges are cut short, so it "
                f"keeps {density:.3f} of its weights where --sparsity {sparsity} asks for {1 - sparsity:.3f}; pick a "
                "block that divides it, or leave it out with --exclude",
                file=sys.stderr,
            )


# -- fxsparse prune -------------------------------------------------------------------------------

_METHODS = ("wanda", "sparsegpt", "magnitude")
_TOKEN_FILES = (".safetensors", ".pt", ".pth")
_DEFAULT_BATCH = 8
_DEFAULT_SEQUENCE = 128
CALIBRATION = (
    "calibration inputs, token ids: a .safetensors file (its one tensor, or the one named input_ids) or a .pt file "
    "(a tensor, read with torch.load(weights_only=True): data only, never code), of integer dtype, shaped "
    "[samples, sequence] (grouped into batches of --batch-size) or [batches, batch size, sequence] (used as "
    "stored); or a plain-text file, with --tokenizer. Needed by wanda and sparsegpt"
)


def _add_prune(commands: Any) -> argparse.ArgumentParser:
    prune: argparse.ArgumentParser = commands.add_parser(
        "prune",
        help="prune a model with Wanda, SparseGPT or magnitude masks; write the pruned model and its masks",
        description="Prune a model's Linear and Conv1D weights (Wanda and SparseGPT read calibration activations, "
        "magnitude only the weights) and write the pruned model and its masks into --out: a transformers model "
        "as save_pretrained writes it, any other as model.pt (its state_dict, weights only), beside "
        "masks.safetensors and masks_config.json (fxsparse.masks.from_pretrained reads them back). Prints each "
        "mask's density and pattern, as fxsparse check does.",
    )
    prune.add_argument("source", help=SOURCE)
    prune.add_argument("--trust-source", action="store_true", help=TRUST_SOURCE)
    prune.add_argument(
        "--method",
        choices=_METHODS,
        default="wanda",
        help="wanda: |weight| x the input's norm over the calibration tokens; sparsegpt: masks, and the kept weights "
        "reconstructed; magnitude: |weight| alone (default: %(default)s)",
    )
    amount = prune.add_mutually_exclusive_group()
    amount.add_argument(
        "--sparsity",
        type=float,
        default=0.5,
        help="fraction to prune: of each output row (wanda), of each block of 128 input columns (sparsegpt), of "
        "each weight (magnitude) (default: %(default)s)",
    )
    amount.add_argument("--pattern", help="N:M such as 2:4: keep N of every M consecutive inputs in each row")
    prune.add_argument("--calibration", type=Path, metavar="FILE", help=CALIBRATION)
    prune.add_argument(
        "--tokenizer",
        metavar="NAME",
        help="for a text --calibration: a local directory holding a saved tokenizer (tokenizer.save_pretrained), "
        "or a Hugging Face Hub name (needs the network), loaded with transformers.AutoTokenizer.from_pretrained. "
        "The whole file is tokenized as one stream, without special tokens, and cut into samples of "
        "--sequence-length tokens (a shorter tail is left out)",
    )
    prune.add_argument(
        "--sequence-length", type=_positive, help=f"tokens per sample, text only (default: {_DEFAULT_SEQUENCE})"
    )
    prune.add_argument(
        "--batch-size",
        type=_positive,
        help=f"samples per batch (default: {_DEFAULT_BATCH}, or a 3-D file's own). The last batch may be shorter; "
        "a model captured with torch.export (transformers models) needs every batch the same shape",
    )
    prune.add_argument("--samples", type=_positive, help="use the first this many samples (default: all)")
    prune.add_argument(
        "--include", action="append", help="module-name glob to prune (repeatable; default: Linear, Conv1D)"
    )
    prune.add_argument("--exclude", action="append", help="module-name glob to leave out (repeatable), such as lm_head")
    prune.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder (made if missing)")
    return prune


def run_prune(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    import fxsparse

    from .masks._check import printable

    if not 0.0 <= args.sparsity <= 1.0:
        parser.error(f"--sparsity must be between 0 and 1, got {args.sparsity}" + percent_hint(args.sparsity))
    n_m = _n_m(parser, args.pattern) if args.pattern is not None else None
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out must be a folder, but {args.out} is a file")
    batches: list[torch.Tensor] = []
    if args.method == "magnitude":
        if args.calibration is not None:
            print("fxsparse prune: warning: --method magnitude reads only the weights; --calibration is not read",
                  file=sys.stderr)  # fmt: skip
    elif args.calibration is None:
        parser.error(
            f"--method {args.method} reads the activations that reach each weight: pass --calibration FILE (token "
            "ids in a .safetensors or .pt file, or a text file with --tokenizer)"
        )
    else:
        batches = _calibration(parser, args)
    model = _load(parser, args.source, trust=args.trust_source)
    if isinstance(model, torch.export.ExportedProgram):
        parser.error(f"{args.source!r} is an exported program; prune needs the model: pass its factory")
    chosen = {"include": args.include, "exclude": args.exclude}
    pattern = None if n_m is None else f"{n_m[0]}:{n_m[1]}"
    tokens = sum(batch.numel() for batch in batches)
    if batches:
        _say(
            f"calibrating on {len(batches):,} batch{'es' * (len(batches) != 1)} ({tokens:,} tokens) with {args.method}"
        )
    started = time.perf_counter()
    weights: dict[str, torch.Tensor] | None = None
    try:
        if args.method == "magnitude":
            if n_m is None:
                masks = fxsparse.masks.magnitude(model, args.sparsity, **chosen)
            else:
                masks = fxsparse.masks.n_m(model, *n_m, **chosen)
        elif args.method == "wanda":
            masks = fxsparse.masks.wanda(
                model, batches, args.sparsity, pattern=pattern, progress=sys.stderr.isatty(), **chosen
            )
        else:
            result = fxsparse.masks.sparsegpt(
                model, batches, args.sparsity, pattern=pattern, progress=sys.stderr.isatty(), **chosen
            )
            masks, weights = result.masks, result.weights
    except fxsparse.MaskError as error:
        parser.error(_as_flags(str(error)) + _ragged_hint(batches))
    except FxsparseError as error:
        _fail(parser, f"cannot capture {args.source!r} to calibrate it: {error}")
    except Exception as error:  # the model's own forward failed on the calibration: token ids past its vocabulary
        _fail(parser, f"running {args.source!r} on the calibration batches failed: {type(error).__name__}: {error}")
    if not masks:
        parser.error(f"{args.source!r}: no weight selected (Linear and Conv1D by default; see --include)")
    elapsed = time.perf_counter() - started
    _pruned_in_place(model, masks, weights)
    written = _write_pruned(parser, model, masks, args.out)
    report = fxsparse.check(model, masks, pattern=pattern)
    print(report)
    kept = sum(int(mask.sum()) for mask in masks.values()) / sum(mask.numel() for mask in masks.values())
    how = pattern if pattern is not None else f"sparsity {args.sparsity}"
    print(
        f"fxsparse prune: {_count(len(masks), 'mask')} ({args.method}, {how}, density {kept:.3f}) in {elapsed:.2f} s "
        f"-> {printable(str(args.out))} ({', '.join(printable(name) for name in written)})"
    )
    return 0 if report.ok else 1


def _ragged_hint(batches: list[torch.Tensor]) -> str:
    """What to change when the last batch is shorter than the others (a torch.export capture runs one shape)."""
    if len(batches) < 2 or batches[-1].shape == batches[0].shape:
        return ""
    samples = sum(len(batch) for batch in batches)
    return (
        f". Here the last batch holds {_count(len(batches[-1]), 'sample')} and the others {len(batches[0])}: pick a "
        f"--batch-size that divides the {samples} samples, or --samples a multiple of --batch-size"
    )


def _n_m(parser: argparse.ArgumentParser, pattern: str) -> tuple[int, int]:
    parts = pattern.split(":")
    if len(parts) == 2 and all(part.isdigit() for part in parts):
        n, m = int(parts[0]), int(parts[1])
        if 0 <= n <= m and m > 0:
            return n, m
    parser.error(f"--pattern must be N:M with whole numbers 0 <= N <= M and M > 0, such as 2:4; got {pattern!r}")


def _calibration(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[torch.Tensor]:
    """The calibration batches, each ``[batch size, sequence]`` token ids (``torch.long``)."""
    path: Path = args.calibration
    if not path.is_file():
        parser.error(f"--calibration {path}: no such file")
    if path.suffix.lower() in _TOKEN_FILES:
        for flag, value in (("--tokenizer", args.tokenizer), ("--sequence-length", args.sequence_length)):
            if value is not None:
                parser.error(f"{flag} is for a text --calibration file; {path} holds token ids already")
        ids = _token_ids(parser, path)
    elif args.tokenizer is None:
        parser.error(
            f"--calibration {path} is not a .safetensors or .pt file of token ids, so it is read as text, which needs "
            "--tokenizer NAME (a local tokenizer directory, or a Hugging Face Hub name)"
        )
    else:
        ids = _tokenized(parser, path, args.tokenizer, args.sequence_length or _DEFAULT_SEQUENCE)
    samples = ids.reshape(-1, ids.shape[-1])
    if args.samples is not None:
        if args.samples > samples.shape[0]:
            parser.error(
                f"--samples {args.samples}, but --calibration {path} holds {_count(samples.shape[0], 'sample')}"
            )
        samples = samples[: args.samples]
    per_batch = args.batch_size or (ids.shape[1] if ids.dim() == 3 else _DEFAULT_BATCH)
    return list(torch.split(samples, per_batch))


def _token_ids(parser: argparse.ArgumentParser, path: Path) -> torch.Tensor:
    """The token-id tensor of a ``.safetensors`` or ``.pt`` file, read as data only, checked."""
    where = f"--calibration {path}"
    loaded: Any
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            loaded = load_file(path)
        except Exception as error:
            parser.error(f"{where} is not a safetensors file safetensors can read: {type(error).__name__}: {error}")
    else:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # pickle.UnpicklingError for anything but tensors and plain containers
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
            parser.error(
                f"{where} cannot be read as data only (torch.load with weights_only=True: {type(error).__name__}: "
                f"{first_line}); fxsparse never loads a calibration file in a way that could run code. Save the "
                "token ids as a tensor: torch.save(ids, FILE), or safetensors.torch.save_file({'input_ids': ids}, FILE)"
            )
    if isinstance(loaded, dict):
        tensors = loaded
        if "input_ids" in tensors:
            loaded = tensors["input_ids"]
        elif len(tensors) == 1:
            (loaded,) = tensors.values()
        else:
            parser.error(
                f"{where} holds {len(tensors)} entries ({', '.join(repr(k) for k in tensors)}) and none "
                "named 'input_ids': store one tensor, or name the token ids input_ids"
            )
    if not isinstance(loaded, torch.Tensor):
        parser.error(f"{where} holds a {type(loaded).__name__}, not a tensor of token ids")
    return _checked_ids(parser, where, loaded)


def _checked_ids(parser: argparse.ArgumentParser, where: str, ids: torch.Tensor) -> torch.Tensor:
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        parser.error(f"{where} holds {ids.dtype} values; token ids are integers (torch.long, torch.int32, ...)")
    if ids.dim() not in (2, 3):
        parser.error(
            f"{where} holds a tensor of shape {tuple(ids.shape)}; token ids must be 2-D, [samples, sequence], or "
            "3-D, [batches, batch size, sequence] (one sequence: ids.unsqueeze(0))"
        )
    if ids.numel() == 0:
        parser.error(f"{where} holds no token ids (shape {tuple(ids.shape)})")
    ids = ids.to(torch.long)
    if int(ids.min()) < 0:
        parser.error(f"{where} holds a negative token id ({int(ids.min())}); token ids are 0 or more")
    return ids


def _tokenized(parser: argparse.ArgumentParser, path: Path, name: str, sequence_length: int) -> torch.Tensor:
    """A text file's tokens as ``[samples, sequence_length]``; the tail shorter than a sample left out."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        parser.error(f"--calibration {path} cannot be read as UTF-8 text: {type(error).__name__}: {error}")
    if importlib.util.find_spec("transformers") is None:
        parser.error("--tokenizer needs the transformers package: pip install transformers")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except Exception as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        parser.error(
            f"--tokenizer {name!r}: transformers.AutoTokenizer.from_pretrained cannot load it ({type(error).__name__}: "
            f"{first_line}); give a local directory a tokenizer was saved to (tokenizer.save_pretrained(DIR)), or a "
            "Hugging Face Hub name where the network is reachable"
        )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    count = len(ids) // sequence_length
    if count == 0:
        parser.error(
            f"--calibration {path} gives {_count(len(ids), 'token')} with --tokenizer {name!r}, fewer than one "
            f"sample of --sequence-length {sequence_length}"
        )
    return _checked_ids(
        parser, f"--calibration {path}", torch.tensor(ids[: count * sequence_length]).reshape(count, sequence_length)
    )


def _pruned_in_place(
    model: torch.nn.Module, masks: dict[str, torch.Tensor], weights: dict[str, torch.Tensor] | None
) -> None:
    """The masks folded into the model the command loaded (its own: no one else holds it); SparseGPT's
    reconstructed weights, already zero where pruned, written instead of the old ones."""
    with torch.no_grad():
        for name, mask in masks.items():
            parameter = model.get_parameter(name)
            parameter.copy_(weights[name] if weights is not None else torch.mul(mask, parameter))


def _write_pruned(
    parser: argparse.ArgumentParser, model: torch.nn.Module, masks: dict[str, torch.Tensor], out: Path
) -> list[str]:
    """The pruned model and its masks in ``out``: the names of what was written."""
    import fxsparse

    from ._save import atomic_write

    before = _file_stamps(out)
    transformers = sys.modules.get("transformers")  # a transformers model has imported it
    try:
        out.mkdir(parents=True, exist_ok=True)
        if transformers is not None and isinstance(model, transformers.PreTrainedModel):
            model.save_pretrained(out)
        else:
            state = model.state_dict()
            atomic_write(out / "model.pt", lambda temporary: torch.save(state, temporary), error=FxsparseError)
        fxsparse.masks.save_pretrained(masks, out)
    except Exception as error:  # a full disk: OSError, safetensors' SafetensorError, torch.save's RuntimeError
        _fail(parser, f"cannot write {out}: {type(error).__name__}: {error}")
    return sorted(name for name, stamp in _file_stamps(out).items() if before.get(name) != stamp)


def _file_stamps(folder: Path) -> dict[str, tuple[int, int, int]]:
    """Each file's (inode, size, modification time): what changed between two calls is what was written."""
    if not folder.is_dir():
        return {}
    stamps = {}
    for path in folder.iterdir():
        if path.is_file():
            status = path.stat()
            stamps[path.name] = (status.st_ino, status.st_size, status.st_mtime_ns)
    return stamps


# -- fxsparse shrink, and check --groups ----------------------------------------------------------


def _add_example_inputs(command: argparse.ArgumentParser) -> None:
    inputs = command.add_mutually_exclusive_group()
    inputs.add_argument(
        "--input-shape", metavar="SHAPE", help="run the model on one float input of this shape, such as 1x3x32x32"
    )
    inputs.add_argument(
        "--token-ids",
        metavar="SHAPE",
        help="run the model on input_ids of this shape, such as 1x16 (transformers); the ids are ones, since zeros "
        "are often padding, which would hide every weight",
    )


def _example_inputs(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    text = args.input_shape or args.token_ids
    if text is None:
        parser.error("structured pruning runs the model once to find its groups: pass --input-shape or --token-ids")
    parts = text.lower().split("x")
    if not all(part.isdigit() and int(part) > 0 for part in parts):
        parser.error(f"a shape is positive whole numbers joined by x, such as 1x16; got {text!r}")
    shape = tuple(int(part) for part in parts)
    if args.token_ids is not None:
        # Not zeros: token 0 is often padding (a zero embedding), whose outputs are all zero, so
        # shrink's check of the smaller model against the masked one would compare nothing.
        return (), {"input_ids": torch.ones(shape, dtype=torch.long)}
    return (torch.randn(shape, generator=torch.Generator().manual_seed(0)),), {}


def _add_shrink(commands: Any) -> argparse.ArgumentParser:
    shrink: argparse.ArgumentParser = commands.add_parser(
        "shrink",
        help="remove whole channels and heads (structured pruning) and write the smaller model",
        description="Find the model's dependency groups, mask the lowest-scoring units of each (L2 norm), and "
        "remove them: a smaller dense model, checked against the masked one on the example input. A transformers "
        "model is written with save_pretrained (its config updated: it loads with from_pretrained); any other "
        "model as model.pt (its state_dict) and model.full.pt (the module, for torch.load).",
    )  # fmt: skip
    shrink.add_argument("source", help=SOURCE)
    shrink.add_argument("--trust-source", action="store_true", help=TRUST_SOURCE)
    shrink.add_argument(
        "--sparsity", type=float, default=0.5, help="fraction of each group's units to remove (default: 0.5)"
    )
    shrink.add_argument(
        "--round-to", type=_positive, default=1, help="keep a multiple of this many units per group (default: 1)"
    )
    shrink.add_argument(
        "--scope", choices=("layer", "global"), default="layer",
        help="layer: each group loses --sparsity of its units; global: one ranking of all units (default: layer)",
    )  # fmt: skip
    shrink.add_argument("--include", action="append", help="parameter-name glob: prune the groups it touches")
    shrink.add_argument("--exclude", action="append", help="parameter-name glob: leave the groups it touches")
    _add_example_inputs(shrink)
    shrink.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder (made if missing)")
    return shrink


def run_groups(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    import fxsparse

    from .masks._check import printable

    model = _load(parser, args.source, trust=args.trust_source)
    if isinstance(model, torch.export.ExportedProgram):
        parser.error(f"{args.source!r} is an exported program; check --groups needs the model: pass its factory")
    inputs, kwargs = _example_inputs(parser, args)
    found = fxsparse.groups(model, example_inputs=inputs, example_kwargs=kwargs)
    for line in str(found).splitlines():
        print(printable(line))
    if args.masks is None:
        return 0
    return run_check(parser, args.source, args.masks, args.pattern, trust=args.trust_source)


def run_shrink(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    import fxsparse

    from ._save import atomic_write
    from .masks._check import printable

    if not 0.0 <= args.sparsity < 1.0:
        parser.error(f"--sparsity must be at least 0 and below 1, got {args.sparsity}" + percent_hint(args.sparsity))
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out must be a folder, but {args.out} is a file")
    model = _load(parser, args.source, trust=args.trust_source)
    if isinstance(model, torch.export.ExportedProgram):
        parser.error(f"{args.source!r} is an exported program; shrink needs the model: pass its factory")
    inputs, kwargs = _example_inputs(parser, args)
    started = time.perf_counter()
    masks = fxsparse.masks.channels(
        model, args.sparsity, include=args.include, exclude=args.exclude, round_to=args.round_to, scope=args.scope,
        example_inputs=inputs, example_kwargs=kwargs,
    )  # fmt: skip
    if not masks:
        parser.error(f"{args.source!r}: no prunable group (see fxsparse check --groups)")
    out = fxsparse.transform(model, masks, example_inputs=inputs, example_kwargs=kwargs)
    small = fxsparse.shrink(out, example_inputs=inputs, example_kwargs=kwargs)
    elapsed = time.perf_counter() - started
    transformers = sys.modules.get("transformers")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        if transformers is not None and isinstance(small, transformers.PreTrainedModel):
            small.save_pretrained(args.out)
        else:
            state = small.state_dict()
            atomic_write(args.out / "model.pt", lambda temporary: torch.save(state, temporary), error=FxsparseError)
            atomic_write(
                args.out / "model.full.pt", lambda temporary: torch.save(small, temporary), error=FxsparseError
            )
    except Exception as error:
        _fail(parser, f"cannot write {args.out}: {type(error).__name__}: {error}")
    before = sum(p.numel() for p in model.parameters())
    after = sum(p.numel() for p in small.parameters())
    print(
        f"fxsparse shrink: {before:,} -> {after:,} parameters ({after / before:.1%}) in {elapsed:.2f} s, outputs "
        f"checked against the masked model -> {printable(str(args.out))}"
    )
    return 0


def run_check(
    parser: argparse.ArgumentParser, source: str, masks_file: Path | None, pattern: str | None, *, trust: bool = False
) -> int:
    import fxsparse

    model = _load(parser, source, trust=trust)
    if isinstance(model, torch.export.ExportedProgram):
        parser.error(f"{source!r} is an exported program; check needs the model: pass its factory")
    masks = _load_masks(parser, masks_file) if masks_file is not None else None
    try:
        report = fxsparse.check(model, masks, pattern=pattern)
    except fxsparse.MaskError as error:
        parser.error(str(error))
    if not report.masks:
        parser.error(
            f"nothing to check: {source!r} applies no masks of its own (it is neither an fxsparse output nor a "
            "FakeSparsity-parametrized model); pass the masks to check with --masks FILE"
        )
    print(report)
    return 0 if report.ok else 1


def run_diff(
    parser: argparse.ArgumentParser,
    source: str,
    masks_file: Path | None,
    sparsity: float,
    out: Path | None,
    depth: int | None,
    full: bool,
    page: Path | None,
    *,
    trust: bool = False,
) -> int:
    import fxsparse

    from . import viz
    from .masks._check import printable

    model = _load(parser, source, trust=trust)
    if isinstance(model, torch.export.ExportedProgram):
        parser.error(f"{source!r} is an exported program; diff needs the model: pass its factory")
    if masks_file is not None:
        masks = _load_masks(parser, masks_file)
    else:
        try:
            masks = fxsparse.masks.magnitude(model, sparsity, filter_fn=_prunable)
        except fxsparse.MaskError:  # _prunable selected nothing
            masks = {}
        if not masks:
            parser.error(f"{source!r} has no Linear, Conv or Conv1D weight to mask by magnitude; pass --masks")
        kinds = Counter(type(model.get_submodule(name.rpartition(".")[0])).__name__ for name in masks)
        by_kind = ", ".join(f"{kind} ×{count}" for kind, count in sorted(kinds.items()))
        _say(f"masking {_count(len(masks), 'weight')} ({by_kind}) at {sparsity:.0%} sparsity by magnitude")
    before = _graph_of(parser, model)
    _say(f"transforming {_count(len(before.graph.nodes), 'node')} with {_count(len(masks), 'mask')}")
    try:
        after = fxsparse.transform(model, masks)
    except fxsparse.FxsparseError as error:
        parser.error(f"cannot transform {source!r}: {error}")
    _say("comparing the graphs")
    graph_diff = viz.diff(before, after)
    print(printable(graph_diff.summary(), keep="\n"))
    if out is not None:
        _say("drawing the diff")
        path = _render(parser, viz, viz.draw_diff(before, after, graph_diff, **_drawing_options(depth, full)), out)
        print(f"fxsparse diff: picture -> {path}")
    if page is not None:
        _say("writing the report")
        try:
            written = viz.report(before, after, page, title=f"fxsparse: {source}", graph_diff=graph_diff)
        except OSError as error:
            _fail(parser, f"cannot write the report {page}: {error}")
        print(f"fxsparse diff: report -> {written}")
    return 0


def _drawing_options(depth: int | None, full: bool) -> dict[str, Any]:
    if full:
        return {"depth": depth if depth is not None else 10**6, "compact": False, "fold": False}
    return {"depth": depth}


def _count(number: int, noun: str) -> str:
    return f"{number:,} {noun}{'s' * (number != 1)}"


def _say(step: str) -> None:
    """A progress line on stderr, so that stdout stays the result (escaped: it names the model's classes)."""
    from .masks._check import printable

    print(f"fxsparse: {printable(step)} ...", file=sys.stderr, flush=True)


def _render(parser: argparse.ArgumentParser, viz: Any, dot: Any, out: Path) -> Path:
    """Render ``dot`` to ``out``, or end the command saying why not."""
    try:
        return Path(viz.render(dot, out))
    except viz.RenderError as error:
        _fail(parser, str(error))
    except OSError as error:
        _fail(parser, f"cannot write {out}: {error}")


def _outputs_equal(
    module: Any, logits: Any, inputs: Sequence[dict[str, torch.Tensor]], expected: dict[int, torch.Tensor]
) -> bool:
    with torch.no_grad():
        return all(torch.equal(logits(module(**x)), expected[id(x)]) for x in inputs)


def _write_onnx(program: Any, out_dir: Path, demo: Any, expected: dict[int, torch.Tensor]) -> bool:
    import onnx
    import onnxruntime

    path = out_dir / "model.onnx"
    program.save(str(path))
    proto = onnx.load(str(path))
    masks = sum(i.name.endswith("_mask") for i in proto.graph.initializer)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for x in (demo.inputs, demo.other_inputs):
        (logits,) = session.run(None, {k: v.numpy() for k, v in x.items()})
        worst = max(worst, float((torch.from_numpy(logits) - expected[id(x)]).abs().max()))
    close = worst <= 1e-4
    print(f"             {path} (ONNX, {masks} named mask initializers, onnxruntime max |diff| {worst:.1e})")
    return close


def _yes(flag: bool) -> str:
    return "yes" if flag else "NO"


if __name__ == "__main__":
    raise SystemExit(main())
