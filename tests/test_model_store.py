"""The model store (LM Studio folder layout, variants, resolution) and the quantization rules it uses."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from lmkube.server.store import model_store, quant
from lmkube.server.store.model_store import ModelIncomplete, ModelNotFound, ModelStore, format_param_count
from lmkube.server.store.paths import default_models_dir, lmkube_home

TEMPLATE_WITH_TOOLS = (
    "{% if tools %}{{ tools | tojson }}{% endif %}{% for m in messages %}{{ m.content }}{% endfor %}"
)


def make_gguf(
    path: Path,
    *,
    arch: str = "llama",
    name: str | None = None,
    file_type: int | None = None,
    context_length: int | None = 2048,
    chat_template: str | None = None,
    n_tokens: int = 0,
    pooling_type: int | None = None,
    size_label: str | None = None,
    shapes: tuple[tuple[int, ...], ...] = ((8, 16), (16,)),
    block_count: int | None = None,
) -> Path:
    """A tiny GGUF file: a few KVs and F32 tensors of the given numpy shapes (not loadable by llama.cpp)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), arch)
    if name is not None:
        w.add_name(name)
    if file_type is not None:
        w.add_file_type(file_type)
    if size_label is not None:
        w.add_size_label(size_label)
    if context_length is not None:
        w.add_context_length(context_length)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    if block_count is not None:
        w.add_block_count(block_count)
        w.add_embedding_length(shapes[0][-1])
    if n_tokens:
        w.add_token_list([f"t{i}" for i in range(n_tokens)])
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
    if pooling_type is not None:
        w.add_pooling_type(gguf.PoolingType(pooling_type))
    for i, shape in enumerate(shapes):
        w.add_tensor(f"t{i}.weight", np.zeros(shape, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---- quantization knowledge -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filename", "expected"),
    [
        ("Qwen2.5-7B-Instruct-Q4_K_M.gguf", "Q4_K_M"),
        ("model.q8_0.gguf", "Q8_0"),
        ("foo-IQ4_XS-00001-of-00003.gguf", "IQ4_XS"),
        ("x-f16.gguf", "F16"),
        ("x-BF16.gguf", "BF16"),
        ("Phi-3-mini-4k-instruct-fp16.gguf", "F16"),
        ("llama-2-7b-chat.Q4_K_M.gguf", "Q4_K_M"),
        ("ggml-model-q4_0.gguf", "Q4_0"),
        ("qwen2.5-0.5b-instruct-q4_k_m.gguf", "Q4_K_M"),
        ("mistral_7b_instruct_Q5_K_S.gguf", "Q5_K_S"),
        ("gemma-2-9b-it-Q4_K_M-imat.gguf", "Q4_K_M"),
        ("Mixtral-8x7B-v0.1.Q3_K_L.gguf", "Q3_K_L"),
        ("tinyllama-1.1b-chat-v1.0.Q2_K.gguf", "Q2_K"),
        ("Meta-Llama-3.1-8B-Instruct-IQ2_XXS.gguf", "IQ2_XXS"),
        ("Qwen3-30B-A3B-UD-Q4_K_XL.gguf", "UD-Q4_K_XL"),
        ("DeepSeek-R1-UD-IQ1_S-00001-of-00003.gguf", "UD-IQ1_S"),
        ("Llama-3.3-70B-Instruct-Q6_K_L.gguf", "Q6_K_L"),
        ("phi-2.Q4_0_4_4.gguf", "Q4_0_4_4"),
        ("gpt-oss-20b-MXFP4.gguf", "MXFP4"),
        ("model-Q4_K.gguf", "Q4_K_M"),  # llama-quantize's own alias
        ("bitnet-TQ1_0.gguf", "TQ1_0"),
        ("Qwen3-8B.gguf", None),
        ("phi-q4.gguf", None),
        ("Qwen2-VL-7B.gguf", None),
    ],
)
def test_quant_from_filename(filename: str, expected: str | None) -> None:
    assert quant.quant_from_filename(filename) == expected


def test_file_types_match_llama_h() -> None:
    # gguf's LlamaFileType mirrors llama.h's llama_ftype (ALL_F32, MOSTLY_<NAME>).
    for ftype in gguf.LlamaFileType:
        if ftype.name == "GUESSED":
            continue
        expected = "MXFP4" if ftype.name == "MOSTLY_MXFP4_MOE" else ftype.name.split("_", 1)[1]
        assert quant.FILE_TYPES.get(ftype.value) == expected, ftype
    assert set(quant.FILE_TYPES) <= {f.value for f in gguf.LlamaFileType}
    assert all(name in quant.BITS_PER_WEIGHT for name in quant.FILE_TYPES.values())


def test_quant_from_file_type() -> None:
    assert quant.quant_from_file_type(15) == "Q4_K_M"
    assert quant.quant_from_file_type(15 | 1024) == "Q4_K_M"  # LLAMA_FTYPE_GUESSED flag
    assert quant.quant_from_file_type(0) == "F32"
    assert quant.quant_from_file_type(38) == "MXFP4"
    assert quant.quant_from_file_type(5) is None  # Q4_2, removed from llama.cpp
    assert quant.quant_from_file_type(None) is None


def test_bits_per_weight() -> None:
    bpw = quant.bits_per_weight
    assert (bpw("Q4_K_M"), bpw("Q8_0"), bpw("F16"), bpw("F32")) == (4.89, 8.5, 16.0, 32.0)
    assert (bpw("Q6_K"), bpw("Q5_K_M"), bpw("Q4_0"), bpw("q4_k_m")) == (6.56, 5.70, 4.64, 4.89)
    assert bpw("Q4_K_XL") == bpw("UD-Q4_K_XL") == 4.89  # unknown mixes take their family's figure
    assert bpw("Q8_K_XL") == 8.5 and bpw("Q6_K_L") == 6.56 and bpw("Q4_0_4_4") == bpw("Q4_0")
    assert bpw("IQ2_XXS_R4") == bpw("IQ2_XXS")
    assert bpw("mmproj") is None and bpw("") is None
    ordered = ["IQ1_S", "Q2_K", "Q3_K_M", "IQ4_XS", "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "F16", "F32"]
    assert sorted(ordered, key=lambda q: bpw(q) or 0) == ordered


def test_default_variant_rule() -> None:
    assert "Q4_K_M when present" in (quant.__doc__ or "")
    assert quant.pick_default(["Q8_0", "Q2_K", "Q4_K_M", "Q4_K_S"]) == "Q4_K_M"
    assert quant.pick_default(["Q8_0", "Q6_K", "Q4_0"]) == "Q4_0"  # 0.25 away beats 1.67
    assert quant.pick_default(["Q8_0", "Q3_K_S", "Q5_K_M"]) == "Q5_K_M"  # 0.81 beats 1.25
    assert quant.pick_default(["Q8_0", "Q3_K_L", "Q5_K_M"]) == "Q3_K_L"  # 0.59 below beats 0.81 above
    assert quant.pick_default(["F16", "Q8_0"]) == "Q8_0"
    assert quant.pick_default(["UD-Q4_K_XL", "Q4_K_S"]) == "UD-Q4_K_XL"
    assert quant.pick_default(["weird", "F32"]) == "F32"  # unknown bits per weight come last
    assert quant.pick_default([]) is None


def test_default_variant_tie_goes_to_smaller(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(quant.BITS_PER_WEIGHT, "Q5_0", 4.89 + 0.25)  # as far above Q4_K_M as Q4_0 is below
    assert quant.pick_default(["Q5_0", "Q4_0"]) == "Q4_0"
    assert quant.pick_default(["Q4_0", "Q5_0"]) == "Q4_0"


def test_format_param_count() -> None:
    counts = (134_515_008, 494_032_768, 7_615_616_512, 70_553_706_496, 22_000)
    assert [format_param_count(n) for n in counts] == ["135M", "494M", "7.6B", "71B", "22K"]


# ---- the store --------------------------------------------------------------------------------------


@pytest.fixture
def models(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    repo = root / "Acme" / "Tiny-Chat"
    for q, ft in (("Q8_0", 7), ("Q4_K_M", 15), ("Q6_K", 18)):
        make_gguf(repo / f"tiny-chat-{q}.gguf", name="Tiny Chat", file_type=ft, context_length=4096,
                  chat_template=TEMPLATE_WITH_TOOLS, n_tokens=300, shapes=((10, 16), (16,)), block_count=2)
    make_gguf(root / "acme" / "plain" / "plain.gguf", file_type=1, chat_template="{{ messages }}")
    return root


def test_scan_lists_models_and_header_facts(models: Path) -> None:
    entries = ModelStore(models).scan()
    assert [e.key for e in entries] == ["acme/plain", "acme/tiny-chat"]
    tiny = entries[1]
    assert (tiny.publisher, tiny.repo, tiny.display_name) == ("Acme", "Tiny-Chat", "Tiny Chat")
    assert (tiny.type, tiny.architecture, tiny.path) == ("llm", "llama", models / "Acme" / "Tiny-Chat")
    assert [v.key for v in tiny.variants] == [
        "acme/tiny-chat@q4_k_m", "acme/tiny-chat@q6_k", "acme/tiny-chat@q8_0"
    ]
    v = tiny.default_variant
    assert v is not None and v.key == "acme/tiny-chat@q4_k_m" and v.quant == "Q4_K_M"
    path = models / "Acme" / "Tiny-Chat" / "tiny-chat-Q4_K_M.gguf"
    assert (v.path, v.files, v.size_bytes) == (path, (path,), path.stat().st_size)
    assert (v.model_key, v.bits_per_weight, v.architecture) == ("acme/tiny-chat", 4.89, "llama")
    assert (v.context_length, v.block_count, v.embedding_length) == (4096, 2, 16)
    assert (v.param_count, v.params_string, v.size_label) == (10 * 16 + 16, "0.18K", None)
    assert (v.vocab_size, v.bos_token_id, v.eos_token_id, v.file_type) == (300, 1, 2, 15)
    assert v.chat_template == TEMPLATE_WITH_TOOLS and v.trained_for_tool_use
    assert v.complete and v.mmproj_path is None and not v.is_embedding and v.type == "llm"

    plain = entries[0]
    assert plain.display_name == "plain"  # no general.name: the repo folder's name
    (pv,) = plain.variants
    assert (pv.key, pv.quant, pv.bits_per_weight) == ("acme/plain@f16", "F16", 16.0)  # from general.file_type
    assert not pv.trained_for_tool_use and pv.vocab_size is None and pv.architecture == "llama"


def test_params_string_prefers_size_label(tmp_path: Path) -> None:
    make_gguf(tmp_path / "p" / "labelled" / "m-Q8_0.gguf", size_label="0.5B")
    make_gguf(tmp_path / "p" / "computed" / "m-Q8_0.gguf", shapes=((1000, 1500),))
    variants = {e.repo: e.variants[0] for e in ModelStore(tmp_path).scan()}
    assert variants["labelled"].params_string == "0.5B" and variants["labelled"].size_label == "0.5B"
    assert (variants["computed"].param_count, variants["computed"].params_string) == (1_500_000, "1.5M")


def test_quant_falls_back_to_tensor_types(tmp_path: Path) -> None:
    make_gguf(tmp_path / "p" / "r" / "model.gguf", file_type=None)  # F32 tensors only
    (variant,) = ModelStore(tmp_path).scan()[0].variants
    assert (variant.key, variant.quant) == ("p/r@f32", "F32")


def test_same_quant_twice_keeps_both(tmp_path: Path) -> None:
    repo = tmp_path / "p" / "r"
    make_gguf(repo / "r-Q8_0.gguf")
    make_gguf(repo / "r-Q8_0-imat.gguf")
    make_gguf(repo / "sub" / "r-Q8_0.gguf")
    make_gguf(repo / "r-Q4_K_M.gguf")
    entry = ModelStore(tmp_path).scan()[0]
    assert sorted(v.key for v in entry.variants) == [
        "p/r@q4_k_m", "p/r@q8_0-r-q8_0", "p/r@q8_0-r-q8_0-imat", "p/r@q8_0-sub-r-q8_0"
    ]
    store = ModelStore(tmp_path)
    assert store.resolve("p/r@q8_0-sub-r-q8_0").path == repo / "sub" / "r-Q8_0.gguf"
    assert store.resolve("p/r@q8_0").path == repo / "r-Q8_0.gguf"  # the first by key: deterministic


def split_set(repo: Path, base: str, total: int, present: tuple[int, ...]) -> list[Path]:
    paths = []
    for i in present:
        meta: dict[str, Any] = {"name": "Big", "context_length": 8192} if i == 1 else {"context_length": None}
        paths.append(make_gguf(repo / f"{base}-{i:05d}-of-{total:05d}.gguf", shapes=((i, 4),), **meta))
    return paths


def test_split_files_are_one_variant(tmp_path: Path) -> None:
    repo = tmp_path / "p" / "big"
    shards = split_set(repo, "big-Q4_K_M", 3, (1, 2, 3))
    (entry,) = ModelStore(tmp_path).scan()
    (v,) = entry.variants
    assert (v.key, v.path, v.files) == ("p/big@q4_k_m", shards[0], tuple(shards))
    assert v.size_bytes == sum(p.stat().st_size for p in shards)
    assert v.param_count == 4 * (1 + 2 + 3)
    assert (v.display_name, v.context_length, v.complete) == ("Big", 8192, True)


def test_split_with_missing_shard_is_incomplete(tmp_path: Path) -> None:
    repo = tmp_path / "p" / "big"
    split_set(repo, "big-Q4_K_M", 3, (1, 3))
    split_set(repo, "big-Q8_0", 2, (2,))  # even the shard with the metadata is missing
    make_gguf(repo / "big-Q2_K.gguf")
    store = ModelStore(tmp_path)
    (entry,) = store.scan()
    by_key = {v.key: v for v in entry.variants}
    assert by_key["p/big@q4_k_m"].missing_shards == (2,) and not by_key["p/big@q4_k_m"].complete
    assert by_key["p/big@q8_0"].missing_shards == (1,)
    assert by_key["p/big@q8_0"].path == repo / "big-Q8_0-00001-of-00002.gguf"
    assert entry.default_variant is not None and entry.default_variant.key == "p/big@q2_k"  # the loadable one
    assert store.resolve("p/big").key == "p/big@q2_k"
    with pytest.raises(ModelIncomplete, match=r"missing shards: 2") as err:
        store.resolve("p/big@q4_k_m")
    assert isinstance(err.value, ModelNotFound) and err.value.variant.key == "p/big@q4_k_m"


def test_projectors_are_not_models(tmp_path: Path) -> None:
    repo = tmp_path / "p" / "vision"
    make_gguf(repo / "vision-Q4_K_M.gguf")
    make_gguf(repo / "mmproj-model-f16.gguf", arch="clip")
    make_gguf(tmp_path / "p" / "other" / "projector-f16.gguf", arch="clip")  # a projector by its header
    entries = ModelStore(tmp_path).scan()
    assert [e.key for e in entries] == ["p/vision"]
    assert entries[0].mmproj_path == repo / "mmproj-model-f16.gguf"
    assert [v.key for v in entries[0].variants] == ["p/vision@q4_k_m"]
    assert entries[0].variants[0].mmproj_path == repo / "mmproj-model-f16.gguf"


def test_ignores_partial_hidden_and_misplaced_files(tmp_path: Path) -> None:
    repo = tmp_path / "p" / "r"
    make_gguf(repo / "r-Q4_K_M.gguf")
    scratch = ("r-Q8_0.gguf.part", "r-Q6_K.gguf.incomplete", ".r-Q5_K_M.gguf", "~r-Q3_K_M.gguf", "README.md")
    for name in scratch:
        (repo / name).write_bytes(b"GGUF partial")
    make_gguf(repo / ".cache" / "huggingface" / "download" / "r-Q2_K.gguf")
    make_gguf(tmp_path / "loose-Q8_0.gguf")  # not inside publisher/repo
    make_gguf(tmp_path / "p" / "loose-Q8_0.gguf")
    (entry,) = ModelStore(tmp_path).scan()
    assert [v.key for v in entry.variants] == ["p/r@q4_k_m"]


def test_corrupt_file_is_skipped_with_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    repo = tmp_path / "p" / "r"
    make_gguf(repo / "r-Q4_K_M.gguf")
    (repo / "r-Q8_0.gguf").write_bytes(b"definitely not gguf")
    good = make_gguf(tmp_path / "p" / "cut" / "cut-Q8_0.gguf")
    with open(good, "r+b") as f:
        f.truncate(good.stat().st_size - 200)
    with caplog.at_level(logging.WARNING, logger=model_store.__name__):
        entries = ModelStore(tmp_path).scan()
    assert [v.key for e in entries for v in e.variants] == ["p/r@q4_k_m"]
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "r-Q8_0.gguf" in warned and "cut-Q8_0.gguf" in warned


def test_embedding_detection(tmp_path: Path) -> None:
    make_gguf(tmp_path / "p" / "bert" / "bert-F16.gguf", arch="bert")
    make_gguf(tmp_path / "p" / "nomic" / "nomic-Q8_0.gguf", arch="nomic-bert")
    make_gguf(tmp_path / "p" / "qwen-embed" / "e-Q8_0.gguf", arch="qwen3", pooling_type=3)
    make_gguf(tmp_path / "p" / "qwen-chat" / "c-Q8_0.gguf", arch="qwen3", pooling_type=0)
    types = {e.repo: (e.type, e.architecture) for e in ModelStore(tmp_path).scan()}
    assert types == {
        "bert": ("embedding", "bert"),
        "nomic": ("embedding", "nomic-bert"),
        "qwen-embed": ("embedding", "qwen3"),
        "qwen-chat": ("llm", "qwen3"),
    }


def test_resolve(models: Path) -> None:
    store = ModelStore(models)
    assert store.resolve("acme/tiny-chat").key == "acme/tiny-chat@q4_k_m"
    assert store.resolve("ACME/Tiny-Chat@Q8_0").key == "acme/tiny-chat@q8_0"
    assert store.resolve(" acme/tiny-chat@q6_k ").key == "acme/tiny-chat@q6_k"
    assert store.resolve("tiny-chat").key == "acme/tiny-chat@q4_k_m"
    assert store.resolve("Tiny-Chat@q8_0").key == "acme/tiny-chat@q8_0"
    assert store.resolve("acme/tiny-chat/tiny-chat-q6_k.gguf").key == "acme/tiny-chat@q6_k"
    with pytest.raises(ModelNotFound) as err:
        store.resolve("acme/huge")
    assert err.value.name == "acme/huge"
    assert err.value.available == ["acme/plain", "acme/tiny-chat"]
    assert "acme/plain, acme/tiny-chat" in str(err.value)
    with pytest.raises(ModelNotFound) as err:
        store.resolve("acme/tiny-chat@q2_k")
    assert err.value.available == ["acme/tiny-chat@q4_k_m", "acme/tiny-chat@q6_k", "acme/tiny-chat@q8_0"]


def test_resolve_ambiguous_bare_name(models: Path) -> None:
    make_gguf(models / "other" / "plain" / "plain-Q4_K_M.gguf")
    store = ModelStore(models)
    with pytest.raises(ModelNotFound, match="ambiguous") as err:
        store.resolve("plain")
    assert err.value.available == ["acme/plain", "other/plain"]
    assert store.resolve("other/plain").key == "other/plain@q4_k_m"


def test_scan_cache(models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[Path] = []
    real = model_store.read_gguf_header
    monkeypatch.setattr(model_store, "read_gguf_header", lambda p, **kw: reads.append(p) or real(p, **kw))
    store = ModelStore(models)
    first = store.scan()
    assert len(reads) == 4
    assert store.scan() == first and len(reads) == 4  # unchanged folder: no header is read again

    target = models / "acme" / "plain" / "plain.gguf"
    stat = target.stat()
    make_gguf(target, file_type=7, context_length=16384)
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    (plain,) = [e for e in store.scan() if e.key == "acme/plain"]
    assert [(v.key, v.context_length) for v in plain.variants] == [("acme/plain@q8_0", 16384)]
    assert reads[4:] == [target]  # only the changed file was read again

    (models / "Acme" / "Tiny-Chat" / "tiny-chat-Q6_K.gguf").unlink()
    make_gguf(models / "Acme" / "Tiny-Chat" / "tiny-chat-IQ4_XS.gguf")
    tiny = store.scan()[1]
    assert [v.quant for v in tiny.variants] == ["IQ4_XS", "Q4_K_M", "Q8_0"]


def test_missing_models_dir(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "nothing-here")
    assert store.scan() == []
    with pytest.raises(ModelNotFound, match="available: none"):
        store.resolve("acme/x")


def test_model_dir_and_default_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ModelStore(tmp_path)
    assert store.models_dir == tmp_path
    assert store.model_dir("acme", "tiny-chat") == tmp_path / "acme" / "tiny-chat"
    for bad in ("..", "", "a/b"):
        with pytest.raises(ValueError):
            store.model_dir(bad, "x")

    monkeypatch.setenv("LMKUBE_HOME", str(tmp_path / "home"))
    assert lmkube_home() == tmp_path / "home"
    assert default_models_dir() == tmp_path / "home" / "models"
    assert ModelStore().models_dir == tmp_path / "home" / "models"
    monkeypatch.setenv("LMKUBE_HOME", "")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert default_models_dir() == tmp_path / "user" / ".lmkube" / "models"
