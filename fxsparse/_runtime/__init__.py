"""What rewritten graphs call at run time, one job a module.

- :mod:`.swap`: ``call_with_parameters``, a kept module called with masked parameters swapped in;
- :mod:`.sparse_ops`: ``csr_linear``/``bsr_linear`` and the ``fxsparse::sparse_linear`` operator
  behind them, for frozen weights in a sparse layout;
- :mod:`.folded`: ``masked_gradient``, a folded weight read as it is, its gradient masked;
- :mod:`.guards`: ``InputGuards`` and ``check_input_structure``, the input checks of graphs
  captured by ``torch.export``.

Saved models refer to these by their module path: the names stay importable from here too
(``fxsparse._runtime.InputGuards``), as files from earlier releases name them.
"""

from .folded import masked_gradient
from .guards import InputGuards, check_input_structure
from .sparse_ops import bsr_linear, csr_linear
from .swap import call_with_parameters

__all__ = [
    "InputGuards",
    "bsr_linear",
    "call_with_parameters",
    "check_input_structure",
    "csr_linear",
    "masked_gradient",
]

# Generated code names a graph's functions by their module (``fxsparse__runtime_csr_linear``) and
# pickles find them by it: the path they have always had, whichever file defines them now.
for _public in (InputGuards, bsr_linear, call_with_parameters, check_input_structure, csr_linear, masked_gradient):
    _public.__module__ = __name__
