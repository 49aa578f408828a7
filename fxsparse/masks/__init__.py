"""Make masks, and bring them in from (or back to) ``torch.ao.pruning`` and ``torch.nn.utils.prune``.

Every function returns ``{parameter name: bool mask}`` for :func:`fxsparse.transform`, and
none changes the model it reads:

- :func:`magnitude`: unstructured, per layer or global;
- :func:`channels`: structured, whole channels and heads of the dependency groups
  :func:`fxsparse.groups` finds (for :func:`fxsparse.shrink`);
- :func:`n_m`: N of every M along the input dimension (2:4 by default);
- :func:`block` and :func:`weight_norm`: whole blocks, and ``WeightNormSparsifier``'s rule,
  equal to its masks for the same configuration;
- :func:`wanda` and :func:`sparsegpt`: calibrated on model inputs, the masks (and, for
  SparseGPT, the weights) that keep a language model's accuracy;
- :func:`select`: which weights (globs over module names, or a ``filter_fn``);
- :func:`from_sparsifier`, :func:`from_parametrized`, :func:`from_prune` and
  :func:`to_sparsifier`: to and from torch's pruning tools;
- :func:`of`: the masks an fxsparse output applies;
- :func:`save_pretrained` and :func:`from_pretrained`: masks beside a Hugging Face checkpoint;
  :func:`from_zeros` and :func:`from_compressed_tensors`: the masks of checkpoints other tools
  pruned (dense weights with zeros; compressed-tensors' ``sparse-bitmask`` formats).

Example:
    >>> import torch, fxsparse
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    >>> masks = fxsparse.masks.n_m(model)  # 2:4 on every Linear
    >>> sorted(masks), masks["0.weight"].sum().item()
    (['0.weight', '2.weight'], 32)
    >>> out = fxsparse.transform(model, masks)
"""

from ..structured._score import channels
from ._calibrated import SparseGPTResult, sparsegpt, wanda
from ._checkpoints import from_compressed_tensors, from_pretrained, save_pretrained
from ._importers import from_parametrized, from_prune, from_sparsifier, of, to_sparsifier
from ._makers import block, from_zeros, magnitude, n_m, select, weight_norm

__all__ = [
    "SparseGPTResult",
    "block",
    "channels",
    "from_compressed_tensors",
    "from_parametrized",
    "from_pretrained",
    "from_prune",
    "from_sparsifier",
    "from_zeros",
    "magnitude",
    "n_m",
    "of",
    "save_pretrained",
    "select",
    "sparsegpt",
    "to_sparsifier",
    "wanda",
    "weight_norm",
]
