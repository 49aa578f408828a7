"""fxsparse: weight masks as an explicit torch.fx graph rewrite.

``torch.ao.pruning.FakeSparsity`` masks a weight through ``torch.nn.utils.parametrize``:
the mask hides inside a parametrization, where scripting, ``state_dict``, ``torch.save``
and FX tracing cannot see it. fxsparse computes the same ``mask * weight``, bit for bit,
as an ordinary buffer and an ordinary ``mul`` node in an FX graph::

    model ──plan──▶ Plan ──capture──▶ fx.Graph ──rewrite──▶ masked fx.Graph ──emit──▶ output
           which parameters,  copy the model,       one mask*weight node        GraphModule,
           which masks,       lower FakeSparsity,   per masked parameter,       FakeSparsity module,
           which modules      trace it              Linear/Conv/Embedding       TorchScript,
           to open                                  opened to functional calls  torch.export

Where things live (imports flow one way: errors → plan → capture → rewrite → emit; diff → draw):

- ``_plan`` (pure data: what to mask, open, keep), ``_capture`` (copy, lower, trace or export),
  ``_rewrite`` (the only module that edits graphs), ``_emit`` (output forms), ``_transform``
  and ``_freeze`` (the public entry points, which only call those);
- ``_tags`` (the typed node tags: how fxsparse knows its own nodes), ``_compat`` (every private
  torch API, and nothing else reaches one), ``_runtime/`` (what graphs call: the weight swap,
  sparse operators, input guards), ``_kernels`` (sparse layouts, chosen by measurement);
- ``masks/`` (makers, importers, files, check, update), ``structured/`` (groups, channel
  scores, shrink) and ``viz/`` (diff, draw, report): packages of their own, built on the core
  and never imported by it (``masks.channels`` comes from ``structured``, which never imports ``masks``).

Example:
    >>> import torch, fxsparse
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU())
    >>> out = fxsparse.transform(model, {"0.weight": torch.eye(3)})
    >>> print(out.code.strip())  # doctest: +NORMALIZE_WHITESPACE
    def forward(self, input):
        input_1 = input
        _0_weight = getattr(self, "0").weight
        _0_bias = getattr(self, "0").bias
        _0_weight_mask = getattr(self, "0").weight_mask
        _0_weight_masked = torch.mul(_0_weight_mask, _0_weight);  _0_weight_mask = _0_weight = None
        _0 = torch._C._nn.linear(input_1, _0_weight_masked, _0_bias);  input_1 = _0_weight_masked = _0_bias = None
        _1 = getattr(self, "1")(_0);  _0 = None
        return _1
    >>> x = torch.randn(2, 3)
    >>> torch.equal(out(x), torch.relu(x @ (torch.eye(3) * model[0].weight).T + model[0].bias))
    True
"""

from . import masks, structured, viz
from ._deploy import to_model
from ._emit import EMITS, MaskedGraphModule
from ._errors import EmitError, FxsparseError, MaskError, TraceError
from ._fold import fold, unfold
from ._freeze import freeze, layouts
from ._kernels import LAYOUTS, LayoutChoice
from ._plan import MaskedParameter, Plan
from ._save import save
from ._tags import META_KEY, ROLES, Role, Tag, tag_of
from ._transform import plan, transform
from .masks._check import CheckReport, MaskCheck, check
from .masks._files import load_masks, save_masks
from .masks._update import update_masks
from .structured import Group, Groups, Member, groups, shrink

__version__ = "0.3.0"

__all__ = [
    "EMITS",
    "LAYOUTS",
    "META_KEY",
    "ROLES",
    "CheckReport",
    "EmitError",
    "FxsparseError",
    "Group",
    "Groups",
    "LayoutChoice",
    "MaskCheck",
    "MaskError",
    "MaskedGraphModule",
    "MaskedParameter",
    "Member",
    "Plan",
    "Role",
    "Tag",
    "TraceError",
    "check",
    "fold",
    "freeze",
    "groups",
    "layouts",
    "load_masks",
    "masks",
    "plan",
    "save",
    "save_masks",
    "shrink",
    "structured",
    "tag_of",
    "to_model",
    "transform",
    "unfold",
    "update_masks",
    "viz",
]
