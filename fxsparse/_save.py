"""Saving without leaving a half-written file, and without destroying what is not a saved file.

The data goes to a temporary file beside the target, which is then renamed over it:
``os.replace`` is atomic on POSIX and Windows, so a reader sees the old file or the new one,
and a save interrupted by an error, a signal or a full disk leaves the old file as it was
(or none), never a truncated one that loads as valid but wrong.

A rename replaces whatever the target name holds, which ``open`` would not: so a save goes
only onto a missing path or a writable regular file, and refuses a FIFO, a device, a socket,
a read-only file, and missing folders it would have to make through a dangling symbolic link.
The temporary is named ``.<name>.fxsparse-tmp-XXXXXXXX``, which no glob for the target's
suffix (``*.safetensors``, ``*.pt``) matches; a save killed before it could remove its
temporary leaves it behind, and the next save to the same path removes it. A temporary in
use is locked (``flock``) by its writer, so a concurrent save never removes another's.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ._errors import EmitError, FxsparseError

try:
    import fcntl
except ImportError:  # Windows: a file held open cannot be removed, which protects a writer's temporary
    fcntl = None  # type: ignore[assignment]

__all__ = ["atomic_write", "save"]

_TEMPORARY = ".fxsparse-tmp-"
_RANDOM = re.compile(r"[a-z0-9_]{8}")  # what tempfile.mkstemp puts between prefix and suffix


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], Any], *, error: type[FxsparseError]) -> Path:
    """Call ``write(temporary_path)``, then rename the temporary file to ``path``.

    The file gets the permissions a plain ``open`` would give it (an existing file's own,
    or the umask's), a symbolic link is written through to its target, ``~`` is expanded,
    and missing parent folders are made. A target ``open`` would not write as a file (a
    FIFO, a device, a socket, a read-only file), and missing folders behind a dangling
    symbolic link, raise ``error`` (the caller's kind: ``EmitError``, ``MaskError``).
    """
    text = os.fspath(path)
    if not text or text.endswith((os.sep, "/")):
        raise ValueError(f"save needs a file path, got {text!r}")
    expanded = os.path.expanduser(text)
    _make_parent_folders(text, os.path.dirname(expanded) or os.curdir, error)
    path = Path(os.path.realpath(expanded))
    if not path.parent.is_dir():  # the target is a symbolic link to a file in a missing folder
        raise error(
            f"cannot save to {text!r}: it is a symbolic link to {str(path)!r}, whose folder does not exist; "
            "fxsparse does not make folders through a symbolic link (make the folder, or save to another path)"
        )
    _refuse_what_open_would_not_write(text, path, error)
    prefix = _temporary_prefix(path)
    _remove_stale_temporaries(path.parent, prefix)
    handle, temporary = _locked_temporary(path.parent, prefix)
    try:
        if fcntl is None:
            os.close(handle)  # Windows cannot rename a file held open
        write(temporary)
        existing = path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_umask()
        os.chmod(temporary, existing)
        os.replace(temporary, path)
    finally:
        if os.path.lexists(temporary):
            os.unlink(temporary)
        if fcntl is not None:
            os.close(handle)  # releases the lock
    return path


def _make_parent_folders(text: str, parent: str, error: type[FxsparseError]) -> None:
    """Make missing folders, refusing to make them through a dangling symbolic link (whose
    target would appear somewhere the path does not say)."""
    if os.path.isdir(parent):
        return
    prefix = ""
    for part in Path(parent).parts:
        prefix = os.path.join(prefix, part)
        if os.path.islink(prefix) and not os.path.exists(prefix):
            raise error(
                f"cannot save to {text!r}: its folder {prefix!r} is a symbolic link to {os.readlink(prefix)!r}, "
                "which does not exist; fxsparse does not make folders through a symbolic link "
                "(make the folder, or save to another path)"
            )
    os.makedirs(parent, exist_ok=True)


def _refuse_what_open_would_not_write(text: str, path: Path, error: type[FxsparseError]) -> None:
    try:
        status = path.stat()
    except FileNotFoundError:
        return
    if stat.S_ISDIR(status.st_mode):
        raise IsADirectoryError(f"save needs a file path, but {text!r} is a folder")
    if not stat.S_ISREG(status.st_mode):
        raise error(
            f"cannot save to {text!r}: {str(path)!r} is a {_kind_of(status.st_mode)}, not a regular file; saving "
            "renames a new file over the path, which would replace it (save to a regular file's path)"
        )
    # No write bit at all is read-only even for root, whom access() lets write anything.
    if status.st_mode & 0o222 == 0 or not os.access(path, os.W_OK):
        raise error(
            f"cannot save to {text!r}: {str(path)!r} is read-only (mode {stat.filemode(status.st_mode)}), "
            "and open() would refuse to write it; make it writable first (chmod u+w) or save to another path"
        )


def _kind_of(mode: int) -> str:
    for test, kind in (
        (stat.S_ISFIFO, "FIFO (named pipe)"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISSOCK, "socket"),
    ):
        if test(mode):
            return kind
    return "special file"


def _temporary_prefix(path: Path) -> str:
    """``.<name>.fxsparse-tmp-``: the random part mkstemp adds ends the name, so no glob for the suffix matches."""
    name = path.name
    if len(os.fsencode(name)) > 200:  # the prefix must leave room within the 255 bytes a name may take
        name = f"{name[:40]}-{hashlib.sha256(os.fsencode(name)).hexdigest()[:16]}"
    return f".{name}{_TEMPORARY}"


def _locked_temporary(folder: Path, prefix: str) -> tuple[int, str]:
    """A new temporary file, opened and locked so that no other save removes it as stale."""
    while True:
        handle, temporary = tempfile.mkstemp(prefix=prefix, dir=folder)
        if fcntl is None:
            return handle, temporary
        fcntl.flock(handle, fcntl.LOCK_EX)  # waits while another save removes it as stale, then...
        if os.fstat(handle).st_nlink > 0:
            return handle, temporary
        os.close(handle)  # ... it is gone: make another


def _remove_stale_temporaries(folder: Path, prefix: str) -> None:
    """Remove the temporaries earlier saves to this path left behind (killed before they could)."""
    with os.scandir(folder) as entries:
        stale = [
            entry.path
            for entry in entries
            if entry.name.startswith(prefix)
            and _RANDOM.fullmatch(entry.name[len(prefix) :])
            and entry.is_file(follow_symlinks=False)
        ]
    for temporary in stale:
        if fcntl is None:
            with contextlib.suppress(OSError):  # held open by a save in progress
                os.unlink(temporary)
            continue
        try:
            handle = os.open(temporary, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.unlink(temporary)
        except OSError:  # locked: a save in progress writes it; or removed meanwhile
            pass
        finally:
            os.close(handle)


def _umask() -> int:
    """The process's umask, read without setting it: ``os.umask`` can only set it, and setting it,
    even back at once, gives a file another thread makes meanwhile the wrong permissions."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    # No /proc (macOS, Windows): the permissions a new file gets, seen on one made for the purpose.
    handle, probe = tempfile.mkstemp(prefix=_TEMPORARY)
    os.close(handle)
    try:
        os.unlink(probe)
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        return 0o666 & ~os.stat(probe).st_mode & 0o777
    finally:
        if os.path.lexists(probe):
            os.unlink(probe)


def _export_save(program: torch.export.ExportedProgram, temporary: str) -> None:
    # Through a file object: given a name, torch.export.save warns unless it ends in ".pt2",
    # and the temporary's name must not end in the target's suffix.
    with open(temporary, "wb") as file:
        torch.export.save(program, file)


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
        return atomic_write(path, lambda temporary: torch.jit.save(obj, temporary), error=EmitError)
    if isinstance(obj, torch.export.ExportedProgram):
        return atomic_write(path, lambda temporary: _export_save(obj, temporary), error=EmitError)
    if type(obj).__name__ == "ONNXProgram":
        return atomic_write(path, lambda temporary: obj.save(temporary), error=EmitError)
    if isinstance(obj, nn.Module) and any(parametrize.is_parametrized(module) for module in obj.modules()):
        raise EmitError(
            "torch cannot pickle a parametrized model (emit='parametrize'), and FakeSparsity leaves its masks out of "
            "state_dict(): save the emit='graph' output, which keeps them"
        )
    if isinstance(obj, (nn.Module, dict)):
        return atomic_write(path, lambda temporary: torch.save(obj, temporary), error=EmitError)
    raise TypeError(
        f"save takes a module, a state_dict, TorchScript, an exported or ONNX program; got {type(obj).__name__}"
    )
