"""Read safetensors headers (names, dtypes, shapes) without touching tensor data.

A safetensors file starts with an 8-byte little-endian header length and a JSON header; the
tensor bytes follow. Reading only that header keeps inspection time independent of file size.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path

from advisor.errors import ModelError


# safetensors dtype code -> (torch-style name, bytes per element)
DTYPES = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U64": ("uint64", 8),
    "U32": ("uint32", 4),
    "U16": ("uint16", 2),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}
FLOAT_DTYPES = {"float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"}

# A header is JSON text; anything larger than this is a corrupt length field, not a real header.
_MAX_HEADER_BYTES = 100 * 2**20


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as the header describes it."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * dtype_size(self.dtype)

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


def dtype_size(dtype: str) -> int:
    """Bytes per element of a torch-style dtype name (``bfloat16`` -> 2)."""
    for name, size in DTYPES.values():
        if name == dtype:
            return size
    raise ModelError(f"unknown dtype {dtype!r}")


def read_header(path: str | Path) -> list[TensorInfo]:
    """The tensors a safetensors file holds, read from its header only.

    Raises `ModelError` naming the file when the header is truncated or not valid.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise ModelError(f"{path}: truncated safetensors file ({size} bytes, no header length)")
            (length,) = struct.unpack("<Q", prefix)
            if length > _MAX_HEADER_BYTES or 8 + length > size:
                raise ModelError(
                    f"{path}: truncated or corrupt safetensors header (says {length} bytes, file has {size})"
                )
            raw = handle.read(length)
    except OSError as exc:
        raise ModelError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: safetensors header is not valid JSON ({exc})") from None
    except (RecursionError, ValueError):  # nested absurdly deep, or an integer of thousands of digits
        raise ModelError(
            f"{path}: safetensors header is not a header safetensors writes (nested too deep or a giant number)"
        ) from None
    if not isinstance(header, dict):
        raise ModelError(f"{path}: safetensors header is not a JSON object")

    data_bytes = size - 8 - length
    tensors, ranges = [], []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[entry["dtype"]][0]
            shape, offsets = entry["shape"], entry["data_offsets"]
        except (KeyError, TypeError):
            raise ModelError(f"{path}: safetensors header entry {name!r} is malformed") from None
        shape = checked_shape(shape, where=f"{path}: tensor {name!r}")
        if not _is_byte_range(offsets):
            raise ModelError(
                f"{path}: tensor {name!r} has data_offsets {json.dumps(offsets, default=str)[:60]}; they must be [start, end] with 0 <= start <= end"
            )
        start, end = offsets
        if end > data_bytes:
            raise ModelError(f"{path}: truncated safetensors file (tensor {name!r} ends past the end of the file)")
        info = TensorInfo(name, dtype, shape)
        if info.nbytes != end - start:
            raise ModelError(
                f"{path}: tensor {name!r} is {list(shape)} {dtype} ({info.nbytes} bytes) but its data_offsets "
                f"[{start}, {end}] hold {end - start} bytes; the header is corrupt"
            )
        tensors.append(info)
        ranges.append((start, end, name))
    # As safetensors checks before it loads: the tensors tile the data exactly, in offset order.
    covered = 0
    for start, end, name in sorted(ranges):
        if start != covered:
            what = "overlaps the tensor before it" if start < covered else f"leaves bytes {covered}-{start} unused"
            raise ModelError(f"{path}: tensor {name!r} {what}; safetensors refuses such a file")
        covered = end
    if covered != data_bytes:
        raise ModelError(
            f"{path}: {data_bytes - covered} bytes after the last tensor that no header entry describes; safetensors refuses such a file"
        )
    return tensors


def _is_byte_range(offsets: object) -> bool:
    return (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
        and offsets[0] <= offsets[1]
    )


def checked_shape(shape: object, *, where: str) -> tuple[int, ...]:
    """`shape` as a tuple of whole numbers >= 0, or a `ModelError` starting with `where`."""
    if not isinstance(shape, (list, tuple)) or any(
        isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape
    ):
        raise ModelError(
            f"{where} has shape {json.dumps(shape, default=str)[:60]}; a shape is a list of whole numbers >= 0"
        )
    return tuple(shape)
