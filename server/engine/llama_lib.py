"""The only module that talks to llama.cpp's C API (through llama-cpp-python's ctypes bindings).

Everything above it deals in token ids, strings and plain Python values. All calls on one
`LlamaContext` must come from one thread: llama_context is not thread-safe.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp as C
import numpy as np
import numpy.typing as npt

log = logging.getLogger(__name__)
_BYTES = ctypes.POINTER(ctypes.c_uint8)

_backend_lock = threading.Lock()
_backend_ready = False


@ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
def _route_llama_log(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
    # llama.cpp logs thousands of lines per load to stderr; keep them at debug level.
    if log.isEnabledFor(logging.DEBUG) and text:
        log.debug("llama.cpp: %s", text.decode("utf-8", "replace").rstrip())


def init_backend() -> None:
    global _backend_ready
    with _backend_lock:
        if not _backend_ready:
            C.llama_log_set(_route_llama_log, ctypes.c_void_p(0))
            C.llama_backend_init()
            _backend_ready = True


def default_thread_count() -> int:
    # Decoding is memory-bound; more threads than cores only adds contention with the HTTP side.
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


@functools.cache
def _cpu_has_amx() -> bool:
    """Whether this llama.cpp build carries ggml's AMX matmul (a native build on Sapphire Rapids or later)."""
    init_backend()
    return b"AMX_INT8 = 1" in C.llama_print_system_info()


def default_model_params() -> C.llama_model_params:
    """llama.cpp's defaults, safe on every CPU this build runs on.

    Extra buffer types repack weights for faster CPU kernels; on AMX builds the AMX one is preferred for
    Q4_0/Q4_1/Q8_0/K-quants, and its matmul segfaults on the first decode (llama.cpp#20824, unfixed; seen
    here with SmolLM2's Q4_1). Without them those weights stay in the plain CPU buffer, which works.
    """
    params = C.llama_model_default_params()
    params.use_extra_bufts = not _cpu_has_amx()
    return params


def gpu_offload_supported() -> bool:
    return bool(C.llama_supports_gpu_offload())


class ModelLoadError(RuntimeError):
    pass


class TooManyTokens(ValueError):
    """Text that tokenizes to more tokens than the caller's limit."""

    def __init__(self, count: int, limit: int) -> None:
        super().__init__(f"{count} tokens, more than the limit of {limit}")
        self.count = count
        self.limit = limit


# Called from the loading thread with the fraction of the weights loaded so far (0..1); must return quickly.
LoadProgress = Callable[[float], None]


def _kv_overrides(values: Mapping[str, int]) -> ctypes.Array[C.llama_model_kv_override]:
    """llama.cpp's metadata overrides (integers), in its array form: terminated by an empty key."""
    array = (C.llama_model_kv_override * (len(values) + 1))()
    for entry, (key, value) in zip(array, values.items(), strict=False):
        entry.key = key.encode()
        entry.tag = C.LLAMA_KV_OVERRIDE_TYPE_INT
        entry.value.val_i64 = value
    array[len(values)].key = b""
    return array


def _progress_callback(progress: LoadProgress) -> Any:
    @C.llama_progress_callback
    def report(fraction: float, _user: ctypes.c_void_p) -> bool:
        # An exception escaping a ctypes callback would return False, and False aborts the load.
        with contextlib.suppress(Exception):
            progress(min(max(float(fraction), 0.0), 1.0))
        return True

    return report


class LlamaModel:
    """Weights and vocabulary of one GGUF; may back several contexts."""

    def __init__(self, path: Path, *, n_gpu_layers: int = 0, use_mmap: bool = True,
                 kv_overrides: Mapping[str, int] | None = None, progress: LoadProgress | None = None) -> None:
        """`kv_overrides`: GGUF metadata values to use instead of the file's (integers, e.g.
        `llama.expert_used_count`); `progress`: called as the weights load (from this thread)."""
        init_backend()
        params = default_model_params()
        params.n_gpu_layers = n_gpu_layers
        params.use_mmap = use_mmap
        # Both stay referenced until the load returns: llama.cpp reads them during it.
        overrides = _kv_overrides(kv_overrides) if kv_overrides else None
        if overrides is not None:
            params.kv_overrides = overrides
        callback = _progress_callback(progress) if progress is not None else None
        if callback is not None:
            params.progress_callback = callback
        self.path = path
        ptr = C.llama_model_load_from_file(str(path).encode(), params)
        del overrides, callback
        if not ptr:
            raise ModelLoadError(f"llama.cpp could not load {path.name}: unsupported or corrupt GGUF")
        self.ptr = ptr
        self.vocab = C.llama_model_get_vocab(ptr)
        self.n_vocab: int = C.llama_vocab_n_tokens(self.vocab)
        self.n_embd: int = C.llama_model_n_embd(ptr)
        self.n_ctx_train: int = C.llama_model_n_ctx_train(ptr)
        self.bos_id: int = C.llama_vocab_bos(self.vocab)
        self.eos_id: int = C.llama_vocab_eos(self.vocab)
        self.add_bos: bool = bool(C.llama_vocab_get_add_bos(self.vocab))
        self._eog_ids: frozenset[int] | None = None
        self._pieces: dict[int, bytes] = {}  # the vocabulary never changes: render each piece once
        self._longest_token: int | None = None

    def close(self) -> None:
        if self.ptr:
            C.llama_model_free(self.ptr)
            self.ptr = None

    def is_eog(self, token: int) -> bool:
        return bool(C.llama_vocab_is_eog(self.vocab, token))

    @property
    def eog_ids(self) -> frozenset[int]:
        if self._eog_ids is None:
            self._eog_ids = frozenset(t for t in range(self.n_vocab) if C.llama_vocab_is_eog(self.vocab, t))
        return self._eog_ids

    @property
    def longest_token_bytes(self) -> int:
        """The longest piece any token stands for: text of N bytes is at least N / this many tokens."""
        if self._longest_token is None:
            self._longest_token = max((len(self._render_piece(t, True)) for t in range(self.n_vocab)), default=1)
        return max(self._longest_token, 1)

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True,
                 limit: int | None = None) -> list[int]:
        """The text's tokens; with `limit`, raises TooManyTokens instead of building a longer list (a huge
        prompt would otherwise cost tens of bytes of Python objects per token only to be refused)."""
        data = text.encode("utf-8")
        capacity = len(data) + 8 if limit is None else min(len(data) + 8, limit + 1)
        buf = (C.llama_token * capacity)()
        n = C.llama_tokenize(self.vocab, data, len(data), buf, capacity, add_special, parse_special)
        if n < 0:  # buffer too small: llama.cpp reports the size it needs as -n
            if limit is not None and -n > limit:
                raise TooManyTokens(-n, limit)
            capacity = -n
            buf = (C.llama_token * capacity)()
            n = C.llama_tokenize(self.vocab, data, len(data), buf, capacity, add_special, parse_special)
        if limit is not None and n > limit:
            raise TooManyTokens(n, limit)
        return list(buf[:n])

    def token_bytes(self, token: int, *, special: bool = False) -> bytes:
        key = token if special else ~token
        piece = self._pieces.get(key)
        if piece is None:
            piece = self._pieces[key] = self._render_piece(token, special)
        return piece

    def _render_piece(self, token: int, special: bool) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = C.llama_token_to_piece(self.vocab, token, buf, 64, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = C.llama_token_to_piece(self.vocab, token, buf, -n, 0, special)
        return buf.raw[:n]

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> str:
        return b"".join(self.token_bytes(t, special=special) for t in tokens).decode("utf-8", "replace")

    def token_text(self, token: int) -> bytes:
        """The vocabulary entry itself (not its rendered piece): what draft-compatibility checks compare."""
        return C.llama_vocab_get_text(self.vocab, token) or b""

    @property
    def vocab_type(self) -> int:
        return C.llama_vocab_type(self.vocab)

    @property
    def add_eos(self) -> bool:
        return bool(C.llama_vocab_get_add_eos(self.vocab))

    @property
    def keeps_state(self) -> bool:
        """Recurrent or hybrid: its cache cannot drop a suffix, so rejected draft tokens cannot be undone."""
        return bool(C.llama_model_is_recurrent(self.ptr) or C.llama_model_is_hybrid(self.ptr))

    @property
    def windowed(self) -> bool:
        """Sliding-window attention: cells past the window are dropped, so an old prefix may be incomplete."""
        return C.llama_model_n_swa(self.ptr) > 0

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(256)
        n = C.llama_model_meta_val_str(self.ptr, key.encode(), buf, 256)
        if n < 0:
            return None
        if n >= 256:
            buf = ctypes.create_string_buffer(n + 1)
            C.llama_model_meta_val_str(self.ptr, key.encode(), buf, n + 1)
        return buf.value.decode("utf-8", "replace")


@dataclass(frozen=True)
class ContextConfig:
    n_ctx: int
    n_seq_max: int
    n_batch: int = 512
    n_threads: int = 0  # 0 = default_thread_count()
    embeddings: bool = False
    flash_attention: bool | None = None  # None = let llama.cpp decide
    offload_kv_cache: bool = True


class LlamaContext:
    """One llama_context with a unified KV cache shared by `n_seq_max` sequences."""

    def __init__(self, model: LlamaModel, config: ContextConfig) -> None:
        params = C.llama_context_default_params()
        params.n_ctx = config.n_ctx
        # Every step decodes one token per generating sequence: the batch must hold at least that many.
        params.n_batch = params.n_ubatch = max(config.n_batch, config.n_seq_max)
        params.n_seq_max = config.n_seq_max
        threads = config.n_threads or default_thread_count()
        params.n_threads = threads
        params.n_threads_batch = threads
        params.kv_unified = True
        params.embeddings = config.embeddings
        params.offload_kqv = config.offload_kv_cache
        params.no_perf = True
        if config.flash_attention is not None:
            params.flash_attn_type = (
                C.LLAMA_FLASH_ATTN_TYPE_ENABLED if config.flash_attention else C.LLAMA_FLASH_ATTN_TYPE_DISABLED
            )
        ptr = C.llama_init_from_model(model.ptr, params)
        if not ptr:
            raise ModelLoadError(
                f"llama.cpp could not create a context of {config.n_ctx} tokens for {model.path.name} "
                "(out of memory?)"
            )
        self.ptr = ptr
        self.model = model
        self.config = config
        self.n_ctx: int = C.llama_n_ctx(ptr)
        self.memory = C.llama_get_memory(ptr)
        # llama.cpp caps n_batch at the requested n_ctx; a fuller batch aborts the process (GGML_ASSERT).
        self.n_batch: int = C.llama_n_batch(ptr)
        self.batch = TokenBatch(self.n_batch)
        self._embd_batch: EmbeddingBatch | None = None

    def close(self) -> None:
        if self.ptr:
            self.batch.close()
            if self._embd_batch is not None:
                self._embd_batch.close()
            C.llama_free(self.ptr)
            self.ptr = None

    def decode(self) -> int:
        return C.llama_decode(self.ptr, self.batch.raw)

    def decode_embeddings(self, rows: npt.NDArray[np.float32], pos: int, seq: int) -> int:
        """Decodes input embeddings (an image's rows, at most n_batch of them) into `seq` from `pos`, no logits;
        llama_decode's result (0: done)."""
        if self._embd_batch is None:
            self._embd_batch = EmbeddingBatch(self.n_batch, self.model.n_embd)
        self._embd_batch.fill(rows, pos, seq)
        return C.llama_decode(self.ptr, self._embd_batch.raw)

    def seq_remove(self, seq: int, start: int = -1, end: int = -1) -> bool:
        return bool(C.llama_memory_seq_rm(self.memory, seq, start, end))

    def seq_copy(self, source: int, target: int, start: int, end: int) -> None:
        """Makes `target` share `source`'s cells for positions [start, end): the unified cache tags the
        same cells with both sequences, so nothing is computed or copied."""
        C.llama_memory_seq_cp(self.memory, source, target, start, end)

    def sequence_state_size(self, seq: int) -> int:
        return int(C.llama_state_seq_get_size(self.ptr, seq))

    def save_sequence(self, seq: int) -> npt.NDArray[np.uint8]:
        """One sequence's KV cells (positions and K/V rows) as a host buffer for `restore_sequence`."""
        size = self.sequence_state_size(seq)
        buffer = np.empty(size, np.uint8)  # not zero-filled first: a third of the time for a ctypes array
        written = C.llama_state_seq_get_data(self.ptr, buffer.ctypes.data_as(_BYTES), size, seq)
        if written != size:
            raise RuntimeError(f"llama.cpp saved {written} of {size} bytes of sequence {seq}")
        return buffer

    def restore_sequence(self, buffer: npt.NDArray[np.uint8], seq: int) -> bool:
        """Writes a saved sequence back under `seq` (which must be empty); False if the cache has no room."""
        return C.llama_state_seq_set_data(self.ptr, buffer.ctypes.data_as(_BYTES), buffer.nbytes, seq) > 0

    def seq_pos_max(self, seq: int) -> int:
        return C.llama_memory_seq_pos_max(self.memory, seq)

    def clear(self) -> None:
        C.llama_memory_clear(self.memory, True)

    def logits(self, batch_index: int, n_vocab: int) -> npt.NDArray[np.float32]:
        """A view (no copy) of one output's logits; valid until the next decode."""
        return np.ctypeslib.as_array(C.llama_get_logits_ith(self.ptr, batch_index), shape=(n_vocab,))

    def sequence_embedding(self, seq: int, n_embd: int) -> list[float]:
        ptr = C.llama_get_embeddings_seq(self.ptr, seq)
        if not ptr:
            raise RuntimeError("model produced no pooled embedding (pooling type none?)")
        return ptr[:n_embd]

    def token_embedding(self, batch_index: int, n_embd: int) -> list[float]:
        return C.llama_get_embeddings_ith(self.ptr, batch_index)[:n_embd]

    def pooling_type(self) -> int:
        return C.llama_pooling_type(self.ptr)


class TokenBatch:
    """A reusable llama_batch; each token belongs to exactly one sequence."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.raw = C.llama_batch_init(capacity, 0, 1)
        self._token = self.raw.token
        self._pos = self.raw.pos
        self._n_seq_id = self.raw.n_seq_id
        self._seq_id = self.raw.seq_id
        self._logits = self.raw.logits
        self.n_tokens = 0

    def clear(self) -> None:
        self.n_tokens = 0
        self.raw.n_tokens = 0

    def add(self, token: int, pos: int, seq: int, output: bool) -> int:
        """Appends one token and returns its index in the batch (the index its logits are read at)."""
        i = self.n_tokens
        self._token[i] = token
        self._pos[i] = pos
        self._n_seq_id[i] = 1
        self._seq_id[i][0] = seq
        self._logits[i] = output
        self.n_tokens = i + 1
        self.raw.n_tokens = i + 1
        return i

    @property
    def free(self) -> int:
        return self.capacity - self.n_tokens

    def close(self) -> None:
        if self.raw is not None:
            C.llama_batch_free(self.raw)
            self.raw = None


class EmbeddingBatch:
    """A reusable llama_batch of input embeddings for one sequence (token ids are NULL in such a batch)."""

    def __init__(self, capacity: int, n_embd: int) -> None:
        self.capacity = capacity
        self.n_embd = n_embd
        self.raw = C.llama_batch_init(capacity, n_embd, 1)

    def fill(self, rows: npt.NDArray[np.float32], pos: int, seq: int) -> None:
        n = rows.shape[0]
        if n > self.capacity or rows.shape[1] != self.n_embd:
            raise ValueError(f"{rows.shape} embeddings do not fit a batch of {self.capacity} x {self.n_embd}")
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        ctypes.memmove(self.raw.embd, rows.ctypes.data, rows.nbytes)
        raw = self.raw
        for i in range(n):
            raw.pos[i] = pos + i
            raw.n_seq_id[i] = 1
            raw.seq_id[i][0] = seq
            raw.logits[i] = False
        raw.n_tokens = n

    def close(self) -> None:
        if self.raw is not None:
            C.llama_batch_free(self.raw)
            self.raw = None


class SamplerChain:
    """A llama.cpp sampler chain owned by one request."""

    def __init__(self) -> None:
        params = C.llama_sampler_chain_default_params()
        params.no_perf = True
        self.ptr = C.llama_sampler_chain_init(params)

    def add(self, sampler: ctypes.c_void_p) -> None:
        C.llama_sampler_chain_add(self.ptr, sampler)

    def sample(self, ctx: LlamaContext, batch_index: int) -> int:
        # Samples and accepts the token into every sampler of the chain (penalties, grammar).
        return C.llama_sampler_sample(self.ptr, ctx.ptr, batch_index)

    def close(self) -> None:
        if self.ptr:
            C.llama_sampler_free(self.ptr)
            self.ptr = None


def logit_bias_sampler(n_vocab: int, bias: dict[int, float]) -> ctypes.c_void_p:
    entries = (C.llama_logit_bias * len(bias))()
    for entry, (token, value) in zip(entries, bias.items(), strict=True):
        entry.token = token
        entry.bias = value
    return C.llama_sampler_init_logit_bias(n_vocab, len(bias), entries)


def penalties_sampler(
    n_vocab: int, last_n: int, repeat: float, frequency: float, presence: float, history: Sequence[int]
) -> ctypes.c_void_p:
    sampler = C.llama_sampler_init_penalties(n_vocab, last_n, repeat, frequency, presence)
    # The prompt counts as history for repetition, as in llama-server.
    for token in history[-last_n:] if last_n > 0 else history:
        C.llama_sampler_accept(sampler, token)
    return sampler


def grammar_sampler(model: LlamaModel, grammar: str, root: str = "root") -> ctypes.c_void_p:
    sampler = C.llama_sampler_init_grammar(model.vocab, grammar.encode(), root.encode())
    if not sampler:
        raise ValueError("invalid grammar")
    return sampler


top_k_sampler = C.llama_sampler_init_top_k
top_p_sampler = C.llama_sampler_init_top_p
min_p_sampler = C.llama_sampler_init_min_p
temperature_sampler = C.llama_sampler_init_temp
distribution_sampler = C.llama_sampler_init_dist
greedy_sampler = C.llama_sampler_init_greedy
