"""``fxsparse.viz.view``: the interactive viewer, one self-contained HTML file."""

from __future__ import annotations

from pathlib import Path

from ._diff import Drawable
from ._view_data import view_data
from ._view_html import page

__all__ = ["view"]


def view(
    out: Drawable, before: Drawable | None = None, path: str | Path = "graph.html", *, title: str | None = None
) -> Path:
    """Write an interactive viewer of ``out`` to ``path``: one HTML file that opens offline.

    The page shows the module hierarchy collapsed (a transformers model's first screen is its
    top-level structure, a stack of decoder layers one box "×N"); a click opens a box, down to
    single nodes; drag or scroll to pan, wheel or pinch to zoom; the search box finds a node,
    parameter or module and opens the boxes around it; the side panel shows a node's op,
    target, module, shapes and dtypes (where the capture recorded them), and for a masked
    weight its density, pattern, the multiply-adds it skips and the kernel layout
    ``fxsparse.freeze`` chose. Symbolic size queries, shape assertions, tuple ``getitem`` and
    arithmetic that touches no weight (attention masks, position ids) are hidden until
    "plumbing" is ticked. Given ``before`` (the model traced, or captured with no masks), the
    "diff" mode marks added, changed and removed nodes, every collapsed box with a change
    inside, and lists the changes. Nothing is fetched: the layout engine (ELK, through elkjs,
    EPL-2.0) is written into the page, and a Content-Security-Policy lets only the page's own
    scripts run.

    ``out`` and ``before`` are what :func:`~fxsparse.viz.diff` takes: a ``GraphModule``
    (fxsparse's output, or ``torch.fx.symbolic_trace(model)``), a ``torch.fx.Graph`` or a
    ``torch.export.ExportedProgram``. Needs no Graphviz.

    Example:
        >>> import tempfile, torch, fxsparse
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> out = fxsparse.transform(model, {"0": torch.eye(4)})
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     page = fxsparse.viz.view(out, torch.fx.symbolic_trace(model), f"{folder}/graph.html")
        ...     "_0_weight_mask" in page.read_text()
        True
    """
    data = view_data(out, before, title=title or ("diff" if before is not None else "graph"))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page(data), encoding="utf-8")
    return path
