"""The documentation site builds strictly, and its pictures match what fxsparse draws today."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_site_builds_strictly(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "Mask weights of" in api and "GraphDiff" in api  # the reference comes from the docstrings
    for picture in ("before", "after", "diff", "compact", "gpt2-diff"):
        assert (tmp_path / "site" / "images" / f"{picture}.svg").exists()


def test_pictures_are_up_to_date() -> None:
    """tools/make_pictures.py draws each picture again; its DOT source must equal the committed one."""
    spec = importlib.util.spec_from_file_location("make_pictures", ROOT / "tools" / "make_pictures.py")
    assert spec is not None and spec.loader is not None
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    stale = []
    for name, make in tool.pictures().items():
        committed = ROOT / "docs" / "images" / f"{name}.dot"
        if not committed.exists() or committed.read_text() != make().source:
            stale.append(name)
        assert (ROOT / "docs" / "images" / f"{name}.svg").exists(), name
    for name, svg in tool.mask_pictures().items():
        committed = ROOT / "docs" / "images" / f"{name}.svg"
        if not committed.exists() or committed.read_text() != svg:
            stale.append(name)
    assert stale == [], f"stale pictures {stale}: run python tools/make_pictures.py"
