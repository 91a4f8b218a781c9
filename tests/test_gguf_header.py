"""The stdlib GGUF header reader against files written by the reference writer (the `gguf` package)."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from lmkube.server.store.gguf_header import (
    ArrayInfo,
    GGUFFormatError,
    GGUFValueType,
    read_gguf_header,
)


def write(path: Path, build, *, endianess: gguf.GGUFEndian = gguf.GGUFEndian.LITTLE) -> Path:
    writer = gguf.GGUFWriter(str(path), "llama", endianess=endianess)
    build(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def rich_model(w: gguf.GGUFWriter) -> None:
    w.add_name("Tiny Llama")
    w.add_file_type(7)
    w.add_context_length(4096)
    w.add_uint8("test.u8", 255)
    w.add_int8("test.i8", -128)
    w.add_uint16("test.u16", 65535)
    w.add_int16("test.i16", -32768)
    w.add_int32("test.i32", -(2**31))
    w.add_uint64("test.u64", 2**64 - 1)
    w.add_int64("test.i64", -(2**63))
    w.add_float32("test.f32", 0.5)
    w.add_float64("test.f64", 1e-300)
    w.add_bool("test.yes", True)
    w.add_bool("test.no", False)
    w.add_string("test.unicode", "héllo ✓ {{ messages }}")
    w.add_array("test.ints", [1, 2, 3])
    w.add_array("test.strings", ["a", "bc", ""])
    w.add_array("test.nested", [[1, 2], [3]])
    w.add_tensor("token_embd.weight", np.zeros((10, 16), dtype=np.float32))
    w.add_tensor("blk.0.attn_q.weight", np.zeros((16, 16), dtype=np.float16))
    # 64 Q8_0 weights: two blocks of 34 bytes.
    q8 = np.zeros((2, 34), dtype=np.uint8)
    w.add_tensor("blk.0.ffn_up.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)


def test_metadata_and_tensor_infos_round_trip(tmp_path: Path) -> None:
    header = read_gguf_header(write(tmp_path / "m.gguf", rich_model))

    assert header.version == 3
    assert header.byte_order == "<"
    md = header.metadata
    assert md["general.architecture"] == "llama"
    assert md["general.name"] == "Tiny Llama"
    assert md["general.file_type"] == 7
    assert md["llama.context_length"] == 4096
    assert (md["test.u8"], md["test.i8"], md["test.u16"], md["test.i16"]) == (255, -128, 65535, -32768)
    assert (md["test.i32"], md["test.u64"], md["test.i64"]) == (-(2**31), 2**64 - 1, -(2**63))
    assert md["test.f32"] == 0.5 and md["test.f64"] == 1e-300
    assert md["test.yes"] is True and md["test.no"] is False
    assert md["test.unicode"] == "héllo ✓ {{ messages }}"
    assert md["test.ints"] == [1, 2, 3]
    assert md["test.strings"] == ["a", "bc", ""]
    assert md["test.nested"] == [[1, 2], [3]]

    assert [(t.name, t.dims, t.type_name) for t in header.tensors] == [
        ("token_embd.weight", (16, 10), "F32"),  # GGUF lists ne0 (the row length) first
        ("blk.0.attn_q.weight", (16, 16), "F16"),
        ("blk.0.ffn_up.weight", (32, 2), "Q8_0"),
    ]
    assert [t.nbytes for t in header.tensors] == [640, 512, 68]
    assert header.param_count == 160 + 256 + 64
    assert header.tensors[0].offset == 0
    assert header.data_offset % 32 == 0
    reference = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    assert header.data_offset == reference.data_offset
    offsets = [t.data_offset - reference.data_offset for t in reference.tensors]
    assert [t.offset for t in header.tensors] == offsets
    assert header.data_offset + header.tensors[-1].offset + 68 <= header.file_size


def test_large_arrays_are_skipped_but_counted(tmp_path: Path) -> None:
    n = 5000
    long_token = "x" * (2 << 20)  # longer than the reader's 1 MiB block: skipping must seek past it

    def build(w: gguf.GGUFWriter) -> None:
        w.add_token_list([f"tok{i}" for i in range(n)] + [long_token] + ["end"])
        w.add_token_scores([float(i) for i in range(n + 2)])
        w.add_token_merges([f"a{i} b{i}" for i in range(n)])
        w.add_bos_token_id(1)  # after the skipped arrays: proves the reader stayed in step
        w.add_eos_token_id(2)
        w.add_tensor("output.weight", np.zeros((4, 8), dtype=np.float32))

    path = write(tmp_path / "vocab.gguf", build)
    header = read_gguf_header(path)
    tokens = header.metadata["tokenizer.ggml.tokens"]
    assert tokens == ArrayInfo(GGUFValueType.STRING, n + 2)
    assert len(tokens) == n + 2 == header.array_len("tokenizer.ggml.tokens")
    assert header.metadata["tokenizer.ggml.scores"] == ArrayInfo(GGUFValueType.FLOAT32, n + 2)
    assert header.array_len("tokenizer.ggml.merges") == n
    assert header.metadata["tokenizer.ggml.bos_token_id"] == 1
    assert header.metadata["tokenizer.ggml.eos_token_id"] == 2
    assert [(t.name, t.dims) for t in header.tensors] == [("output.weight", (8, 4))]
    assert header.array_len("general.architecture") is None

    kept = read_gguf_header(path, keep_arrays={"tokenizer.ggml.tokens"})
    assert kept.metadata["tokenizer.ggml.tokens"][:2] == ["tok0", "tok1"]
    assert kept.metadata["tokenizer.ggml.tokens"][-2:] == [long_token, "end"]
    assert isinstance(kept.metadata["tokenizer.ggml.scores"], ArrayInfo)
    assert kept.tensors == header.tensors

    everything = read_gguf_header(path, max_array_len=10**9)
    assert everything.metadata["tokenizer.ggml.scores"][-1] == float(n + 1)


def test_small_arrays_can_be_skipped_too(tmp_path: Path) -> None:
    header = read_gguf_header(write(tmp_path / "m.gguf", rich_model), max_array_len=0)
    assert header.metadata["test.ints"] == ArrayInfo(GGUFValueType.INT32, 3)
    assert header.metadata["test.strings"] == ArrayInfo(GGUFValueType.STRING, 3)
    assert header.metadata["test.nested"] == ArrayInfo(GGUFValueType.ARRAY, 2)
    assert header.metadata["test.unicode"] == "héllo ✓ {{ messages }}"
    assert len(header.tensors) == 3


def test_version_2_is_read_like_version_3(tmp_path: Path) -> None:
    path = write(tmp_path / "m.gguf", rich_model)
    data = bytearray(path.read_bytes())
    data[4:8] = struct.pack("<I", 2)  # v2 differs from v3 only in allowing no big-endian files
    v2 = tmp_path / "v2.gguf"
    v2.write_bytes(bytes(data))
    header, reference = read_gguf_header(v2), read_gguf_header(path)
    assert header.version == 2
    assert header.metadata == reference.metadata and header.tensors == reference.tensors


def test_big_endian_file(tmp_path: Path) -> None:
    header = read_gguf_header(write(tmp_path / "be.gguf", rich_model, endianess=gguf.GGUFEndian.BIG))
    assert header.byte_order == ">"
    assert header.metadata["test.i32"] == -(2**31)
    assert header.metadata["test.ints"] == [1, 2, 3]
    assert header.metadata["llama.context_length"] == 4096
    assert [t.dims for t in header.tensors] == [(16, 10), (16, 16), (32, 2)]


@pytest.mark.parametrize("version", [1, 4, 0x01000000 + 7])
def test_unsupported_versions(tmp_path: Path, version: int) -> None:
    path = write(tmp_path / "m.gguf", rich_model)
    data = bytearray(path.read_bytes())
    data[4:8] = struct.pack("<I", version)
    path.write_bytes(bytes(data))
    with pytest.raises(GGUFFormatError, match="unsupported GGUF version"):
        read_gguf_header(path)


@pytest.mark.parametrize("content", [b"", b"GGU", b"not a gguf file at all", b"GGML" + bytes(64)])
def test_not_gguf(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "x.gguf"
    path.write_bytes(content)
    with pytest.raises(GGUFFormatError, match="not a GGUF file"):
        read_gguf_header(path)


def test_missing_file_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_gguf_header(tmp_path / "absent.gguf")


def test_truncated_anywhere_in_the_header(tmp_path: Path) -> None:
    def build(w: gguf.GGUFWriter) -> None:
        rich_model(w)
        w.add_token_list([f"tok{i}" for i in range(3000)])

    path = write(tmp_path / "m.gguf", build)
    data = path.read_bytes()
    header_end = read_gguf_header(path).data_offset
    cut = tmp_path / "cut.gguf"
    # Cuts inside the counts, the small KVs, the skipped token array and the tensor infos.
    for size in [6, 20, 200, 600, header_end // 2, header_end - 40, header_end - 20]:
        cut.write_bytes(data[:size])
        with pytest.raises(GGUFFormatError, match=r"truncated|implausible"):
            read_gguf_header(cut)


def test_truncated_tensor_data(tmp_path: Path) -> None:
    path = write(tmp_path / "m.gguf", rich_model)
    whole = read_gguf_header(path)
    last = whole.tensors[-1]
    end = whole.data_offset + last.offset + (last.nbytes or 0)
    with open(path, "r+b") as f:  # keep the header, lose the last byte of tensor data (writers pad after it)
        f.truncate(end - 1)
    with pytest.raises(GGUFFormatError, match="truncated: tensor data"):
        read_gguf_header(path)
    assert len(read_gguf_header(path, check_size=False).tensors) == 3


def test_corrupt_values_are_format_errors(tmp_path: Path) -> None:
    def build(w: gguf.GGUFWriter) -> None:
        w.add_uint32("test.value", 7)

    path = write(tmp_path / "m.gguf", build)
    data = path.read_bytes()
    type_at = data.index(b"test.value") + len(b"test.value")
    bad_type = data[:type_at] + struct.pack("<I", 99) + data[type_at + 4 :]
    path.write_bytes(bad_type)
    with pytest.raises(GGUFFormatError, match="unknown metadata value type 99"):
        read_gguf_header(path)

    absurd = data[:16] + struct.pack("<Q", 2**40) + data[24:]  # kv count far beyond the file's size
    path.write_bytes(absurd)
    with pytest.raises(GGUFFormatError, match="implausible"):
        read_gguf_header(path)


def test_too_many_dimensions(tmp_path: Path) -> None:
    def build(w: gguf.GGUFWriter) -> None:
        w.add_tensor("t", np.zeros((2, 2), dtype=np.float32))

    path = write(tmp_path / "m.gguf", build)
    data = path.read_bytes()
    dims_at = data.index(b"\x01\x00\x00\x00\x00\x00\x00\x00t") + 9  # name length 1, "t", then n_dims
    path.write_bytes(data[:dims_at] + struct.pack("<I", 9) + data[dims_at + 4 :])
    with pytest.raises(GGUFFormatError, match="9 dimensions"):
        read_gguf_header(path)
