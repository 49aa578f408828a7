"""tools/bench_structured.py: its tables come from the committed results, and its group comparison
names what only one tool found. The timed runs themselves are not repeated here."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).parent.parent


def tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_structured", ROOT / "tools" / "bench_structured.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_docs_tables_are_the_committed_results() -> None:
    results = json.loads((ROOT / "tools" / "results" / "structured-cpu.json").read_text())
    tables = tool().markdown(results)
    page = (ROOT / "docs" / "structured-pruning.md").read_text()
    for line in tables.splitlines():
        if line.startswith("| ") and "---" not in line:
            assert line in page, line
    assert len(results["speed"]) == 12 and {row["batch"] for row in results["speed"]} == {1, 64}


def test_compare_groups_lists_what_only_one_tool_found() -> None:
    fx = {"m": {"seconds": 2.0, "groups": [
        {"members": ["a.weight[0]", "b.weight[1]"], "prunable": True, "blocked": None},
        {"members": ["b.weight[0]"], "prunable": False, "blocked": "a model output"},
    ]}}  # fmt: skip
    tp = {"m": {"seconds": 0.5, "groups": [["a.weight[0]", "b.weight[1]"], ["b.weight[0]"]]}}
    compared = tool().compare_groups(fx, tp)["m"]
    assert compared["only_fxsparse"] == []
    assert compared["only_torch_pruning"] == [{"members": ["b.weight[0]"], "fxsparse_says": "a model output"}]
    assert compared["ratio"] == 0.25
