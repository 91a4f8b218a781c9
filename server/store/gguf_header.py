"""Reads a GGUF file's header (version, metadata, tensor infos) without touching the tensor data.

The model store reads every file's header on every rescan of a changed folder, and model files are many
gigabytes: only the header is parsed, and large arrays (the tokenizer's tokens/scores/merges, 10^5 entries
each) are stepped over by their lengths instead of being decoded, unless a caller asks for them by key.
Only the standard library is used so that this works before any inference backend is installed.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Collection
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any, BinaryIO

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)  # v1 used 32-bit lengths and predates every model still in circulation
DEFAULT_ALIGNMENT = 32
DEFAULT_MAX_ARRAY_LEN = 1024
_MAX_DIMS = 4  # GGML_MAX_DIMS: more than this means the bytes are not a tensor info
_CHUNK = 1 << 20
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, smallest value
_MIN_TENSOR_BYTES = 8 + 4 + 4 + 8  # name length, n_dims, type, offset


class GGUFFormatError(ValueError):
    """The file is not a GGUF file this reader understands, or it is truncated or corrupt."""


class GGUFValueType(IntEnum):
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


_SCALAR_CODES: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H",
    GGUFValueType.INT16: "h", GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i",
    GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?", GGUFValueType.UINT64: "Q",
    GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d",
}

# ggml tensor types: id -> (name, elements per block, bytes per block); lets us tell a header-complete
# file whose tensor data was cut short (an interrupted download) from a whole one.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2),
    # 31-33: the since-removed ARM repacks of Q4_0, still found in older downloads.
    31: ("Q4_0_4_4", 32, 18), 32: ("Q4_0_4_8", 32, 18), 33: ("Q4_0_8_8", 32, 18),
    34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36),
    41: ("Q1_0", 128, 18),
}


@dataclass(frozen=True, slots=True)
class ArrayInfo:
    """Stands in for an array that was skipped: its element type and length, not its contents."""

    element_type: GGUFValueType
    count: int

    def __len__(self) -> int:
        return self.count


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]  # GGUF order: ne0 (the contiguous dimension) first
    ggml_type: int
    offset: int  # relative to GGUFHeader.data_offset

    @property
    def n_elements(self) -> int:
        return math.prod(self.dims)

    @property
    def type_name(self) -> str:
        known = GGML_TYPES.get(self.ggml_type)
        return known[0] if known else f"TYPE_{self.ggml_type}"

    @property
    def nbytes(self) -> int | None:
        known = GGML_TYPES.get(self.ggml_type)
        return None if known is None else self.n_elements // known[1] * known[2]


@dataclass(slots=True)
class GGUFHeader:
    version: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    byte_order: str = "<"  # "<" little-endian, ">" big-endian (GGUF v3 allows both)
    data_offset: int = 0  # where tensor data starts in the file
    file_size: int = 0

    @property
    def alignment(self) -> int:
        return _alignment(self.metadata)

    @property
    def param_count(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def array_len(self, key: str) -> int | None:
        """Length of an array value whether it was decoded or skipped; None when absent or not an array."""
        value = self.metadata.get(key)
        return len(value) if isinstance(value, list | ArrayInfo) else None


def read_gguf_header(
    path: str | os.PathLike[str],
    *,
    max_array_len: int = DEFAULT_MAX_ARRAY_LEN,
    keep_arrays: Collection[str] = (),
    check_size: bool = True,
) -> GGUFHeader:
    """Parse the header of the GGUF file at `path`.

    Arrays longer than `max_array_len` become `ArrayInfo` placeholders unless their key is in
    `keep_arrays`. With `check_size`, a file shorter than its tensor infos promise raises too.
    Raises GGUFFormatError for anything that is not a readable GGUF v2/v3 file (and OSError for I/O).
    """
    path = Path(path)
    with open(path, "rb", buffering=_CHUNK) as f:
        size = os.fstat(f.fileno()).st_size
        header = _Reader(f, size, path).header(max_array_len, frozenset(keep_arrays))
    if check_size:
        _check_data_size(header, path)
    return header


def _alignment(metadata: dict[str, Any]) -> int:
    value = metadata.get("general.alignment")
    # Only a positive power of two is a valid alignment; anything else is ignored like llama.cpp does.
    if isinstance(value, int) and not isinstance(value, bool) and value > 0 and value & (value - 1) == 0:
        return value
    return DEFAULT_ALIGNMENT


def _check_data_size(header: GGUFHeader, path: Path) -> None:
    ends = [t.offset + n for t in header.tensors if (n := t.nbytes) is not None]
    if len(ends) != len(header.tensors) or not ends:
        return  # an unknown tensor type: cannot know the size, so do not guess
    needed = header.data_offset + max(ends)
    if needed > header.file_size:
        raise GGUFFormatError(f"{path}: truncated: tensor data needs {needed} bytes, has {header.file_size}")


class _Reader:
    def __init__(self, f: BinaryIO, size: int, path: Path) -> None:
        self.f = f
        self.size = size
        self.path = path
        self.bo = "<"
        self.u32 = struct.Struct("<I")
        self.u64 = struct.Struct("<Q")
        self.scalars: dict[GGUFValueType, struct.Struct] = {}

    def fail(self, why: str) -> GGUFFormatError:
        return GGUFFormatError(f"{self.path}: {why} (at byte {self.f.tell()})")

    def header(self, max_array_len: int, keep_arrays: frozenset[str]) -> GGUFHeader:
        if self.f.read(4) != GGUF_MAGIC:
            raise GGUFFormatError(f"{self.path}: not a GGUF file (bad magic)")
        raw = self.read(4)
        little, big = struct.unpack("<I", raw)[0], struct.unpack(">I", raw)[0]
        # GGUF has no byte-order mark; a big-endian file shows up as an absurd little-endian version.
        if little not in SUPPORTED_VERSIONS and big in SUPPORTED_VERSIONS:
            self.bo, version = ">", big
        elif little in SUPPORTED_VERSIONS:
            version = little
        else:
            raise GGUFFormatError(f"{self.path}: unsupported GGUF version {little}")
        self.u32, self.u64 = struct.Struct(self.bo + "I"), struct.Struct(self.bo + "Q")
        self.scalars = {t: struct.Struct(self.bo + c) for t, c in _SCALAR_CODES.items()}

        n_tensors, n_kv = self.uint64(), self.uint64()
        if n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_BYTES > self.remaining():
            raise self.fail(f"implausible counts: {n_kv} metadata entries, {n_tensors} tensors")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self.string()
            vtype = self.value_type()
            if vtype is GGUFValueType.ARRAY:
                metadata[key] = self.array(key in keep_arrays, max_array_len)
            else:
                metadata[key] = self.scalar(vtype)
        tensors = [self.tensor_info() for _ in range(n_tensors)]
        align = _alignment(metadata)
        data_offset = -(-self.f.tell() // align) * align
        return GGUFHeader(version, metadata, tensors, self.bo, data_offset, self.size)

    def remaining(self) -> int:
        return self.size - self.f.tell()

    def read(self, n: int) -> bytes:
        if n > self.remaining():
            raise self.fail(f"truncated: wanted {n} bytes")
        return self.f.read(n)

    def skip(self, n: int) -> None:
        if n > self.remaining():
            raise self.fail(f"truncated: wanted to skip {n} bytes")
        self.f.seek(n, os.SEEK_CUR)

    def uint32(self) -> int:
        return self.u32.unpack(self.read(4))[0]

    def uint64(self) -> int:
        return self.u64.unpack(self.read(8))[0]

    def string(self) -> str:
        # Model cards and templates are not always valid UTF-8; a bad byte must not hide the model.
        return self.read(self.uint64()).decode("utf-8", "replace")

    def value_type(self) -> GGUFValueType:
        raw = self.uint32()
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise self.fail(f"unknown metadata value type {raw}") from None

    def scalar(self, vtype: GGUFValueType) -> Any:
        if vtype is GGUFValueType.STRING:
            return self.string()
        st = self.scalars[vtype]
        return st.unpack(self.read(st.size))[0]

    def array(self, keep: bool, max_len: int) -> list[Any] | ArrayInfo:
        etype = self.value_type()
        count = self.uint64()
        if keep or count <= max_len:
            if etype in self.scalars:
                st = self.scalars[etype]
                return list(struct.unpack(f"{self.bo}{count}{st.format[-1]}", self.read(count * st.size)))
            if etype is GGUFValueType.STRING:
                return [self.string() for _ in range(count)]
            return [self.array(True, max_len) for _ in range(count)]
        if etype in self.scalars:
            self.skip(count * self.scalars[etype].size)
        elif etype is GGUFValueType.STRING:
            self.skip_strings(count)
        else:
            for _ in range(count):
                self.array(False, 0)
        return ArrayInfo(etype, count)

    def skip_strings(self, count: int) -> None:
        # One read+seek per string costs ~1 µs each through Python; walking length prefixes inside
        # 1 MiB blocks keeps a 150k-entry vocabulary to a few milliseconds.
        u64, buf, pos = self.u64, b"", 0
        while count:
            if pos + 8 > len(buf):
                buf = buf[pos:] + self.f.read(_CHUNK)
                pos = 0
                if len(buf) < 8:
                    raise self.fail("truncated inside a string array")
            pos += 8 + u64.unpack_from(buf, pos)[0]
            count -= 1
            if pos > len(buf):  # the string runs past this block: jump straight to its end
                self.skip(pos - len(buf))
                buf, pos = b"", 0
        if pos < len(buf):
            self.f.seek(pos - len(buf), os.SEEK_CUR)

    def tensor_info(self) -> TensorInfo:
        name = self.string()
        n_dims = self.uint32()
        if n_dims > _MAX_DIMS:
            raise self.fail(f"tensor {name!r} claims {n_dims} dimensions")
        dims = struct.unpack(f"{self.bo}{n_dims}Q", self.read(8 * n_dims))
        ggml_type = self.uint32()
        return TensorInfo(name, dims, ggml_type, self.uint64())
