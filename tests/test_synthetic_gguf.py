"""Structure of the synthetic GGUF files, read back with gguf's own reader (no llama.cpp needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import pytest

from lmkube.synthetic_gguf import (
    CHATML_TEMPLATE,
    LlamaShape,
    write_bert_embedding_model,
    write_llama_model,
)


def _kv(reader: gguf.GGUFReader, key: str) -> Any:
    field = reader.get_field(key)
    assert field is not None, f"missing metadata key {key}"
    return field.contents()


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_llama_model(tmp_path_factory.mktemp("llama") / "nested" / "tiny.gguf")


@pytest.fixture(scope="module")
def bert_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_bert_embedding_model(tmp_path_factory.mktemp("bert") / "embed.gguf")


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path, llama_path: Path) -> None:
    again = write_llama_model(tmp_path / "again.gguf")
    other = write_llama_model(tmp_path / "other.gguf", seed=1)
    assert again.read_bytes() == llama_path.read_bytes()
    assert other.read_bytes() != llama_path.read_bytes()
    assert other.stat().st_size == llama_path.stat().st_size


@pytest.mark.parametrize("n_vocab", [262, 512, 3000])
def test_vocab_size_exact_and_unique(tmp_path: Path, n_vocab: int) -> None:
    path = write_llama_model(tmp_path / "m.gguf", LlamaShape(n_vocab=n_vocab), dtype="f32")
    reader = gguf.GGUFReader(path)
    tokens = _kv(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == n_vocab == len(set(tokens))
    for key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        assert len(_kv(reader, key)) == n_vocab
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert [int(d) for d in embd.shape] == [64, n_vocab]  # ggml order {n_embd, n_vocab}


def test_specials_and_byte_tokens(llama_path: Path) -> None:
    reader = gguf.GGUFReader(llama_path)
    tokens = _kv(reader, "tokenizer.ggml.tokens")
    types = _kv(reader, "tokenizer.ggml.token_type")
    assert tokens[:3] == ["<unk>", "<s>", "</s>"]
    assert types[:3] == [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    assert tokens[3:259] == [f"<0x{b:02X}>" for b in range(256)]
    assert set(types[3:259]) == {gguf.TokenType.BYTE}
    im_end = tokens.index("<|im_end|>")
    assert types[tokens.index("<|im_start|>")] == types[im_end] == gguf.TokenType.CONTROL
    assert _kv(reader, "tokenizer.ggml.eot_token_id") == im_end
    assert {"\u2581", "\u2581the", "\u2581a", "e", "t"} <= set(tokens)
    assert set(types[261:]) == {gguf.TokenType.NORMAL}


def test_llama_metadata_and_tensors(llama_path: Path) -> None:
    reader = gguf.GGUFReader(llama_path)
    assert _kv(reader, "general.architecture") == "llama"
    assert _kv(reader, "general.name") == "tiny-llama"
    assert _kv(reader, "general.file_type") == 1
    assert _kv(reader, "llama.rope.dimension_count") == 64 // 4
    assert _kv(reader, "llama.attention.head_count_kv") == 2
    assert _kv(reader, "tokenizer.ggml.model") == "llama"
    assert _kv(reader, "tokenizer.chat_template") == CHATML_TEMPLATE
    assert (_kv(reader, "tokenizer.ggml.bos_token_id"), _kv(reader, "tokenizer.ggml.eos_token_id")) == (1, 2)
    assert _kv(reader, "tokenizer.ggml.add_bos_token") is True
    names = {t.name: t for t in reader.tensors}
    assert {"token_embd.weight", "output_norm.weight", "output.weight", "blk.1.ffn_down.weight"} <= set(names)
    assert names["blk.0.attn_k.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert names["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert [int(d) for d in names["blk.0.attn_k.weight"].shape] == [64, 2 * 16]


def test_f32_and_file_type_override(tmp_path: Path) -> None:
    f32 = gguf.GGUFReader(write_llama_model(tmp_path / "a.gguf", dtype="f32", chat_template=None))
    assert _kv(f32, "general.file_type") == 0
    assert f32.get_field("tokenizer.chat_template") is None
    assert {t.tensor_type for t in f32.tensors} == {gguf.GGMLQuantizationType.F32}
    override = gguf.GGUFReader(write_llama_model(tmp_path / "b.gguf", file_type_override=15))
    assert _kv(override, "general.file_type") == 15


def test_invalid_shapes_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_llama_model(tmp_path / "x.gguf", LlamaShape(n_vocab=261))
    with pytest.raises(ValueError):
        write_llama_model(tmp_path / "x.gguf", LlamaShape(n_head=3))
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_leaves_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_llama_model(tmp_path / "ok.gguf")
    assert [p.name for p in tmp_path.iterdir()] == ["ok.gguf"]

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", boom)
    with pytest.raises(OSError, match="disk full"):
        write_llama_model(tmp_path / "broken.gguf")
    with pytest.raises(OSError, match="disk full"):
        write_llama_model(tmp_path / "ok.gguf", seed=5)  # an existing good file survives a failed rewrite
    assert [p.name for p in tmp_path.iterdir()] == ["ok.gguf"]
    assert _kv(gguf.GGUFReader(tmp_path / "ok.gguf"), "general.name") == "tiny-llama"


def test_bert_embedding_model(bert_path: Path) -> None:
    reader = gguf.GGUFReader(bert_path)
    assert _kv(reader, "general.architecture") == "bert"
    assert _kv(reader, "bert.pooling_type") == 1
    assert _kv(reader, "bert.attention.causal") is False
    assert _kv(reader, "tokenizer.ggml.model") == "bert"
    assert _kv(reader, "tokenizer.ggml.token_type_count") == 2
    tokens = _kv(reader, "tokenizer.ggml.tokens")
    assert tokens[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert len(tokens) == 512 == len(set(tokens))
    # llama.cpp's WPM form: "▁x" starts a word, bare "x" continues one (HF's "##x").
    for c in "az09":
        assert {"\u2581" + c, c} <= set(tokens)
    assert {"\u2581.", "\u2581!", "\u2581hello"} <= set(tokens)
    names = {t.name for t in reader.tensors}
    required = {"token_embd.weight", "token_types.weight", "position_embd.weight", "token_embd_norm.bias"}
    for i in range(2):
        for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_up", "ffn_down"):
            required |= {f"blk.{i}.{n}.weight", f"blk.{i}.{n}.bias"}
        for n in ("attn_output_norm", "layer_output_norm"):
            required |= {f"blk.{i}.{n}.weight", f"blk.{i}.{n}.bias"}
    assert required <= names
