"""A loaded model: weights, its engine, its chat template and its idle clock."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

from ..config import RuntimeSettings, SamplingDefaults
from ..engine import llama_lib as lib
from ..engine.embedding import EmbeddingEngine
from ..engine.generation import GenerationEngine
from ..engine.speculative import Drafter, DraftPool, load_drafter
from ..engine.stats import EngineStats
from ..engine.vision import Projector
from ..store.model_store import ModelVariant
from .chat_template import ChatTemplate, ChatTemplateError
from .estimate import context_size
from .host_memory import host_cache_budget, host_memory

# GPU offload: "max" puts every layer on the GPU, "off" none, a fraction that share of the layers.
GpuOffload = Literal["max", "off"] | float
ALL_LAYERS = 999  # llama.cpp clamps to the model's layer count

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadConfig:
    context_length: int | None = None  # None: the server default, capped at the trained context
    parallel: int = RuntimeSettings.parallel  # the loads the server makes pass its own --parallel
    eval_batch_size: int = 512
    flash_attention: bool | None = None
    offload_kv_cache_to_gpu: bool = True
    gpu: GpuOffload = "max"
    ttl: float | None = None  # idle seconds before unloading; None: never
    identifier: str | None = None
    draft_model: str | None = None  # speculative decoding: the default draft for requests naming none
    num_experts: int | None = None  # MoE models: experts used per token (None: the model's own number)


def gpu_layers(offload: GpuOffload, n_layers: int) -> int:
    if not lib.gpu_offload_supported() or offload == "off":
        return 0
    if offload == "max":
        return ALL_LAYERS
    return round(float(offload) * (n_layers + 1))  # +1: the output layer counts as one in llama.cpp


def check_num_experts(variant: ModelVariant, num_experts: int) -> None:
    """Raises ValueError unless `num_experts` suits the model: llama.cpp aborts the whole process on a number
    above its expert count, and a dense model has no experts to choose."""
    if variant.expert_count is None:
        raise ValueError(f"\"{variant.model_key}\" is not a mixture-of-experts model: it has no experts to set "
                         "(num_experts applies to MoE models only).")
    if not 1 <= num_experts <= variant.expert_count:
        raise ValueError(f"num_experts must be between 1 and {variant.expert_count} (the experts per layer of "
                         f"\"{variant.model_key}\"), got {num_experts}.")


def expert_override(variant: ModelVariant, config: LoadConfig) -> dict[str, int] | None:
    """llama.cpp's metadata override for the experts each token uses (`<arch>.expert_used_count`)."""
    if config.num_experts is None:
        return None
    check_num_experts(variant, config.num_experts)
    return {f"{variant.architecture}.expert_used_count": config.num_experts}


class ModelInstance:
    def __init__(
        self,
        instance_id: str,
        variant: ModelVariant,
        config: LoadConfig,
        *,
        default_context: int,
        n_threads: int,
        jit: bool,
        max_queue: int | None = None,
        cache_ram_mib: int = 0,
        stats: EngineStats | None = None,
        resolve: Callable[[str], ModelVariant] | None = None,
        progress: lib.LoadProgress | None = None,
        sampling_defaults: SamplingDefaults | None = None,
    ) -> None:
        """`progress`: told the fraction of the weights loaded, from the loading thread (llama.cpp's callback)."""
        self.id = instance_id
        self._resolve = resolve
        self._drafts = DraftPool()
        self.default_draft: Drafter | None = None
        self.variant = variant
        self.jit = jit
        # What its requests sample with where they set nothing.
        self.sampling_defaults = sampling_defaults or SamplingDefaults()
        self.ttl = config.ttl
        started = time.perf_counter()
        n_gpu_layers = gpu_layers(config.gpu, variant.block_count or 0)
        self.model = lib.LlamaModel(variant.path, n_gpu_layers=n_gpu_layers,
                                    kv_overrides=expert_override(variant, config), progress=progress)
        self.projector: Projector | None = None  # vision: the projector file next to the model
        try:
            if variant.mmproj_path is not None and not variant.is_embedding:
                self.projector = Projector(variant.mmproj_path, self.model, n_threads=n_threads,
                                           use_gpu=n_gpu_layers > 0)
            n_ctx = context_size(config.context_length, default_context=default_context,
                                 trained=self.model.n_ctx_train, parallel=config.parallel,
                                 embedding=variant.is_embedding)
            settings: dict[str, Any] = dict(
                n_threads=n_threads,
                flash_attention=config.flash_attention,
                offload_kv_cache=config.offload_kv_cache_to_gpu,
                n_seq_max=config.parallel,
            )
            self.engine: GenerationEngine | EmbeddingEngine
            if variant.is_embedding:
                # Non-causal models need each input inside one ubatch, so the batch spans the context.
                context = lib.LlamaContext(
                    self.model, lib.ContextConfig(n_ctx=n_ctx, n_batch=n_ctx, embeddings=True, **settings)
                )
                self.engine = EmbeddingEngine(self.model, context, name=instance_id, max_queue=max_queue,
                                              stats=stats)
            else:
                # A batch larger than the context only wastes memory (and past 2**32 wraps to nonsense).
                n_batch = min(config.eval_batch_size, n_ctx)
                self._context_config = lib.ContextConfig(n_ctx=n_ctx, n_batch=n_batch, **settings)
                self._n_gpu_layers = n_gpu_layers
                context = lib.LlamaContext(self.model, self._context_config)
                cache_bytes = host_cache_budget(cache_ram_mib << 20, host_memory())  # with the model in memory
                if cache_bytes < cache_ram_mib << 20:
                    log.info("%s: host prompt cache capped at %d MiB (of --cache-ram %d) by the memory limit",
                             instance_id, cache_bytes >> 20, cache_ram_mib)
                self.engine = GenerationEngine(self.model, context, name=instance_id, max_queue=max_queue,
                                               stats=stats, host_cache_bytes=cache_bytes, projector=self.projector)
                n_ctx = context.n_ctx  # llama.cpp rounds the context up (to 256); report what it really holds
                if config.draft_model:
                    self.default_draft = self.drafter(config.draft_model)
        except BaseException:
            if hasattr(self, "engine"):
                self.engine.close()
            self._drafts.close()
            if self.projector is not None:
                self.projector.close()
            self.model.close()
            raise
        self.context_length = n_ctx
        self.config = config
        self.load_seconds = time.perf_counter() - started
        self.loaded_at = time.time()
        self.last_used = time.monotonic()
        self.in_flight = 0
        self.claims = 0  # requests a JIT load handed this instance that have not started using it yet
        self.closing = False  # set when the unload starts; a request must not start on it after that
        special = {"bos_token": self._special_text(self.model.bos_id),
                   "eos_token": self._special_text(self.model.eos_id)}
        try:
            self.template = ChatTemplate(variant.chat_template, **special)
        except ChatTemplateError as exc:
            # Still load (completions and embeddings need no template); chat requests get this error as a 400.
            log.warning("%s: %s", instance_id, exc)
            self.template = ChatTemplate(f"{{{{ raise_exception({json.dumps(str(exc))}) }}}}", **special)

    def drafter(self, name: str) -> Drafter:
        """The draft model `name` (a model key in the store), loaded on first use and kept until unload.

        Raises ModelNotFound, DraftIncompatible or ModelLoadError. Blocks while loading."""
        if self._resolve is None or self.type != "llm":
            raise ValueError("this instance cannot use a draft model")
        variant = self._resolve(name)
        config = self._context_config
        return self._drafts.get(variant.key, lambda: load_drafter(
            variant.model_key, variant.path, self.model, config, self._n_gpu_layers))

    def _special_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self.model.token_bytes(token, special=True).decode("utf-8", "replace")

    @property
    def type(self) -> Literal["llm", "embedding"]:
        return "embedding" if isinstance(self.engine, EmbeddingEngine) else "llm"

    @contextmanager
    def in_use(self) -> Iterator[ModelInstance]:
        """Marks the instance busy for the duration; the idle TTL counts from the end of the last use."""
        self.in_flight += 1
        self.last_used = time.monotonic()
        try:
            yield self
        finally:
            self.in_flight -= 1
            self.last_used = time.monotonic()

    @property
    def busy(self) -> bool:
        """Serving, queued or promised to a request: unloading now would fail or crash that request."""
        return self.in_flight > 0 or self.claims > 0 or self.engine.active > 0 or self.engine.queued > 0

    def idle_expired(self, now: float) -> bool:
        return self.ttl is not None and not self.busy and now - self.last_used >= self.ttl

    def close(self) -> None:
        self.engine.close()
        self._drafts.close()  # after the engine thread, the drafters' only user, has stopped
        if self.projector is not None:
            self.projector.close()
        self.model.close()
