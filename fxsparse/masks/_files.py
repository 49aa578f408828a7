"""Mask files: safetensors (a ``bool`` mask stays 1 byte an element), or ``.pt`` read as data only.

A mask file never runs code: safetensors holds tensors and nothing else, and a ``.pt``
file is read with ``torch.load(weights_only=True)``, which refuses pickled objects.
Writes go to fxsparse's own temporary file (never safetensors'), renamed into place, so an
interrupted save leaves the old file (or none), never a truncated one that loads as wrong
masks. Loads read the file into memory: the masks own their memory, so editing or truncating
the file afterwards changes nothing (a memory-mapped mask would change with it, or crash the
process with SIGBUS).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from .._errors import MaskError
from .._save import atomic_write

__all__ = ["load_masks", "save_masks"]

_FORMAT = {"format": "fxsparse-masks", "version": "1"}
_PACKED = "fxsparse.packed"  # metadata: JSON {name: shape} of the masks stored as bits
_BITS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def _refuse_compressed(path: Path) -> None:
    """``torch.save`` stores its zip entries uncompressed; a compressed one could unpack to any size."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if any(entry.compress_type != zipfile.ZIP_STORED for entry in archive.infolist()):
                raise MaskError(f"{path} has compressed entries, which torch.save never writes: refused")


def _pack(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as bits, 8 to a byte, most significant first (numpy.packbits' order)."""
    flat = mask.flatten()
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)])
    return (flat.view(-1, 8).to(torch.uint8) * _BITS).sum(dim=1, dtype=torch.uint8)


_UNPACK_CHUNK = 1 << 20  # packed bytes unpacked at a time, through one 8 MiB scratch tensor


def _unpack(packed: torch.Tensor, shape: list[int]) -> torch.Tensor:
    count = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.numel() != -(-count // 8):
        raise ValueError(f"a packed mask of shape {shape} needs {-(-count // 8)} bytes, found {packed.numel()}")
    # Straight into the result, a chunk at a time: unpacking at once made 16 bytes of
    # temporaries a packed byte (a 64 MiB file peaked at 17 times its size).
    unpacked = torch.empty(count, dtype=torch.bool)
    whole = count // 8  # bytes whose 8 bits all belong to the mask; the last may hold fewer
    rows = unpacked[: whole * 8].view(whole, 8)
    scratch = torch.empty(min(whole, _UNPACK_CHUNK), 8, dtype=torch.uint8)
    for start in range(0, whole, _UNPACK_CHUNK):
        stop = min(start + _UNPACK_CHUNK, whole)
        bits = torch.bitwise_and(packed[start:stop, None], _BITS, out=scratch[: stop - start])
        torch.ne(bits, 0, out=rows[start:stop])
    if whole < packed.numel():
        unpacked[whole * 8 :] = ((packed[whole] & _BITS) != 0)[: count - whole * 8]
    return unpacked.view(shape)


def save_masks(masks: Mapping[str, torch.Tensor], path: str | os.PathLike[str], *, packed: bool = False) -> Path:
    """Write ``masks`` (parameter name -> tensor) to a safetensors file, atomically.

    Tensors keep their dtype (``bool`` masks 1 byte an element) and are written from the
    CPU. ``packed=True`` stores each ``bool`` mask as bits, 8 to a byte (a 7B-parameter
    model's masks: 0.8 GB instead of 6.6 GB); :func:`load_masks` unpacks them. A ``.pt``
    suffix writes with ``torch.save`` instead (never packed).

    Example:
        >>> import tempfile, torch, fxsparse
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = fxsparse.save_masks({"fc.weight": torch.eye(2, dtype=torch.bool)}, f"{folder}/m.safetensors")
        ...     fxsparse.load_masks(path)["fc.weight"]
        tensor([[ True, False],
                [False,  True]])
    """
    path = Path(path)
    if not isinstance(masks, Mapping):
        raise MaskError(f"masks must be a mapping from parameter names to tensors, got {type(masks).__name__}")
    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()  # where each tensor kept so far lives: one lookup per mask, not a scan
    for name, mask in masks.items():
        if not isinstance(name, str) or not isinstance(mask, torch.Tensor):
            raise MaskError(f"masks must map names (str) to tensors; {name!r} maps to {type(mask).__name__}")
        tensor = mask.detach().to("cpu").contiguous()
        if tensor.untyped_storage().data_ptr() in storages:
            tensor = tensor.clone()  # safetensors refuses tensors sharing memory
        storages.add(tensor.untyped_storage().data_ptr())
        tensors[name] = tensor
    metadata = dict(_FORMAT)
    if packed:
        if path.suffix in (".pt", ".pth"):
            raise MaskError(f"packed masks are written to safetensors files, not {path.suffix}")
        shapes = {name: list(mask.shape) for name, mask in tensors.items() if mask.dtype == torch.bool}
        tensors.update({name: _pack(tensors[name]) for name in shapes})
        metadata[_PACKED] = json.dumps(shapes)
    if path.suffix in (".pt", ".pth"):
        return atomic_write(path, lambda temporary: torch.save(tensors, temporary), error=MaskError)
    from safetensors.torch import save

    # To bytes, then through atomic_write's temporary: safetensors' save_file writes its own
    # temporary, which a killed save left behind, loadable as masks with wrong values.
    data = save(tensors, metadata=metadata)
    return atomic_write(path, lambda temporary: Path(temporary).write_bytes(data), error=MaskError)


def load_masks(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a mask file written by :func:`save_masks` (or any safetensors file, or a ``.pt``
    file holding a dict of tensors). Never runs code from the file; a corrupt or
    truncated file raises ``MaskError`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise MaskError(f"no mask file at {path}")
    if path.suffix in (".pt", ".pth"):
        _refuse_compressed(path)
        try:
            masks = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise MaskError(
                f"cannot read {path} as a mask file: torch.load(weights_only=True) refused it, as it holds "
                "pickled objects other than tensors (a mask file never runs code; save masks as tensors)"
            ) from None
        except Exception as error:
            raise MaskError(
                f"cannot read {path} as a mask file: torch.load(weights_only=True) refused it ({type(error).__name__})"
            ) from None
    else:
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load

        try:
            with safe_open(path, "pt"):
                pass  # checks the header against the file's size before reading it all
            # Read, not memory-mapped: a mapped mask would change with the file, or crash on its truncation.
            data = path.read_bytes()
            loaded = load(data)  # each tensor owns a copy; the file's bytes are freed next
            masks = {name: loaded[name] for name in sorted(loaded)}  # in load_file's order: by name
            packed = json.loads(_header_metadata(data).get(_PACKED, "{}"))
            del data, loaded
            if not isinstance(packed, dict) or not all(
                isinstance(shape, list) and all(isinstance(size, int) and size >= 0 for size in shape)
                for shape in packed.values()
            ):
                raise ValueError(f"its {_PACKED} metadata must map names to shapes, got {packed!r}")
            for name, shape in packed.items():
                masks[name] = _unpack(masks[name], shape)
        except (SafetensorError, OSError, ValueError, KeyError, RuntimeError) as error:
            raise MaskError(f"cannot read {path} as a safetensors mask file (corrupt or truncated?): {error}") from None
    if not isinstance(masks, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in masks.items()
    ):
        raise MaskError(f"{path} must hold a dict of parameter name -> tensor, got {type(masks).__name__}")
    return masks


def _header_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's header (which ``load`` has checked), read
    from the same bytes as its tensors: a second open could find another version of the file."""
    length = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8 : 8 + length]).get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise ValueError(f"its __metadata__ must be a JSON object, got {metadata!r}")
    return metadata
