"""Read a GGUF file's header (tensor names, shapes and types) without touching tensor data.

GGUF (llama.cpp's format, which diffusers loads through ``from_single_file`` with a
``GGUFQuantizationConfig``) starts with the magic ``GGUF``, a version, the tensor and key-value
counts, the key-values (typed), then one record per tensor: name, dimensions, type, offset
(ggml/docs/gguf.md). A tensor of a quantized type stores blocks: ``block_size`` weights in
``type_size`` bytes (Q8_0: 32 in 34, Q4_K: 256 in 144), so its bytes follow from its shape and
type alone. Reading the header keeps sizing a 12 GB file to a few hundred kilobytes of reads.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import BinaryIO

from advisor.errors import ModelError


# ggml type id -> (name, weights per block, bytes per block): ggml/src/ggml.c's type_traits, as
# gguf-py transcribes them (gguf/constants.py, GGML_QUANT_SIZES; tests/test_gguf.py compares).
GGML_TYPES = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
    40: ("NVFP4", 64, 36),
    41: ("Q1_0", 128, 18),
}
# ggml type name -> (weights per block, bytes per block)
GGML_LAYOUT = {name: (block, size) for name, block, size in GGML_TYPES.values()}
# Types diffusers loads as plain tensors (at the pipeline's dtype); every other one stays packed as a
# GGUFParameter and is dequantised per layer (diffusers/models/model_loading_utils.py, load_gguf_checkpoint).
UNPACKED_TYPES = frozenset({"F32", "F16"})

_MAGIC = b"GGUF"
# Key-value types: id -> struct format of a scalar (8: string, 9: array are read apart).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# Anything past these is a corrupt count, not a real header.
_MAX_COUNT = 10_000_000
_MAX_STRING = 64 * 2**20


@dataclass(frozen=True)
class GgufTensor:
    name: str
    shape: tuple[int, ...]  # as the model has it: the fastest-varying dimension last
    type: str  # ggml type name: Q8_0, Q4_K, F32, ...

    @property
    def elements(self) -> int:
        return prod(self.shape)

    @property
    def nbytes(self) -> int:
        block, size = GGML_LAYOUT[self.type]
        return self.elements // block * size

    @property
    def packed(self) -> bool:
        """Kept in its ggml blocks when diffusers loads it (else a plain tensor at the pipeline's dtype)."""
        return self.type not in UNPACKED_TYPES


@dataclass(frozen=True)
class GgufHeader:
    path: Path
    version: int
    tensors: tuple[GgufTensor, ...]
    metadata: dict[str, object]  # the scalar and string key-values (arrays left out)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def parameters(self) -> int:
        return sum(t.elements for t in self.tensors)

    def by_type(self) -> list[tuple[str, int, int, int]]:
        """(type, tensors, weights, bytes) of each type in the file, the most bytes first."""
        rows: dict[str, list[int]] = {}
        for t in self.tensors:
            row = rows.setdefault(t.type, [0, 0, 0])
            row[0], row[1], row[2] = row[0] + 1, row[1] + t.elements, row[2] + t.nbytes
        return sorted(((kind, *row) for kind, row in rows.items()), key=lambda r: -r[3])

    def to_dict(self) -> dict[str, object]:
        rows = [dict(zip(("type", "tensors", "parameters", "bytes"), row)) for row in self.by_type()]
        return {
            "file": str(self.path),
            "version": self.version,
            "parameters": self.parameters,
            "bytes": self.tensor_bytes,
            "main_type": self.main_type,
            "types": rows,
        }

    @property
    def main_type(self) -> str:
        """The type holding most of the bytes: what the file is called by (Q4_K for a Q4_K_S file)."""
        return self.by_type()[0][0] if self.tensors else "F32"


def gguf_files(where: str | Path) -> list[Path]:
    """The GGUF files `where` names: itself, or those in a folder that is not a diffusers pipeline."""
    path = Path(where).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return [path]
    if path.is_dir() and not (path / "model_index.json").exists():
        return sorted(path.glob("*.gguf"))
    return []


def read_gguf_header(path: str | Path) -> GgufHeader:
    """The header of the GGUF file at `path`; a ModelError naming the file if it is not one."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            if f.read(4) != _MAGIC:
                raise ModelError(f"{path}: not a GGUF file (it does not start with 'GGUF')")
            (version,) = _unpack(f, "<I", path)
            if version < 2:  # version 1 counted in 32 bits; no file of it is in use
                raise ModelError(f"{path}: GGUF version {version} is not supported (2 and later are)")
            tensor_count, kv_count = _unpack(f, "<QQ", path)
            if tensor_count > _MAX_COUNT or kv_count > _MAX_COUNT:
                raise ModelError(f"{path}: corrupt GGUF header (counts {tensor_count}, {kv_count})")
            metadata = {}
            for _ in range(kv_count):
                key = _string(f, path)
                value = _value(f, _unpack(f, "<I", path)[0], path)
                if not isinstance(value, list):
                    metadata[key] = value
            tensors = []
            for _ in range(tensor_count):
                name = _string(f, path)
                (dims,) = _unpack(f, "<I", path)
                if dims > 8:
                    raise ModelError(f"{path}: corrupt GGUF header ({name} has {dims} dimensions)")
                shape = _unpack(f, f"<{dims}Q", path)
                type_id, _offset = _unpack(f, "<IQ", path)
                if type_id not in GGML_TYPES:
                    raise ModelError(f"{path}: {name} has ggml type {type_id}, which this advisor does not know")
                # GGUF lists dimensions fastest-varying first; a model's shape lists them last
                tensors.append(GgufTensor(name, tuple(reversed(shape)), GGML_TYPES[type_id][0]))
    except OSError as error:
        raise ModelError(f"{path}: can't read it ({error.strerror or error})") from None
    return GgufHeader(path, version, tuple(tensors), metadata)


def _unpack(f: BinaryIO, fmt: str, path: Path) -> tuple:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise ModelError(f"{path}: the GGUF header ends early (a truncated file?)")
    return struct.unpack(fmt, data)


def _string(f: BinaryIO, path: Path) -> str:
    (length,) = _unpack(f, "<Q", path)
    if length > _MAX_STRING:
        raise ModelError(f"{path}: corrupt GGUF header (a string of {length} bytes)")
    data = f.read(length)
    if len(data) != length:
        raise ModelError(f"{path}: the GGUF header ends early (a truncated file?)")
    return data.decode("utf-8", errors="replace")


def _value(f: BinaryIO, kind: int, path: Path) -> object:
    if kind in _SCALARS:
        return _unpack(f, _SCALARS[kind], path)[0]
    if kind == _STRING:
        return _string(f, path)
    if kind == _ARRAY:
        item, count = _unpack(f, "<IQ", path)
        if count > _MAX_COUNT:
            raise ModelError(f"{path}: corrupt GGUF header (an array of {count} items)")
        return [_value(f, item, path) for _ in range(count)]
    raise ModelError(f"{path}: corrupt GGUF header (key-value type {kind})")
