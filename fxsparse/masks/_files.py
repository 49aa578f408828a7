"""Mask files: safetensors (a ``bool`` mask stays 1 byte an element), or ``.pt`` read as data only.

A mask file never runs code: safetensors holds tensors and nothing else, and a ``.pt``
file is read with ``torch.load(weights_only=True)``, which refuses pickled objects.
Writes go to fxsparse's own temporary file (never safetensors'), renamed into place, so an
interrupted save leaves the old file (or none), never a truncated one that loads as wrong
masks. Loads read the file into memory: the masks own their memory, so editing or truncating
the file afterwards changes nothing (a memory-mapped mask would change with it, or crash the
process with SIGBUS). Both directions stream one tensor at a time between the file and the
tensors' own memory: a 7B model's masks (6.6 GB) never exist twice in memory.
"""

from __future__ import annotations

import ctypes
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
# safetensors' dtype names (its format: an 8-byte little-endian header length, a JSON header of
# dtype, shape and [start, end) byte offsets per tensor, then the tensors' bytes back to back).
_SAFETENSORS_DTYPES = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.uint16: "U16",
    torch.int16: "I16",
    torch.uint32: "U32",
    torch.int32: "I32",
    torch.uint64: "U64",
    torch.int64: "I64",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.complex64: "C64",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
_TORCH_DTYPES = {name: dtype for dtype, name in _SAFETENSORS_DTYPES.items()}
_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header's length


def _memory_of(tensor: torch.Tensor) -> ctypes.Array[ctypes.c_ubyte]:
    """A contiguous CPU tensor's bytes, in place (the buffer ``write``/``readinto`` take)."""
    return (ctypes.c_ubyte * (tensor.numel() * tensor.element_size())).from_address(tensor.data_ptr())


def _write_safetensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], path: str) -> None:
    """The safetensors file of ``tensors``, written a tensor at a time from its own memory."""
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the tensors start 8-byte aligned, as safetensors writes them
    with open(path, "wb") as file:
        file.write(len(text).to_bytes(8, "little"))
        file.write(text)
        for tensor in tensors.values():
            if tensor.numel():
                file.write(_memory_of(tensor))


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors (by name) and metadata of a safetensors file, each read into its own memory.

    Read from one open file, whose header is checked against that file's size before any
    tensor is made, so no header can ask for more memory than the file holds.
    """
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        length = int.from_bytes(file.read(8), "little")
        if size < 8 or not 0 < length <= min(size - 8, _MAX_HEADER):
            raise ValueError(f"its header length ({length}) does not fit the file's {size} bytes")
        header = json.loads(file.read(length))
        if not isinstance(header, dict):
            raise ValueError(f"its header must be a JSON object, got {type(header).__name__}")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise ValueError(f"its __metadata__ must map names to strings, got {metadata!r}")
        entries = []
        for name, entry in header.items():
            if not isinstance(entry, dict):
                raise ValueError(f"tensor {name!r} has a malformed entry {entry!r}")
            dtype = _TORCH_DTYPES.get(str(entry.get("dtype")))
            shape, offsets = entry.get("shape"), entry.get("data_offsets")
            if (
                dtype is None
                or not isinstance(shape, list)
                or not all(isinstance(n, int) and n >= 0 for n in shape)
                or not isinstance(offsets, list)
                or len(offsets) != 2
                or not all(isinstance(n, int) for n in offsets)
            ):
                raise ValueError(f"tensor {name!r} has a malformed entry {entry!r}")
            entries.append((offsets[0], offsets[1], name, dtype, shape))
        position = 0
        for start, end, name, dtype, shape in sorted(entries, key=lambda entry: entry[:2]):
            itemsize = torch.empty((), dtype=dtype).element_size()
            if start != position or end - start != math.prod(shape) * itemsize or end > size - 8 - length:
                raise ValueError(f"tensor {name!r} of shape {shape} does not fit its bytes [{start}, {end})")
            position = end
        if position != size - 8 - length:
            raise ValueError(f"its tensors take {position} bytes, the file holds {size - 8 - length} after the header")
        tensors: dict[str, torch.Tensor] = {}
        for _start, end, name, dtype, shape in sorted(entries, key=lambda entry: entry[:2]):
            tensor = torch.empty(shape, dtype=dtype)
            if tensor.numel() and file.readinto(_memory_of(tensor)) != end - _start:
                raise ValueError(f"the file ended inside tensor {name!r}")
            tensors[name] = tensor
    return tensors, metadata


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
        # Written from its memory: a lazy conjugate or negative view is made real first.
        tensor = mask.detach().to("cpu").resolve_conj().resolve_neg().contiguous()
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
    if any(tensor.dtype not in _SAFETENSORS_DTYPES for tensor in tensors.values()):
        dtypes = sorted({str(t.dtype) for t in tensors.values() if t.dtype not in _SAFETENSORS_DTYPES})
        raise MaskError(f"safetensors mask files hold {', '.join(map(str, _SAFETENSORS_DTYPES))}; got {dtypes}")
    # Through atomic_write's temporary, not safetensors' save_file, whose own temporary a killed
    # save left behind, loadable as masks with wrong values.
    return atomic_write(path, lambda temporary: _write_safetensors(tensors, metadata, temporary), error=MaskError)


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

        try:
            with safe_open(path, "pt"):
                pass  # safetensors' own checks of the header, before fxsparse's own read
            # Read, not memory-mapped: a mapped mask would change with the file, or crash on its truncation.
            loaded, metadata = _read_safetensors(path)
            masks = {name: loaded[name] for name in sorted(loaded)}  # in load_file's order: by name
            packed = json.loads(metadata.get(_PACKED, "{}"))
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
