"""Every model of the zoo (tests/model_zoo.py) against FakeSparsity: a table of matches.

Usage::

    python tools/zoo_check.py [--only nanogpt,llama]

For each model and mode (eval; train with dropout 0; "switch": captured in eval, run in
train, where the model branches on ``self.training``), prints whether the outputs and the
gradients of every parameter equal the FakeSparsity model's bit for bit, else the largest
difference, or the error. Exits 1 when a model differs where it is not known to
(tests/model_zoo.py names the issue item behind each known difference).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from model_zoo import ZOO, compare  # type: ignore[import-not-found]


def _cell(equal: bool, difference: float) -> str:
    return "match" if equal else f"differs {difference:.3g}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated model names (default: all)")
    args = parser.parse_args()
    names = [name for name in args.only.split(",") if name] or list(ZOO)
    unknown = sorted(set(names) - set(ZOO))
    if unknown:
        parser.error(f"--only names no zoo model: {', '.join(unknown)}; the zoo has {', '.join(ZOO)}")
    unexpected = 0
    print(f"{'model':<28} {'mode':<7} {'outputs':<18} {'gradients':<18} seconds  known")
    for name in names:
        entry = ZOO[name]
        for mode in ("eval", "train", *(("switch",) if entry.switch else ())):
            known = (entry.known or {}).get(mode, "")
            start = time.perf_counter()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    result = compare(entry, mode)
                outputs = _cell(result.outputs_equal, result.outputs)
                gradients = _cell(result.gradients_equal, result.gradients)
                inlined = entry.inlined is not None and any(w.endswith(entry.inlined) for w in result.warned)
                matched = result.outputs_equal and (result.gradients_equal or inlined)
                if inlined:
                    known = f"warned: {entry.inlined} is inlined by torch.export (its backward is not used)"
            except Exception as exc:  # a table row per failure, whatever it is
                outputs, gradients, matched = f"error: {type(exc).__name__}", "-", False
                known = known or str(exc).splitlines()[0][:100]
            unexpected += not matched and not (entry.known or {}).get(mode)
            seconds = time.perf_counter() - start
            print(f"{name:<28} {mode:<7} {outputs:<18} {gradients:<18} {seconds:7.1f}  {known}", flush=True)
    return 1 if unexpected else 0


if __name__ == "__main__":
    raise SystemExit(main())
