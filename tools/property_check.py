"""Run the property tests' check on many random models and masks (CI runs 200).

Usage::

    python tools/property_check.py [--examples 5000] [--seed 0]

Draws models and masks with the same hypothesis strategies as tests/test_properties.py and
checks each against FakeSparsity (output bitwise, state_dict round trip, input unchanged).
Prints the count, and hypothesis's shrunk counterexample on a failure.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from property_models import check_properties, masks_for, models  # type: ignore[import-not-found]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    count = 0

    @seed(args.seed)
    @settings(max_examples=args.examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.data())
    def run(data: st.DataObject) -> None:
        nonlocal count
        model, width = data.draw(models())
        check_properties(model, width, data.draw(masks_for(model)))
        count += 1

    start = time.perf_counter()
    run()
    print(f"{count} examples passed in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
