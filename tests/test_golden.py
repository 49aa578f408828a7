"""The generated code of every zoo model's masked graph, against files in tests/golden/.

Regenerate after an intended change with ``FXSPARSE_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py``
and review the diff.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import fxsparse

from zoo import ZOO, build, make_masks

GOLDEN = Path(__file__).parent / "golden"


@pytest.mark.parametrize("name", list(ZOO))
def test_generated_code(name: str) -> None:
    case = ZOO[name]
    model = build(case)
    code = fxsparse.transform(model, make_masks(model, case, "random")).code.strip() + "\n"
    path = GOLDEN / f"{name}.py.txt"
    if os.environ.get("FXSPARSE_UPDATE_GOLDEN"):
        path.write_text(code)
    assert path.exists(), f"no golden file {path.name}: run with FXSPARSE_UPDATE_GOLDEN=1"
    assert code == path.read_text()
