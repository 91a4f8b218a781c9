"""Tiny random-weight GGUF models for the offline demo, the test suite and the benchmarks.

Nothing is downloaded: weights come from ``numpy.random.default_rng(seed)``, so the same arguments always
produce a byte-identical file. The files follow what llama.cpp's loader checks for the ``llama`` and
``bert`` architectures (hparams, tensor names/shapes, SentencePiece / WordPiece vocabularies).
"""

from __future__ import annotations

import itertools
import os
import string
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import gguf
import numpy as np
import numpy.typing as npt

__all__ = ["CHATML_TEMPLATE", "SMOLLM_135M", "LlamaShape", "write_bert_embedding_model", "write_llama_model"]


@dataclass(frozen=True)
class LlamaShape:
    n_vocab: int = 512  # total vocab incl. 3 specials + 256 byte tokens + chat-template specials
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 128
    n_ctx_train: int = 2048
    n_expert: int = 0  # > 0: a mixture-of-experts model (Mixtral's layout) with this many experts per layer
    n_expert_used: int = 0  # experts each token goes through (llama.cpp's {arch}.expert_used_count)


SMOLLM_135M = LlamaShape(
    n_vocab=49152, n_embd=576, n_layer=30, n_head=9, n_head_kv=3, n_ff=1536, n_ctx_train=8192
)

# Plain ChatML as Qwen ships it (no default system prompt, so rendered prompts are predictable in tests).
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

_SPACE = "\u2581"  # SentencePiece / llama.cpp WPM word-start marker
_WORDS = (
    "the", "a", "and", "of", "to", "in", "is", "it", "you", "that", "he", "was", "for", "on", "are", "with",
    "as", "i", "his", "they", "be", "at", "one", "have", "this", "from", "or", "had", "by", "but", "what",
    "some", "we", "can", "out", "other", "were", "all", "there", "when", "up", "use", "your", "how", "said",
    "an", "each", "she", "which", "do", "their", "time", "if", "will", "way", "about", "many", "then", "them",
    "would", "like", "so", "these", "her", "make", "see", "him", "two", "has", "look", "more", "day", "could",
    "go", "come", "did", "no", "most", "people", "my", "over", "know", "than", "first", "who", "may", "now",
    "hello", "world", "model", "yes", "ok", "test", "token", "text", "good", "new", "word",
)  # fmt: skip
_SUFFIXES = ("er", "in", "ing", "ed", "es", "ly", "on", "an", "en", "re", "th", "he", "at", "or", "st", "al")
_RNG = np.random.Generator
_Array = npt.NDArray[np.generic]


@dataclass(frozen=True)
class _Tensor:
    name: str
    shape: tuple[int, ...]  # numpy order (out, in); gguf reverses it to ggml's {in, out}
    dtype: type[np.floating]
    make: Callable[[], _Array]  # called once, in file order, so the rng stream stays deterministic


def _unique(pieces: Iterable[str], taken: set[str]) -> Iterator[str]:
    for piece in pieces:
        if piece not in taken:
            taken.add(piece)
            yield piece


def _prefixes(word: str, marker: str) -> Iterator[str]:
    # SPM/WPM only reach a piece through pieces that are its prefixes, so emit the whole chain.
    for end in range(1, len(word) + 1):
        yield marker + word[:end]


def _synthetic(*, bare: bool) -> Iterator[str]:
    # Level by level ("xa".."zz", then 3 letters, ...) so every synthetic piece's prefix already exists.
    for length in itertools.count(2):
        for prefix in (_SPACE, "") if bare else (_SPACE,):
            for letters in itertools.product(string.ascii_lowercase, repeat=length):
                yield prefix + "".join(letters)


def _spm_pieces(count: int, taken: set[str]) -> list[str]:
    seed = itertools.chain(
        [_SPACE],
        string.ascii_lowercase + string.digits + string.punctuation,
        (_SPACE + c for c in string.ascii_lowercase),
        itertools.chain.from_iterable(_prefixes(w, _SPACE) for w in _WORDS),
        string.ascii_uppercase,
        (_SPACE + c for c in string.ascii_uppercase),
        itertools.chain.from_iterable(_prefixes(s, "") for s in _SUFFIXES),
    )
    return list(itertools.islice(_unique(itertools.chain(seed, _synthetic(bare=True)), taken), count))


def _wpm_pieces(count: int, taken: set[str]) -> list[str]:
    # llama.cpp stores BERT vocabularies converted: word-initial "x" -> "▁x", continuation "##x" -> "x".
    chars = string.ascii_lowercase + string.digits
    seed = itertools.chain(
        (_SPACE + c for c in chars + string.punctuation),
        chars,
        itertools.chain.from_iterable(_prefixes(w, _SPACE) for w in _WORDS),
        itertools.chain.from_iterable(_prefixes(s, "") for s in _SUFFIXES),
    )
    return list(itertools.islice(_unique(itertools.chain(seed, _synthetic(bare=False)), taken), count))


def _rand(rng: _RNG, name: str, shape: tuple[int, ...], std: float, dtype: type[np.floating]) -> _Tensor:
    def make() -> _Array:
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(dtype, copy=False)

    return _Tensor(name, shape, dtype, make)


def _fill(name: str, shape: tuple[int, ...], value: float) -> _Tensor:
    # 1-D tensors (norms, biases) stay f32 like llama.cpp's converters keep them.
    return _Tensor(name, shape, np.float32, lambda: np.full(shape, value, dtype=np.float32))


def _write_atomically(
    path: Path, arch: str, add_kv: Callable[[gguf.GGUFWriter], None], tensors: Sequence[_Tensor]
) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Temp name in the same directory so os.replace is an atomic rename; never visible under the final name.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    os.chmod(tmp_name, 0o644)  # mkstemp's 0600 would keep other users (e.g. a server container) out
    writer = gguf.GGUFWriter(tmp_name, arch)
    try:
        add_kv(writer)
        for t in tensors:
            nbytes = int(np.prod(t.shape)) * np.dtype(t.dtype).itemsize
            writer.add_tensor_info(t.name, t.shape, np.dtype(t.dtype), nbytes)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        # One tensor in memory at a time keeps the 135M shape well under 1 GB of RAM.
        for t in tensors:
            writer.write_tensor_data(t.make())
        writer.flush()
        assert writer.fout is not None
        os.fsync(writer.fout[0].fileno())
        writer.close()
        os.replace(tmp_name, path)
    except BaseException:
        writer.close()
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def write_llama_model(
    path: Path,
    shape: LlamaShape = LlamaShape(),
    *,
    dtype: Literal["f32", "f16"] = "f16",
    chat_template: str | None = CHATML_TEMPLATE,
    seed: int = 0,
    name: str = "tiny-llama",
    extra_special_tokens: Sequence[str] = ("<|im_start|>", "<|im_end|>"),
    file_type_override: int | None = None,
    logit_std: float = 4.0,
    emit_bytes: bool = False,
    emit_eos: bool = False,
    eos_gain: float = 1.0,
    layer_gain: float = 2.5,
) -> Path:
    """Write a random-weight ``llama`` GGUF with a byte-fallback SentencePiece vocab; returns ``path``.

    By default greedy decoding never picks a control or byte token (their output rows are zero while the
    other logits have std ``logit_std``), so generations run to ``max_tokens`` and decode to clean text.
    ``emit_bytes`` lets byte tokens through (raw, often invalid UTF-8, as real random models emit);
    ``emit_eos`` lets ``</s>`` through so generations also end on their own; ``eos_gain`` scales its
    logit so they end sooner (2.0 gives a couple of dozen tokens on average at the demo's shape).
    ``layer_gain`` scales the blocks' weights (std ``layer_gain / sqrt(fan_in)``); a small one leaves the
    residual stream close to the token embedding, so models with the same seed, width and vocabulary but
    different depths predict alike (a draft model for a deeper target).
    """
    s = shape
    head_dim, rem = divmod(s.n_embd, s.n_head)
    if rem or s.n_head % s.n_head_kv:
        raise ValueError(f"n_embd must divide by n_head and n_head by n_head_kv: {s}")
    n_fixed = 3 + 256 + len(extra_special_tokens)
    if s.n_vocab <= n_fixed:
        raise ValueError(f"n_vocab={s.n_vocab} leaves no room for normal tokens (needs > {n_fixed})")

    specials = ["<unk>", "<s>", "</s>"]
    tokens = specials + [f"<0x{b:02X}>" for b in range(256)] + list(extra_special_tokens)
    if len(set(tokens)) != len(tokens):
        raise ValueError(f"duplicate special tokens: {extra_special_tokens}")
    tokens += _spm_pieces(s.n_vocab - len(tokens), set(tokens))
    T = gguf.TokenType
    types = [T.UNKNOWN, T.CONTROL, T.CONTROL] + [T.BYTE] * 256 + [T.CONTROL] * len(extra_special_tokens)
    types += [T.NORMAL] * (s.n_vocab - n_fixed)
    # Higher score wins SPM merges: prefer earlier (common) pieces.
    scores = [0.0] * n_fixed + [-float(i) for i in range(s.n_vocab - n_fixed)]

    def add_kv(w: gguf.GGUFWriter) -> None:
        w.add_name(name)
        w.add_file_type(file_type_override if file_type_override is not None else int(dtype == "f16"))
        w.add_vocab_size(s.n_vocab)
        w.add_context_length(s.n_ctx_train)
        w.add_embedding_length(s.n_embd)
        w.add_block_count(s.n_layer)
        w.add_feed_forward_length(s.n_ff)
        w.add_head_count(s.n_head)
        w.add_head_count_kv(s.n_head_kv)
        w.add_rope_dimension_count(head_dim)  # llama.cpp rejects n_rot != head_dim for llama
        w.add_rope_freq_base(10000.0)
        w.add_layer_norm_rms_eps(1e-5)
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)
        if "<|im_end|>" in extra_special_tokens:
            # llama.cpp would also auto-detect it by text; explicit keeps it EOG for every reader.
            w.add_eot_token_id(tokens.index("<|im_end|>"))
        if chat_template:
            w.add_chat_template(chat_template)
        if s.n_expert:
            w.add_expert_count(s.n_expert)
            w.add_expert_used_count(s.n_expert_used)

    rng = np.random.default_rng(seed)
    wt = np.float16 if dtype == "f16" else np.float32
    q_dim, kv_dim = s.n_head * head_dim, s.n_head_kv * head_dim
    output = _rand(rng, "output.weight", (s.n_vocab, s.n_embd), logit_std / s.n_embd**0.5, wt)

    def make_output() -> _Array:
        # Untied head: with a tied one the residual stream mostly predicts the current token again.
        out = output.make()
        silent = np.ones(n_fixed, dtype=bool)
        silent[3:259] = not emit_bytes
        silent[2] = not emit_eos
        out[:n_fixed][silent] = 0
        out[2] *= eos_gain
        return out

    tensors = [
        _rand(rng, "token_embd.weight", (s.n_vocab, s.n_embd), 1.0, wt),
        _fill("output_norm.weight", (s.n_embd,), 1.0),
        _Tensor(output.name, output.shape, wt, make_output),
    ]
    linear: dict[str, tuple[int, ...]] = {
        "attn_q": (q_dim, s.n_embd),
        "attn_k": (kv_dim, s.n_embd),
        "attn_v": (kv_dim, s.n_embd),
        "attn_output": (s.n_embd, q_dim),
        "ffn_gate": (s.n_ff, s.n_embd),
        "ffn_up": (s.n_ff, s.n_embd),
        "ffn_down": (s.n_embd, s.n_ff),
    }
    if s.n_expert:
        for dense in ("ffn_gate", "ffn_up", "ffn_down"):
            del linear[dense]
        linear |= _expert_layers(s)
    # At std 1/sqrt(fan_in) some seeds fell into one-token greedy loops; the default 2.5x lets attention mix
    # in enough context that 48 greedy tokens stayed varied for every seed/prompt/shape tried (24 seeds x 5).
    gain = layer_gain
    for i in range(s.n_layer):
        tensors += [_fill(f"blk.{i}.attn_norm.weight", (s.n_embd,), 1.0)]
        tensors += [_fill(f"blk.{i}.ffn_norm.weight", (s.n_embd,), 1.0)]
        tensors += [
            _rand(rng, f"blk.{i}.{n}.weight", shp, gain * shp[-1] ** -0.5, wt) for n, shp in linear.items()
        ]
    return _write_atomically(path, "llama", add_kv, tensors)


def _expert_layers(s: LlamaShape) -> dict[str, tuple[int, ...]]:
    """A MoE block's feed-forward: a router and each expert's gate/up/down, stacked (numpy order)."""
    return {
        "ffn_gate_inp": (s.n_expert, s.n_embd),
        "ffn_gate_exps": (s.n_expert, s.n_ff, s.n_embd),
        "ffn_up_exps": (s.n_expert, s.n_ff, s.n_embd),
        "ffn_down_exps": (s.n_expert, s.n_embd, s.n_ff),
    }


def write_bert_embedding_model(
    path: Path,
    *,
    n_vocab: int = 512,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_ff: int = 128,
    n_ctx_train: int = 512,
    seed: int = 0,
    name: str = "tiny-embed",
) -> Path:
    """Write a random-weight f32 ``bert`` embedding GGUF (WordPiece vocab, mean pooling); returns ``path``."""
    if n_embd % n_head:
        raise ValueError(f"n_embd={n_embd} must divide by n_head={n_head}")
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    # Any ASCII text must tokenize: every char needs a word-initial and a continuation piece.
    min_vocab = len(tokens) + 2 * len(string.ascii_lowercase + string.digits) + len(string.punctuation)
    if n_vocab < min_vocab:
        raise ValueError(f"n_vocab={n_vocab} too small for the WordPiece alphabet (needs >= {min_vocab})")
    pieces = _wpm_pieces(n_vocab - len(tokens), set(tokens))
    tokens += pieces
    types = [gguf.TokenType.CONTROL] * 5 + [gguf.TokenType.NORMAL] * len(pieces)

    def add_kv(w: gguf.GGUFWriter) -> None:
        w.add_name(name)
        w.add_file_type(0)
        w.add_vocab_size(n_vocab)
        w.add_context_length(n_ctx_train)
        w.add_embedding_length(n_embd)
        w.add_block_count(n_layer)
        w.add_feed_forward_length(n_ff)
        w.add_head_count(n_head)
        w.add_layer_norm_eps(1e-12)
        w.add_causal_attention(False)
        w.add_pooling_type(gguf.PoolingType.MEAN)
        w.add_tokenizer_model("bert")
        w.add_token_type_count(2)
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_pad_token_id(0)
        w.add_unk_token_id(1)
        w.add_bos_token_id(2)  # llama.cpp treats [CLS] as BOS for WPM vocabularies
        w.add_sep_token_id(3)
        w.add_mask_token_id(4)

    rng = np.random.default_rng(seed)
    e = (n_embd,)

    def layer_norm(prefix: str) -> list[_Tensor]:
        return [_fill(f"{prefix}.weight", e, 1.0), _fill(f"{prefix}.bias", e, 0.0)]

    tensors = [
        _rand(rng, "token_embd.weight", (n_vocab, n_embd), 1.0, np.float32),
        _rand(rng, "token_types.weight", (2, n_embd), 0.1, np.float32),
        _rand(rng, "position_embd.weight", (n_ctx_train, n_embd), 0.1, np.float32),
        *layer_norm("token_embd_norm"),
    ]
    linear = {
        "attn_q": (n_embd, n_embd),
        "attn_k": (n_embd, n_embd),
        "attn_v": (n_embd, n_embd),
        "attn_output": (n_embd, n_embd),
        "ffn_up": (n_ff, n_embd),
        "ffn_down": (n_embd, n_ff),
    }
    for i in range(n_layer):
        for n, shp in linear.items():
            tensors.append(_rand(rng, f"blk.{i}.{n}.weight", shp, shp[1] ** -0.5, np.float32))
            tensors.append(_rand(rng, f"blk.{i}.{n}.bias", shp[:1], 0.02, np.float32))
        tensors += layer_norm(f"blk.{i}.attn_output_norm") + layer_norm(f"blk.{i}.layer_output_norm")
    return _write_atomically(path, "bert", add_kv, tensors)
