"""Memory a load will take, from the GGUF header alone (no weights read, no llama.cpp needed).

The basis of `POST /api/v1/models/load {"estimate_only": true}` and of the operator's fit check. It
mirrors how this server creates the context (instance.py, engine/llama_lib.py) and how llama.cpp sizes
its buffers:

- weights: the tensors' data sizes. llama.cpp keeps the input embedding on the host and offloads the
  last `n_gpu_layers` blocks, the output layer counting as one more (a tied output is copied to the GPU).
- KV cache: one unified cache of `n_ctx` cells shared by all parallel slots (the context is not
  multiplied by `parallel`), F16 K and V: n_ctx × Σ_layers n_head_kv × (key_length + value_length) × 2
  bytes, on the GPU for offloaded layers when the KV offload is on. Encoder-only (embedding) models
  have no KV cache.
- compute buffer: the peak of llama.cpp's graph for one ubatch (`n_ub` tokens). Without flash attention
  the KQ scores dominate (n_ctx × n_ub × n_head × 4 bytes, plus the F32 mask); with it, the larger of
  the logits (n_vocab × n_ub × 4) and the FFN activations plus the F16 mask. Fitted to llama.cpp's own
  "compute buffer size" reports within a few MiB (tests/test_memory_estimate.py).
- output buffer (logits of one token per slot) and a small runtime overhead (tokenizer tables, threads).
- a draft model (speculative decoding, `draft_model` on load): its weights and a context of its own, created
  with the target's exact context settings (engine/speculative.py `load_drafter`): the target's context
  length even past the draft's trained one, the same slots and batch, and the target's GPU layer count
  (clamped to the draft's layers). Reported apart (`draft`); the totals include it.

The compute buffer is reserved at load but only the part a batch actually uses is ever touched, so a
freshly loaded model's RSS is lower than `total_bytes` by up to that buffer; the estimate is what the
process may come to use, which is what a fit check needs.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

from ..store.gguf_header import GGUFHeader, TensorInfo, read_gguf_header
from .host_memory import host_memory

GpuOffload = Literal["max", "off"] | float
MIB = 1 << 20
KV_BYTES_PER_ELEMENT = 2  # F16 K and V: llama.cpp's default cache type
CTX_PAD = 256  # llama.cpp rounds the context up to a multiple of this
OVERHEAD_BYTES = 4 * MIB  # threads, graph metadata, allocator slack
VOCAB_ENTRY_BYTES = 200  # tokenizer tables per vocabulary entry (token text, maps, scores)
_LAYER = re.compile(r"^blk\.(\d+)\.")


@dataclass(frozen=True)
class Breakdown:
    weights: int
    kv_cache: int
    compute: int
    output: int
    overhead: int


@dataclass(frozen=True)
class MemoryEstimate:
    context_length: int
    parallel: int
    batch_size: int  # tokens per ubatch
    flash_attention: bool
    n_layers: int
    gpu_layers: int  # blocks plus the output layer placed on the GPU
    gpu_bytes: int
    total_bytes: int  # GPU and host together (the draft's included)
    breakdown: Breakdown  # this model's own parts
    draft: MemoryEstimate | None = None  # the draft model's share, already in gpu_bytes and total_bytes
    projector_bytes: int = 0  # the vision projector's weights (its file), already in total_bytes

    @property
    def host_bytes(self) -> int:
        return self.total_bytes - self.gpu_bytes

    def as_dict(self) -> dict[str, Any]:
        body = {"gpu_bytes": self.gpu_bytes, "host_bytes": self.host_bytes, "total_bytes": self.total_bytes,
                "breakdown": asdict(self.breakdown)}
        if self.draft is not None:
            body["draft"] = self.draft.as_dict()
        if self.projector_bytes:
            body["projector_bytes"] = self.projector_bytes
        return body


def n_gpu_layers(offload: GpuOffload, n_layers: int, gpu_supported: bool) -> int:
    """How many of the n_layers blocks + the output layer go to the GPU (instance.gpu_layers, clamped)."""
    if not gpu_supported or offload == "off":
        return 0
    if offload == "max":
        return n_layers + 1
    return min(n_layers + 1, round(float(offload) * (n_layers + 1)))


def context_size(requested: int | None, *, default_context: int, trained: int | None, parallel: int,
                 embedding: bool = False) -> int:
    """The context a load asks llama.cpp for: the request's (else the server default, for embedding models
    the trained one), capped at the trained context, and never fewer cells than parallel slots.

    llama.cpp caps a causal model's batch at the requested context; a batch smaller than the slots that
    each decode one token per step aborts the whole process (GGML_ASSERT on n_outputs_max), so a tiny
    `context_length` or `--ctx-size` is raised rather than passed on."""
    trained = trained or default_context
    wanted = requested or (trained if embedding else default_context)
    return max(min(wanted, trained), parallel)


def _per_layer(value: Any, n_layers: int, default: int) -> list[int]:
    """A hyperparameter that may be one number or one per layer (several architectures vary it)."""
    if isinstance(value, list):
        values = [int(v) for v in value[:n_layers]]
        return values + [default] * (n_layers - len(values))
    return [int(value) if isinstance(value, int | float) and not isinstance(value, bool) else default] * n_layers


def _headers(files: list[Path]) -> list[GGUFHeader]:
    return [read_gguf_header(path, check_size=False) for path in files]


def estimate_memory(
    files: list[Path],
    *,
    context_length: int | None,
    default_context: int,
    parallel: int,
    eval_batch_size: int = 512,
    flash_attention: bool | None = None,
    offload_kv_cache: bool = True,
    gpu: GpuOffload = "max",
    gpu_supported: bool = False,
    embedding: bool = False,
    draft_files: list[Path] | None = None,
    projector_file: Path | None = None,
) -> MemoryEstimate:
    estimate = _with_draft(files, context_length=context_length, default_context=default_context,
                           parallel=parallel, eval_batch_size=eval_batch_size, flash_attention=flash_attention,
                           offload_kv_cache=offload_kv_cache, gpu=gpu, gpu_supported=gpu_supported,
                           embedding=embedding, draft_files=draft_files)
    if projector_file is None or embedding:
        return estimate
    # libmtmd loads the whole projector (weights as in the file) on the GPU when the model is offloaded.
    size = projector_file.stat().st_size
    on_gpu = size if estimate.gpu_layers > 0 else 0
    return replace(estimate, projector_bytes=size, total_bytes=estimate.total_bytes + size,
                   gpu_bytes=estimate.gpu_bytes + on_gpu)


def _with_draft(
    files: list[Path],
    *,
    context_length: int | None,
    default_context: int,
    parallel: int,
    eval_batch_size: int,
    flash_attention: bool | None,
    offload_kv_cache: bool,
    gpu: GpuOffload,
    gpu_supported: bool,
    embedding: bool,
    draft_files: list[Path] | None,
) -> MemoryEstimate:
    headers = _headers(files)
    shape = _Shape.of(headers[0])
    # The context and batch exactly as instance.py and llama_lib.py create them.
    n_ctx = context_size(context_length, default_context=default_context, trained=shape.trained,
                         parallel=parallel, embedding=embedding)
    n_ub = n_ctx if embedding else max(min(eval_batch_size, n_ctx), parallel)
    settings = _Settings(n_ctx=-(-n_ctx // CTX_PAD) * CTX_PAD, n_ub=n_ub, parallel=parallel,
                         fa=True if flash_attention is None else flash_attention,  # llama.cpp's "auto": on
                         offload_kv_cache=offload_kv_cache, embedding=embedding)
    gpu_layers = n_gpu_layers(gpu, shape.n_layers, gpu_supported)
    target = _estimate(headers, shape, settings, gpu_layers)
    if not draft_files or embedding:  # an embedding instance never loads its draft
        return target
    draft_headers = _headers(draft_files)
    draft_shape = _Shape.of(draft_headers[0])
    # instance.py hands the draft the target's layer count (all of them for "max"); llama.cpp clamps it.
    draft_layers = n_gpu_layers("max", draft_shape.n_layers, gpu_supported) if gpu == "max" else min(
        gpu_layers, draft_shape.n_layers + 1)
    draft = _estimate(draft_headers, draft_shape, settings, draft_layers)
    return replace(target, gpu_bytes=target.gpu_bytes + draft.gpu_bytes,
                   total_bytes=target.total_bytes + draft.total_bytes, draft=draft)


@dataclass(frozen=True)
class _Shape:
    """The hyperparameters the estimate needs, from a GGUF header."""

    n_layers: int
    n_embd: int
    n_head: int
    heads_kv: list[int]
    key_length: int
    value_length: int
    n_ff: int
    n_vocab: int
    trained: int  # 0 when the header does not say

    @classmethod
    def of(cls, header: GGUFHeader) -> _Shape:
        meta = header.metadata
        arch = meta.get("general.architecture", "llama")

        def hp(key: str, default: Any = None) -> Any:
            return meta.get(f"{arch}.{key}", default)

        n_layers = int(hp("block_count", 0) or 0)
        n_embd = int(hp("embedding_length", 0) or 0)
        heads = _per_layer(hp("attention.head_count"), n_layers, 1)
        n_head = max(heads, default=1)
        head_dim = n_embd // n_head if n_head else 0
        tokens = meta.get("tokenizer.ggml.tokens")
        return cls(
            n_layers=n_layers, n_embd=n_embd, n_head=n_head,
            heads_kv=_per_layer(hp("attention.head_count_kv"), n_layers, n_head),
            key_length=int(hp("attention.key_length", head_dim) or head_dim),
            value_length=int(hp("attention.value_length", head_dim) or head_dim),
            n_ff=max(_per_layer(hp("feed_forward_length"), n_layers, 4 * n_embd), default=4 * n_embd),
            n_vocab=len(tokens) if tokens is not None else int(hp("vocab_size", 32000) or 32000),
            trained=int(hp("context_length", 0) or 0),
        )


@dataclass(frozen=True)
class _Settings:
    """The context as created: n_ctx already padded, n_ub tokens per ubatch."""

    n_ctx: int
    n_ub: int
    parallel: int
    fa: bool
    offload_kv_cache: bool
    embedding: bool


def _estimate(headers: list[GGUFHeader], shape: _Shape, settings: _Settings, gpu_layers: int) -> MemoryEstimate:
    """One model and its context: weights, KV cache, compute and output buffers, overhead."""
    n_layers, n_embd, n_vocab = shape.n_layers, shape.n_embd, shape.n_vocab
    n_ctx, n_ub, parallel, embedding = settings.n_ctx, settings.n_ub, settings.parallel, settings.embedding
    first_gpu_layer = n_layers + 1 - gpu_layers  # llama.cpp offloads the last blocks
    output_on_gpu = gpu_layers > 0

    weights = gpu_weights = 0
    tensors: list[TensorInfo] = [t for h in headers for t in h.tensors]
    has_output = any(t.name == "output.weight" for t in tensors)
    for tensor in tensors:
        size = tensor.nbytes or 0
        weights += size
        if (match := _LAYER.match(tensor.name)) is not None:
            on_gpu = int(match.group(1)) >= first_gpu_layer
        else:
            on_gpu = output_on_gpu and tensor.name.startswith("output")
        if on_gpu:
            gpu_weights += size
        if tensor.name == "token_embd.weight" and not has_output and output_on_gpu:
            gpu_weights += size  # a tied output layer: llama.cpp loads a second copy onto the GPU
            weights += size

    kv = gpu_kv = 0
    if not embedding:
        for layer in range(n_layers):
            size = n_ctx * shape.heads_kv[layer] * (shape.key_length + shape.value_length) * KV_BYTES_PER_ELEMENT
            kv += size
            if settings.offload_kv_cache and layer >= first_gpu_layer:
                gpu_kv += size

    activations = n_ub * n_embd * 4
    logits_peak = n_vocab * n_ub * 4 + 2 * activations
    if settings.fa:
        attention_peak = 3 * shape.n_ff * n_ub * 4 + n_ctx * n_ub * 2 + 2 * activations
    else:
        attention_peak = n_ctx * n_ub * shape.n_head * 4 + n_ctx * n_ub * 4 + 6 * activations
    compute = max(logits_peak, attention_peak)
    gpu_compute = 0
    if gpu_layers > 0:
        # Offloaded layers compute on the GPU; the host keeps a full buffer only while some blocks stay there.
        gpu_compute = compute
        compute = compute if first_gpu_layer > 0 else 2 * activations
    output = n_vocab * parallel * 4 + (n_embd * parallel * 4 if embedding else 0)
    overhead = OVERHEAD_BYTES + n_vocab * VOCAB_ENTRY_BYTES

    gpu_bytes = gpu_weights + gpu_kv + gpu_compute
    host_bytes = (weights - gpu_weights) + (kv - gpu_kv) + compute + output + overhead
    return MemoryEstimate(
        context_length=n_ctx, parallel=parallel, batch_size=n_ub, flash_attention=settings.fa, n_layers=n_layers,
        gpu_layers=gpu_layers, gpu_bytes=gpu_bytes, total_bytes=gpu_bytes + host_bytes,
        breakdown=Breakdown(weights=weights, kv_cache=kv, compute=compute + gpu_compute, output=output,
                            overhead=overhead),
    )


def available_memory() -> dict[str, int | None]:
    """Host RAM available now (MemAvailable, or less under a memory-limited cgroup: runtime/host_memory.py), the
    cgroup memory limit that caps it (None when it is the machine's MemAvailable), and free GPU memory where
    nvidia-smi reports it."""
    host = host_memory()
    return {"ram_bytes": host.available, "gpu_bytes": _gpu_free_bytes(), "ram_limit_bytes": host.limit}


def _gpu_free_bytes() -> int | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.free", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=5, check=True).stdout
        return sum(int(v) for v in out.split()) * MIB
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def fits(estimate: MemoryEstimate, available: dict[str, int | None]) -> bool:
    """Whether the host part fits the available RAM and the GPU part the free GPU memory (when known)."""
    ram, gpu = available.get("ram_bytes"), available.get("gpu_bytes")
    if ram is not None and estimate.host_bytes > ram:
        return False
    return not (gpu is not None and estimate.gpu_bytes > gpu)
