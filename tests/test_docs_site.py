"""The documentation site builds strictly, and its pictures match what fxsparse draws today."""

from __future__ import annotations

import html
import importlib.util
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

import fxsparse
import fxsparse.masks
import fxsparse.viz

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site, built once for the tests of this file."""
    folder = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(folder)],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return folder


def test_site_builds_strictly(site: Path) -> None:
    api = (site / "api" / "index.html").read_text()
    assert "Mask weights of" in api and "GraphDiff" in api  # the reference comes from the docstrings
    for picture in ("before", "after", "diff", "compact", "gpt2-diff"):
        assert (site / "images" / f"{picture}.svg").exists()


def _public_names() -> list[str]:
    return [
        f"{module.__name__}.{name}"
        for module in (fxsparse, fxsparse.masks, fxsparse.viz)
        for name in module.__all__  # type: ignore[attr-defined]
    ]


def _sections(api: str) -> dict[str, str]:
    """Each documented object's part of the page: from its heading to the next object's heading of its level."""
    found = {}
    headings = list(re.finditer(r'<h([2-6]) id="(fxsparse[^"]*)" class="doc doc-heading">', api))
    for number, heading in enumerate(headings):
        later = (h.start() for h in headings[number + 1 :] if h[1] <= heading[1])
        found[heading[2]] = api[heading.start() : next(later, len(api))]
    return found


def test_api_page_has_a_heading_and_signature_per_public_name(site: Path) -> None:
    sections = _sections((site / "api" / "index.html").read_text())
    missing = [name for name in _public_names() if name not in sections]
    assert not missing, f"docs/api.md lacks a '::: name' entry for {missing}"
    for name in _public_names():
        value = eval(name, {"fxsparse": fxsparse})  # a name of the package, imported above
        constructed = inspect.isclass(value) and "__init__" in vars(value)  # its own constructor, or a dataclass's
        if inspect.isfunction(value) or constructed:
            assert 'class="doc-signature' in sections[name], f"{name} shows no signature"


def test_api_page_shows_examples_as_code_and_no_rest_roles(site: Path) -> None:
    api = (site / "api" / "index.html").read_text()
    text = html.unescape(re.sub(r"<[^>]+>", "", api))
    assert not re.search(r":(class|func|data|meth|attr|mod|exc|obj):`", text), "a reST role printed as text"
    assert "<blockquote>" not in api  # ">>> " lines read as Markdown quotations
    sections = _sections(api)
    for name in _public_names():
        if ">>>" in (inspect.getdoc(eval(name, {"fxsparse": fxsparse})) or ""):
            assert re.search(r"<pre>.*?&gt;&gt;&gt; ", sections[name], re.DOTALL), f"{name}'s example is not code"
    assert "[`transform`][fxsparse.transform]" not in api  # roles became links, resolved
    assert 'href="#fxsparse.transform"' in api


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
