import os
import sys

# ``python -m fxsparse`` puts the current folder first on sys.path, ahead of the installed
# packages: a ``safetensors.py`` left in a download folder would stand in for the real one when
# a command imports it. Drop it; factories (package.module:function) find it, searched last.
# (The modules imported before this line come from it too: ``python -P -m fxsparse`` avoids that.)
if sys.path and sys.path[0] in ("", os.getcwd()) and not getattr(sys.flags, "safe_path", False):
    del sys.path[0]

from ._cli import main

raise SystemExit(main())
