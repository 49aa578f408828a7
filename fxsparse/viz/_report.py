"""The report: one standalone HTML file with the sparsity table, the interactive viewer of the diff,
and (where Graphviz's Python package is installed) the before, after and diff pictures.

Everything is inline (SVG, styles, the viewer's scripts); the file opens offline and can be
mailed around. Its Content-Security-Policy lets only the viewer's own inline scripts run (by
their hashes) and forbids any other script (inline, ``javascript:`` links, event handlers),
remote loads and forms, so a model named to inject markup can at most show text.
"""

from __future__ import annotations

import html
import importlib.util
import math
import re
from pathlib import Path

import torch
import torch.export
import torch.fx

from .._kernels import LayoutChoice, layouts_in
from .._sparsity import summarize
from ..masks._importers import of
from ._diff import Drawable, GraphDiff, diff, graph_of
from ._draw import DIFF_MARKS, KINDS, RenderError, draw, draw_diff, kind_of, render_bytes
from ._view_data import view_data
from ._view_html import policy, viewer_parts

__all__ = ["masks_of", "report"]

# What Graphviz draws a picture with. Anything else in its SVG (a link, an image, a script)
# could only come from a model's strings and is never put on the page.
_SVG_ELEMENTS = frozenset(
    {"svg", "g", "title", "polygon", "polyline", "path", "ellipse", "text", "defs", "stop", "linearGradient",
     "radialGradient"}
)  # fmt: skip

_STYLE = """
body { font: 14px/1.45 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2rem auto; max-width: 80rem;
       padding: 0 1rem; color: #222; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; }
tfoot td { font-weight: bold; border-top: 1px solid #999; }
th, td { padding: .25rem .75rem; border-bottom: 1px solid #eee; text-align: right; }
th:first-child, td:first-child { text-align: left; font-family: monospace; }
figure { margin: 1rem 0; overflow: auto; border: 1px solid #eee; padding: .5rem; }
figure svg { height: auto; }  /* natural size: a big graph scrolls rather than shrinking its text */
.note { color: #555; font-size: 12px; max-width: 60rem; }
pre { background: #f7f7f7; padding: .75rem; overflow: auto; font-size: 12px; }
.add { color: #38761d; } .del { color: #cc0000; }
.fxv-frame { height: 85vh; border: 1px solid #ddd; }
.key { display: inline-block; padding: 0 .5rem; margin: .15rem; border: 1px solid #999; border-radius: .4rem;
       font-size: 12px; }
"""


def masks_of(model: torch.fx.GraphModule | torch.export.ExportedProgram | torch.nn.Module) -> dict[str, torch.Tensor]:
    """The masks a model applies, by parameter name (the buffers themselves, not copies):
    :func:`fxsparse.masks.of`, kept here under its first name."""
    return of(model)


def report(
    before: Drawable,
    after: Drawable,
    path: str | Path,
    *,
    title: str = "fxsparse report",
    graph_diff: GraphDiff | None = None,
    depth: int | None = None,
    compact: bool = True,
) -> Path:
    """Write one HTML file comparing ``before`` (the model traced) with ``after`` (fxsparse's output).

    The page holds a table of the masked parameters (shape, density, pattern, the
    multiply-adds a sparse kernel could skip, and their totals), the diff as text, the
    interactive viewer of ``after`` marked against ``before`` (:func:`~fxsparse.viz.view`),
    the generated code before and after, and, where Graphviz's Python package is installed
    (``pip install 'fxsparse[viz]'``), the diff and the two graphs drawn as pictures. Pass
    ``graph_diff`` when you already have ``diff(before, after)``. ``depth`` and ``compact``
    draw the pictures as :func:`draw_diff` does (compact by default: plumbing hidden).

    Example:
        >>> import tempfile, torch, fxsparse
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> out = fxsparse.transform(model, {"0": torch.eye(4)})
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     page = fxsparse.viz.report(torch.fx.symbolic_trace(model), out, f"{folder}/report.html")
        ...     "density" in page.read_text()
        True
    """
    # Each graph once: an exported program is unlifted (torch.export's module(), slow on big ones).
    (before_module, before_graph), (after_module, after_graph) = graph_of(before, "report"), graph_of(after, "report")
    before, after = before_module or before_graph, after_module or after_graph
    graph_diff = graph_diff if graph_diff is not None else diff(before, after)
    viewer = viewer_parts(view_data(after, before, title=title, graph_diff=graph_diff))
    masks = masks_of(after_module) if after_module is not None else {}
    summary = summarize(masks, after_module)
    rows = "".join(
        f"<tr><td>{html.escape(entry.name)}</td><td>{'×'.join(map(str, entry.shape))}</td>"
        f"<td>{entry.density:.3f}</td><td>{html.escape(entry.pattern)}</td>"
        f"<td>{entry.macs:,}</td><td>{entry.macs_skipped:,}</td></tr>"
        for entry in summary
    )
    weights = sum(math.prod(entry.shape) for entry in summary)
    kept = sum(entry.density * math.prod(entry.shape) for entry in summary)
    macs, skipped = sum(entry.macs for entry in summary), sum(entry.macs_skipped for entry in summary)
    totals = (
        f"<tr class='total'><td>{_count(len(summary), 'parameter')}</td><td>{_count(weights, 'weight')}</td>"
        f"<td>{kept / weights if weights else 1.0:.3f}</td><td></td><td>{macs:,}</td><td>{skipped:,}</td></tr>"
    )
    sections = [
        f"<h1>{html.escape(title)}</h1>",
        "<h2 id='sparsity'>Masked parameters</h2>",
        "<table><thead><tr><th>parameter</th><th>shape</th><th>density</th><th>pattern</th>"
        "<th>multiply-adds per output</th><th>skippable</th></tr></thead>"
        f"<tbody>{rows}</tbody><tfoot>{totals}</tfoot></table>",
        "<p class='note'>Density: the fraction of the weight kept. Pattern: how the kept weights are laid out "
        "(N:M: at most N of every M along the input, what sparse tensor cores run; rows/columns: whole output or "
        "input channels; block: square blocks; unstructured: anywhere). Multiply-adds per output: what the weight "
        "costs per token (Linear) or output pixel (convolution); skippable: those a kernel that skips pruned "
        "weights saves.</p>",
        *_kernel_table(layouts_in(after_graph)),
        "<h2 id='diff'>What changed</h2>",
        f"<pre>{html.escape(graph_diff.summary())}</pre>",
        "<p class='note'>Added and removed: nodes only one graph has. Changed: a node both have whose operation "
        "or inputs differ (a Linear call now reading mask * weight). Rewired: inputs a kept node newly reads; "
        "dropped: inputs it no longer reads.</p>",
        "<h2 id='viewer'>The graph, interactive</h2>",
        f"<div class='fxv-frame'>{viewer.body}</div>",
        f"<details><summary>Generated code, before and after</summary><pre>{_code_diff(graph_diff.unified())}</pre>"
        "</details>",
    ]
    if importlib.util.find_spec("graphviz") is not None:
        sections += [
            "<h2 id='pictures'>Pictures</h2>",
            _legend(before_graph, after_graph),
            _figure(draw_diff(before, after, graph_diff, depth=depth, compact=compact), "diff"),
            "<h2 id='before'>Before</h2>",
            _figure(draw(before, title="before", depth=depth, compact=compact), "before"),
            "<h2 id='after'>After</h2>",
            _figure(draw(after, title="after", depth=depth, compact=compact), "after"),
        ]
    else:
        sections.append(
            "<p class='note' id='no-pictures'>Static pictures of the graphs (SVG, for papers and slides) need "
            "Graphviz's Python package: <code>pip install 'fxsparse[viz]'</code>. The viewer above needs nothing.</p>"
        )
    page = (
        "<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<meta http-equiv='Content-Security-Policy' content=\"{policy(viewer)}\">"
        f"<title>{html.escape(title)}</title><style>{_STYLE}{viewer.style}</style></head>\n<body>\n"
        + "\n".join(sections)
        + "\n</body></html>\n"
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def _kernel_table(choices: dict[str, LayoutChoice]) -> list[str]:
    """The layout fxsparse.freeze chose per linear weight, and what it measured (nothing for other graphs)."""
    if not choices:
        return []
    rows = "".join(
        f"<tr><td>{html.escape(c.param)}</td><td>{html.escape(c.layout)}</td>"
        f"<td>{'' if c.speedup is None else f'×{c.speedup:.2f}'}</td><td>{c.density:.3f}</td>"
        f"<td>{html.escape(', '.join(f'{k} ×{v:.2f}' for k, v in c.measured.items()))}</td>"
        f"<td>{html.escape(' '.join(map(str, c.rows)))}</td><td style='text-align:left'>{html.escape(c.note)}</td></tr>"
        for c in choices.values()
    )
    return [
        "<h2 id='kernels'>Kernels</h2>",
        "<table><thead><tr><th>parameter</th><th>layout</th><th>speed-up</th><th>density</th><th>measured</th>"
        f"<th>rows</th><th>note</th></tr></thead><tbody>{rows}</tbody></table>",
        "<p class='note'>How fxsparse.freeze stores each linear weight. Speed-up: dense time ÷ the chosen "
        "layout's time, measured on this machine at the input rows shown (the lowest of them); measured: every "
        "layout tried. layout='auto' keeps a sparse kernel only where it is at least 1.1× faster.</p>",
    ]


def _count(number: int, noun: str) -> str:
    return f"{number:,} {noun}{'s' * (number != 1)}"


def _legend(*graphs: torch.fx.Graph) -> str:
    """What the colours and outlines of the pictures mean (the node kinds they show)."""
    shown = {kind_of(node) for graph in graphs for node in graph.nodes}
    kinds = "".join(
        f"<span class='key' style='background:{colour}'>{html.escape(kind)}</span>"
        for kind, colour in KINDS.items()
        if kind in shown
    )
    marks = "".join(
        f"<span class='key' style='border:2.5px {style} {colour}'>{mark}</span>"
        for mark, (colour, style) in DIFF_MARKS.items()
    )
    return f"<p class='legend'>Node kinds: {kinds}<br>In the diff: {marks}</p>"


def _figure(dot: object, name: str) -> str:
    try:
        svg = _checked(render_bytes(dot).decode())
    except RenderError as error:
        return (
            f"<figure id='figure-{name}'><p>{html.escape(str(error))}. The DOT source:</p>"
            f"<pre>{html.escape(dot.source)}</pre></figure>"  # type: ignore[attr-defined]
        )
    svg = svg[svg.index("<svg") :]  # without the XML prolog and doctype, to sit inside HTML
    svg = re.sub(r"<!--.*?-->", "", svg, flags=re.DOTALL)
    # Three drawings on one page: their ids (node1, edge1, ...) must not collide.
    svg = re.sub(r'\bid="([^"]*)"', rf'id="{name}-\1"', svg)
    svg = re.sub(r"url\(#([^)]*)\)", rf"url(#{name}-\1)", svg)
    svg = re.sub(r'href="#([^"]*)"', rf'href="#{name}-\1"', svg)
    return f"<figure id='figure-{name}'>{svg}</figure>"


def _checked(svg: str) -> str:
    """``svg`` if it holds only what Graphviz draws pictures with (``RenderError`` if not)."""
    others = sorted(set(re.findall(r"<([A-Za-z][\w:.-]*)", svg)) - _SVG_ELEMENTS)
    if others or re.search(r"<[^>]*[\s:](href|on\w+)\s*=", svg):  # Graphviz escapes < and > in text
        found = ", ".join(f"<{name}>" for name in others) or "a link or an event handler"
        raise RenderError(f"the drawing holds {found}, which a report never shows")
    return svg


_CODE_DIFF_LINES = 3000  # a 5,000-layer model's code diff is 30,000 lines: the start shows the pattern


def _code_diff(unified: str) -> str:
    lines = []
    all_lines = unified.splitlines()
    for line in all_lines[:_CODE_DIFF_LINES]:
        escaped = html.escape(line)
        if line.startswith("+") and not line.startswith("+++"):
            escaped = f"<span class='add'>{escaped}</span>"
        elif line.startswith("-") and not line.startswith("---"):
            escaped = f"<span class='del'>{escaped}</span>"
        lines.append(escaped)
    if len(all_lines) > _CODE_DIFF_LINES:
        lines.append(f"... {len(all_lines) - _CODE_DIFF_LINES:,} more lines (GraphDiff.unified() has them all)")
    return "\n".join(lines)
