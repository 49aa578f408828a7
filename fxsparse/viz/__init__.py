"""See what a transform did: graph diffs, sparsity summaries (drawing and reports build on these).

Example:
    >>> import torch, fxsparse
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    >>> out = fxsparse.transform(model, {"0": torch.eye(4)})
    >>> print(fxsparse.viz.diff(torch.fx.symbolic_trace(model), out).summary())  # doctest: +NORMALIZE_WHITESPACE
    nodes        count
    added            4
    removed          0
    changed          1
    unchanged        2
    edges        count
    rewired          2
    dropped          0
    added by role: mask 1, masked 1, param 1, weight 1
"""

from .._sparsity import ParameterSparsity, pattern_of, summarize
from ._diff import GraphDiff, diff, to_networkx
from ._draw import DIFF_MARKS, KINDS, RenderError, draw, draw_diff, render, render_bytes
from ._model_explorer import model_explorer_data
from ._report import masks_of, report
from ._view import view

__all__ = [
    "DIFF_MARKS",
    "KINDS",
    "GraphDiff",
    "ParameterSparsity",
    "RenderError",
    "diff",
    "draw",
    "draw_diff",
    "masks_of",
    "model_explorer_data",
    "pattern_of",
    "render",
    "render_bytes",
    "report",
    "summarize",
    "to_networkx",
    "view",
]
