"""The viewer's page: its data (from :mod:`._view_data`) as JSON, its script and style, all inline.

The page loads nothing: ELK (the Eclipse Layout Kernel, compiled to JavaScript by elkjs, EPL-2.0,
vendored in ``_viewer/``) and fxsparse's own script are written into it, each allowed by the
page's Content-Security-Policy through its SHA-256 hash, and nothing else may run: no other
inline script, no ``eval``, no event-handler attribute, no ``javascript:`` link, no remote load.
The data is a ``<script type="application/json">`` block, which the browser never runs; every
``<``, ``>`` and ``&`` in it is written as a JSON escape, so no name can end the block.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

__all__ = ["ViewerParts", "page", "policy", "viewer_parts"]

_ASSETS = resources.files("fxsparse.viz") / "_viewer"


@dataclass(frozen=True)
class ViewerParts:
    """What a page needs to hold the viewer: ``style`` for its ``<style>``, ``body`` (the viewer,
    its data and its scripts) for its ``<body>``, and ``scripts`` (the inline scripts' text, whose
    hashes the page's policy must allow)."""

    style: str
    body: str
    scripts: tuple[str, ...]

    @property
    def script_sources(self) -> str:
        """The policy's ``script-src`` sources: each inline script's hash, nothing else."""
        return " ".join(
            f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'" for s in self.scripts
        )


def policy(parts: ViewerParts) -> str:
    """The Content-Security-Policy of a page holding the viewer and nothing else that runs."""
    return (
        f"default-src 'none'; script-src {parts.script_sources}; style-src 'unsafe-inline'; "
        "base-uri 'none'; form-action 'none'"
    )


def json_for_html(data: Any) -> str:
    """``data`` as JSON that can sit inside ``<script type="application/json">``: no ``<``, ``>``
    or ``&`` (a name holding ``</script>`` cannot end the block), no raw U+2028/U+2029."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for character, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"),
                              ("\u2029", "\\u2029")):  # fmt: skip
        text = text.replace(character, escape)
    return text


def _script(name: str) -> str:
    text = (_ASSETS / name).read_text(encoding="utf-8")
    # An inline script ends at the first "</script"; neither asset holds one (checked, not assumed).
    if "</script" in text.lower() or "<!--" in text:
        raise RuntimeError(f"{name} holds '</script' or '<!--' and cannot be inlined")
    return text


def viewer_parts(data: dict[str, Any]) -> ViewerParts:
    """The viewer for ``data`` (:func:`~fxsparse.viz._view_data.view_data`'s result)."""
    scripts = (_script("elk.bundled.js"), _script("viewer.js"))
    diff = "" if data.get("diff") else " disabled"
    body = (
        "<div class='fxv' id='fxv'>"
        "<div class='fxv-bar'><span class='fxv-title'></span>"
        "<input type='search' placeholder='find a node, parameter or module' aria-label='find a node, parameter or "
        "module'><span class='fxv-found' aria-live='polite'></span>"
        "<button type='button' class='fxv-fit'>fit</button><button type='button' class='fxv-zoomin' "
        "aria-label='zoom in'>+</button>"
        "<button type='button' class='fxv-zoomout' aria-label='zoom out'>&#8722;</button>"
        "<button type='button' class='fxv-collapse'>first screen</button>"
        "<label><input type='checkbox' class='fxv-plumbing'> plumbing</label>"
        f"<label><input type='checkbox' class='fxv-diff'{diff}> diff</label></div>"
        "<div class='fxv-canvas'><svg role='img' aria-label='graph'><defs><marker id='fxv-arrow' viewBox='0 0 10 10' "
        "refX='10' refY='5' markerWidth='7' markerHeight='7' orient='auto-start-reverse'>"
        "<path class='fxv-arrow' d='M 0 0 L 10 5 L 0 10 z'/></marker></defs><g class='fxv-scene'></g></svg></div>"
        "<aside class='fxv-side'><div class='fxv-detail'><p>Click a box to open it, a node to see it here. Drag to "
        "move; wheel or pinch to zoom.</p></div><h3>Colours</h3><div class='fxv-legend'></div>"
        "<div class='fxv-changelist'><h3>Changes (<span class='fxv-changecount'></span>)</h3>"
        "<ol class='fxv-changes'></ol></div></aside></div>"
        f"<script type='application/json' id='fxv-data'>{json_for_html(data)}</script>"
        + "".join(f"<script>{script}</script>" for script in scripts)
    )
    return ViewerParts(style=(_ASSETS / "viewer.css").read_text(encoding="utf-8"), body=body, scripts=scripts)


def page(data: dict[str, Any]) -> str:
    """A whole page holding the viewer, filling the window."""
    parts = viewer_parts(data)
    return (
        "<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<meta http-equiv='Content-Security-Policy' content=\"{policy(parts)}\">"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{html.escape(str(data.get('title', 'graph')))}</title>"
        f"<style>html, body {{ height: 100%; margin: 0; }}\n{parts.style}</style></head>\n"
        f"<body>{parts.body}</body></html>\n"
    )
