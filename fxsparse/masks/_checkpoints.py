"""Masks beside a Hugging Face checkpoint, and the sparse formats compressed-tensors used to write.

:func:`save_pretrained` writes a model directory's masks next to its ``model.safetensors``:
``masks.safetensors`` (through :func:`fxsparse.save_masks`: atomic, bits packed by default)
and ``masks_config.json`` (format, version, and each parameter's name and shape), and
:func:`from_pretrained` reads them back by parameter name. Neither runs code from the files.

:func:`from_compressed_tensors` reads the legacy ``sparse-bitmask`` and ``sparse-24-bitmask``
checkpoints (compressed-tensors removed its sparse compressors; vLLM no longer loads them)
without compressed-tensors: their masks, and with ``weights=True`` the dense weights.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, overload

import torch
import torch.export
from torch import nn

from .._errors import MaskError
from .._save import atomic_write
from ._files import load_masks, save_masks
from ._importers import of

__all__ = ["MASKS_CONFIG", "MASKS_FILE", "from_compressed_tensors", "from_pretrained", "save_pretrained"]

MASKS_FILE = "masks.safetensors"
MASKS_CONFIG = "masks_config.json"
_FORMAT, _VERSION = "fxsparse-masks", 1
# The JSON files read here are a model's config and index: megabytes at most. A bigger one is refused
# before it is read, so a crafted directory cannot make a load hold gigabytes of JSON.
_MAX_JSON_BYTES = 64 << 20


def save_pretrained(
    masks: Mapping[str, torch.Tensor] | nn.Module | torch.export.ExportedProgram,
    directory: str | os.PathLike[str],
    *,
    packed: bool = True,
) -> Path:
    """Write ``masks`` into the model directory ``directory``, beside its ``model.safetensors``.

    ``masks`` is ``{parameter name: mask}`` or fxsparse's output (whose masks
    :func:`fxsparse.masks.of` reads). Writes ``masks.safetensors`` (``packed=True``: ``bool``
    masks as bits, 8 to a byte; a 0/1 mask of another dtype is stored as ``bool``, which
    masks a weight the same) and then ``masks_config.json``, each atomically, and makes the
    directory if it is missing. Returns the directory.

    Example:
        >>> import tempfile, torch, fxsparse
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 4))
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     _ = fxsparse.masks.save_pretrained(fxsparse.masks.n_m(model), folder)
        ...     fxsparse.masks.from_pretrained(folder)["0.weight"].sum().item()
        16
    """
    if isinstance(masks, (nn.Module, torch.export.ExportedProgram)):
        found = of(masks)
        if not found:
            raise MaskError(
                f"save_pretrained was given a {type(masks).__name__} that applies no masks: give fxsparse's output "
                "or {parameter name: mask}"
            )
        masks = found
    if not isinstance(masks, Mapping):
        raise MaskError(f"masks must be a mapping from parameter names to tensors, got {type(masks).__name__}")
    stored = {name: _as_bool_if_binary(mask) for name, mask in masks.items()}
    directory = Path(directory)
    save_masks(stored, directory / MASKS_FILE, packed=packed)
    config = {
        "format": _FORMAT,
        "version": _VERSION,
        "parameters": {name: list(mask.shape) for name, mask in stored.items()},
    }
    text = json.dumps(config, indent=2) + "\n"
    atomic_write(directory / MASKS_CONFIG, lambda temporary: Path(temporary).write_text(text), error=MaskError)
    return directory


def _as_bool_if_binary(mask: Any) -> Any:
    """A 0/1 mask as ``bool`` (``mask * weight`` is the same, and it packs to bits); anything else as given."""
    if not isinstance(mask, torch.Tensor) or mask.dtype == torch.bool or mask.is_complex() or mask.is_meta:
        return mask
    try:
        binary = bool(((mask == 0) | (mask == 1)).all())
    except RuntimeError:  # a dtype torch cannot compare (float8 on some devices): kept as it is
        return mask
    return mask != 0 if binary else mask


def from_pretrained(directory: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The masks :func:`save_pretrained` wrote into ``directory``, by parameter name.

    Reads ``masks_config.json`` and ``masks.safetensors`` (as :func:`fxsparse.load_masks`
    does: data only, read into memory), and checks that the two agree: every parameter the
    config lists, with its shape, and no other. A directory without them raises a
    ``MaskError`` that says where else masks may be (:func:`from_zeros`,
    :func:`from_compressed_tensors`).
    """
    directory = Path(directory)
    config_path = directory / MASKS_CONFIG
    if not config_path.is_file():
        raise MaskError(
            f"no fxsparse masks in {directory}: {MASKS_CONFIG} is missing (fxsparse.masks.save_pretrained writes it). "
            "A checkpoint of dense weights with zeros: fxsparse.masks.from_zeros(model); one saved by "
            "compressed-tensors as sparse-bitmask or sparse-24-bitmask: fxsparse.masks.from_compressed_tensors"
        )
    config = _read_json(config_path)
    if config.get("format") != _FORMAT:
        raise MaskError(f"{config_path} is not an fxsparse masks config: its format is {config.get('format')!r}")
    version = config.get("version")
    if version != _VERSION:
        raise MaskError(f"{config_path} has version {version!r}; this fxsparse reads version {_VERSION} (upgrade it)")
    parameters = config.get("parameters")
    if not isinstance(parameters, dict) or not all(
        isinstance(shape, list) and all(isinstance(size, int) for size in shape) for shape in parameters.values()
    ):
        raise MaskError(f"{config_path}: 'parameters' must map parameter names to shapes, got {parameters!r}")
    masks = load_masks(directory / MASKS_FILE)  # the file's name is fixed: a config cannot point elsewhere
    if sorted(masks) != sorted(parameters):
        missing, extra = sorted(set(parameters) - set(masks)), sorted(set(masks) - set(parameters))
        raise MaskError(
            f"{directory / MASKS_FILE} does not hold the masks {MASKS_CONFIG} lists (was one replaced without the "
            f"other?): missing {missing}, not listed {extra}"
        )
    for name, shape in parameters.items():
        if list(masks[name].shape) != shape:
            raise MaskError(
                f"mask for {name!r} in {directory / MASKS_FILE} has shape {tuple(masks[name].shape)}, but "
                f"{MASKS_CONFIG} says {tuple(shape)} (was one replaced without the other?)"
            )
    return {name: masks[name] for name in parameters}


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise MaskError(f"{path} is missing")
    if path.stat().st_size > _MAX_JSON_BYTES:
        raise MaskError(f"{path} takes {path.stat().st_size:,} bytes; a config is at most {_MAX_JSON_BYTES:,}")
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise MaskError(f"cannot read {path} as JSON: {error}") from None
    if not isinstance(loaded, dict):
        raise MaskError(f"{path} must hold a JSON object, got {type(loaded).__name__}")
    return loaded


# compressed-tensors' names, for each weight "<module>.weight" stored as "<module>.<part>".
_PARTS = {
    "sparse-bitmask": ("shape", "compressed", "bitmask", "row_offsets"),
    "sparse-24-bitmask": ("shape", "compressed", "bitmask"),
}
_INTEGER_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@overload
def from_compressed_tensors(
    directory: str | os.PathLike[str], *, weights: Literal[False] = False
) -> dict[str, torch.Tensor]: ...


@overload
def from_compressed_tensors(
    directory: str | os.PathLike[str], *, weights: Literal[True]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]: ...


def from_compressed_tensors(
    directory: str | os.PathLike[str], *, weights: bool = False
) -> dict[str, torch.Tensor] | tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The masks of a model directory compressed-tensors saved as ``sparse-bitmask`` or
    ``sparse-24-bitmask``, by parameter name; with ``weights=True``, ``(masks, state_dict)``.

    Needs no compressed-tensors. The format comes from ``config.json``'s ``sparsity_config``
    (inside ``quantization_config``, or the older ``compression_config``); the tensors from
    ``model.safetensors`` or the shards ``model.safetensors.index.json`` lists. Each
    compressed weight ``<module>.weight`` is stored as ``<module>.shape``, its kept values
    in row-major order (``<module>.compressed``) and its mask as bits packed along the input
    dimension, first element in the lowest bit (``<module>.bitmask``): the mask is that
    bitmask, exactly (a ``sparse-24-bitmask`` mask keeps 2 of every 4 even where a kept
    value is zero). ``state_dict`` is every tensor of the checkpoint with each compressed
    weight made dense (zero where pruned, values bit for bit), for ``model.load_state_dict``;
    a quantized checkpoint (``config_groups``) is refused there, as its values need their
    scales. Tensors are read, not kept memory-mapped; nothing in the files runs.
    """
    directory = Path(directory)
    config = _read_json(directory / "config.json")
    sparsity = _sparsity_config(config)
    kind = sparsity.get("format")
    if not isinstance(kind, str) or kind not in _PARTS:
        hint = " (dense weights with zeros: fxsparse.masks.from_zeros(model))" if kind == "dense" else ""
        raise MaskError(
            f"{directory / 'config.json'}: from_compressed_tensors reads the sparsity formats "
            f"{', '.join(map(repr, _PARTS))}; its sparsity_config has format {kind!r}{hint}"
        )
    compression = config.get("quantization_config") or config.get("compression_config") or {}
    if weights and isinstance(compression, dict) and compression.get("config_groups"):
        raise MaskError(
            f"{directory}: its weights are quantized (quantization_config.config_groups), and their dense values "
            "need their scales, which fxsparse does not apply: read the masks only (weights=False)"
        )
    from safetensors import SafetensorError, safe_open

    masks: dict[str, torch.Tensor] = {}
    state: dict[str, torch.Tensor] = {}
    try:
        with contextlib.ExitStack() as stack:
            # Every shard open at once: a sharded save splits a weight's parts wherever a shard fills up.
            read = _TensorReader(
                {path: stack.enter_context(safe_open(path, "pt")) for path in _checkpoint_files(directory)}
            )
            modules = sorted(name.removesuffix(".bitmask") for name in read.where if name.endswith(".bitmask"))
            parts = {f"{module}.{part}" for module in modules for part in _PARTS[kind]}
            for module in modules:
                missing = [f"{module}.{part}" for part in _PARTS[kind] if f"{module}.{part}" not in read.where]
                if missing:
                    raise MaskError(f"{directory}: {kind} weight '{module}.weight' lacks {', '.join(missing)}")
                mask, dense = _decompress(read, module, kind, weights)
                masks[f"{module}.weight"] = mask
                if dense is not None:
                    state[f"{module}.weight"] = dense
            if weights:
                state.update({name: read.tensor(name) for name in sorted(set(read.where) - parts)})
    except (SafetensorError, OSError) as error:
        raise MaskError(f"cannot read the checkpoint in {directory} (corrupt or truncated?): {error}") from None
    if not masks:
        raise MaskError(f"{directory}: config.json says {kind}, but no tensor of the checkpoint is a '.bitmask'")
    return (masks, state) if weights else masks


class _TensorReader:
    """The tensors of a checkpoint's open files, each copied out of the file's mapping as it is read."""

    def __init__(self, files: Mapping[Path, Any]) -> None:
        self.files = files
        self.where: dict[str, Path] = {}  # tensor name -> the file holding it
        for path, file in files.items():
            for name in file.keys():  # noqa: SIM118 (a safetensors file is not iterable)
                if name in self.where:
                    raise MaskError(f"tensor {name!r} is in both {self.where[name]} and {path}: which one is meant?")
                self.where[name] = path

    def path(self, name: str) -> Path:
        return self.where[name]

    def tensor(self, name: str) -> torch.Tensor:
        return self.files[self.where[name]].get_tensor(name).clone()  # type: ignore[no-any-return]

    def shape(self, name: str) -> list[int]:
        return list(self.files[self.where[name]].get_slice(name).get_shape())


def _decompress(read: _TensorReader, module: str, kind: str, weights: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The mask of ``<module>.weight`` (and, given ``weights``, the dense weight), every size checked."""
    name = f"{module}.weight"
    stored_shape = read.tensor(f"{module}.shape")
    if stored_shape.is_floating_point() or stored_shape.is_complex() or stored_shape.numel() == 0:
        raise MaskError(
            f"{read.path(module + '.shape')}: '{module}.shape' must hold whole numbers, got {stored_shape.dtype}"
        )
    shape = [int(size) for size in stored_shape.flatten().tolist()]
    if any(size < 0 for size in shape):
        raise MaskError(f"{read.path(module + '.shape')}: '{module}.shape' holds a negative size: {shape}")
    columns = shape[-1]
    rows = math.prod(shape[:-1])
    bitmask = read.tensor(f"{module}.bitmask")
    expected = [rows, -(-columns // 8)]
    if (
        bitmask.dtype not in (torch.uint8, torch.int8)
        or bitmask.dim() == 0
        or [bitmask.numel() // max(bitmask.shape[-1], 1), bitmask.shape[-1]] != expected
        or bitmask.numel() != rows * expected[1]
    ):
        raise MaskError(
            f"{read.path(module + '.bitmask')}: '{module}.bitmask' for {name!r} of shape {tuple(shape)} must be "
            f"uint8 bits of shape {tuple(expected)}, got {bitmask.dtype} of shape {tuple(bitmask.shape)}"
        )
    mask = _unpack_little(bitmask.view(torch.uint8).reshape(expected), columns).reshape(shape)
    kept = int(mask.sum())
    values_shape = read.shape(f"{module}.compressed")
    if math.prod(values_shape) != kept:
        raise MaskError(
            f"{read.path(module + '.compressed')}: '{module}.compressed' holds {math.prod(values_shape)} values, but "
            f"the bitmask of {name!r} keeps {kept}"
        )
    if not weights:
        return mask, None
    values = read.tensor(f"{module}.compressed").flatten()
    # Through integers of the values' size: the values land bit for bit, whatever their dtype (float8 too).
    integer = _INTEGER_OF_SIZE.get(values.element_size())
    if integer is None:
        raise MaskError(
            f"{read.path(module + '.compressed')}: values of {values.dtype} are no weight fxsparse restores"
        )
    dense = torch.zeros(shape, dtype=integer)
    dense[mask] = values.view(integer)
    return mask, dense.view(values.dtype)


def _unpack_little(packed: torch.Tensor, columns: int) -> torch.Tensor:
    """Rows of bits packed 8 to a byte, first element in the lowest bit, as ``bool`` ``[rows, columns]``."""
    shifts = torch.arange(8, dtype=torch.uint8)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(packed.shape[0], packed.shape[1] * 8)[:, :columns].bool()


def _sparsity_config(config: dict[str, Any]) -> dict[str, Any]:
    for holder in (config.get("quantization_config"), config.get("compression_config"), config):
        if isinstance(holder, dict) and isinstance(holder.get("sparsity_config"), dict):
            return holder["sparsity_config"]  # type: ignore[no-any-return]
    raise MaskError(
        "config.json has no sparsity_config (in quantization_config or compression_config): the checkpoint was "
        "not saved by compressed-tensors in a sparse format (dense weights with zeros: fxsparse.masks.from_zeros)"
    )


def _checkpoint_files(directory: Path) -> Iterator[Path]:
    """``model.safetensors``, or each shard ``model.safetensors.index.json`` names (inside ``directory``)."""
    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    if single.is_file():
        yield single
        return
    if not index.is_file():
        raise MaskError(f"{directory} holds neither model.safetensors nor model.safetensors.index.json")
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise MaskError(f"{index}: 'weight_map' must map tensor names to shard files, got {weight_map!r}")
    for shard in sorted(set(weight_map.values())):
        # A shard is a file in the directory: a path elsewhere ('../x', '/etc/x') is refused, not read.
        if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
            raise MaskError(f"{index}: shard {shard!r} is not a file name in {directory}")
        if not (directory / shard).is_file():
            raise MaskError(f"{index} lists {shard}, which is not in {directory}")
        yield directory / shard
