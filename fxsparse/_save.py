"""Saving without leaving a half-written file: write beside the target, then rename over it.

``os.replace`` is atomic on POSIX and Windows: a reader sees the old file or the new one,
and a save interrupted by an error, a signal or a full disk leaves the old file as it was
(or none), never a truncated one that loads as valid but wrong.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ._errors import EmitError

__all__ = ["atomic_write", "save"]


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], Any]) -> Path:
    """Call ``write(temporary_path)``, then rename the temporary file to ``path``.

    The file gets the permissions a plain ``open`` would give it (an existing file's own,
    or the umask's), a symbolic link is written through to its target, ``~`` is expanded,
    and missing parent folders are made.
    """
    text = os.fspath(path)
    if not text or text.endswith((os.sep, "/")):
        raise ValueError(f"save needs a file path, got {text!r}")
    path = Path(os.path.realpath(os.path.expanduser(text)))
    if path.is_dir():
        raise IsADirectoryError(f"save needs a file path, but {text!r} is a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    # The same suffix: some writers check it (torch.export.save warns unless it is ".pt2").
    handle, temporary = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(handle)
    try:
        write(temporary)
        os.chmod(temporary, path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_umask())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """Save any output of ``fxsparse.transform`` (or a ``state_dict``) to ``path``, atomically.

    TorchScript goes through ``torch.jit.save``, an exported program through
    ``torch.export.save``, an ONNX program through its ``save``, and a module (fxsparse's
    ``GraphModule``, a parametrized model) or a ``state_dict`` through ``torch.save``.

    Example:
        >>> import tempfile, torch, fxsparse
        >>> out = fxsparse.transform(torch.nn.Linear(2, 2), {"weight": torch.eye(2)})
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = fxsparse.save(out.state_dict(), f"{folder}/model.pt")
        ...     sorted(torch.load(path))
        ['bias', 'weight', 'weight_mask']
    """
    if isinstance(obj, torch.jit.ScriptModule):
        return atomic_write(path, lambda temporary: torch.jit.save(obj, temporary))
    if isinstance(obj, torch.export.ExportedProgram):
        return atomic_write(path, lambda temporary: torch.export.save(obj, temporary))
    if type(obj).__name__ == "ONNXProgram":
        return atomic_write(path, lambda temporary: obj.save(temporary))
    if isinstance(obj, nn.Module) and any(parametrize.is_parametrized(module) for module in obj.modules()):
        raise EmitError(
            "torch cannot pickle a parametrized model (emit='parametrize'), and FakeSparsity leaves its masks out of "
            "state_dict(): save the emit='graph' output, which keeps them"
        )
    if isinstance(obj, (nn.Module, dict)):
        return atomic_write(path, lambda temporary: torch.save(obj, temporary))
    raise TypeError(
        f"save takes a module, a state_dict, TorchScript, an exported or ONNX program; got {type(obj).__name__}"
    )
