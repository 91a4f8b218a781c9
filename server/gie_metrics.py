"""The gauges the Gateway API Inference Extension's endpoint picker scrapes, under vLLM's names.

The picker (GIE's reference picker, llm-d-router) reads a model server's queue, running requests and KV-cache
use from `/metrics` to choose a pod per request, with the metric names of the engine a pod's
`llm-d.ai/engine-type` label names; vLLM's are the default. So lmkube exports, per loaded generation model,
labelled `model_name="<instance id>"` as vLLM labels its served model:

- `vllm:num_requests_waiting`: requests queued for a free slot (the same count as `llamacpp:requests_deferred`).
- `vllm:num_requests_running`: requests holding a slot (`llamacpp:requests_processing`).
- `vllm:kv_cache_usage_perc`: 0-1, KV cells the running requests hold over the context's cells. Idle slots'
  reusable prefixes are not counted: the engine drops them the moment a request needs the room, the way
  vLLM counts its evictable prefix-cache blocks as free. (`llamacpp:kv_cache_usage_ratio` counts them.)
- `vllm:cache_config_info`: value 1, the cache's shape in labels. llama.cpp allocates KV per token cell, not in
  blocks; lmkube reports it in blocks of `BLOCK_SIZE` tokens (vLLM's default) so the picker's prefix-cache
  scorer, which hashes prompts per block and matches a bounded number of blocks, covers prompts as long as it
  does for vLLM; `num_gpu_blocks` is the context's cells in such blocks (`block_size * num_gpu_blocks` is the
  context length). The cells live wherever llama.cpp put them (GPU or host memory); the name is vLLM's.

Embedding models have no KV cache the picker could weigh and are left out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .engine.generation import GenerationEngine
from .runtime.manager import ModelManager

if TYPE_CHECKING:  # metrics.py imports this module to write these families
    from .metrics import Exposition, Labels

BLOCK_SIZE = 16


def write_gie_gauges(out: Exposition, manager: ModelManager) -> None:
    engines: list[tuple[Labels, GenerationEngine]] = [
        ((("model_name", i.id),), i.engine) for i in manager.loaded() if isinstance(i.engine, GenerationEngine)]
    out.family("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.",
               ((labels, engine.queued) for labels, engine in engines))
    out.family("vllm:num_requests_running", "gauge", "Number of requests in model execution batches.",
               ((labels, engine.active) for labels, engine in engines))
    out.family("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.",
               ((labels, min(engine.kv_tokens_in_use / engine.n_ctx, 1.0)) for labels, engine in engines))
    out.family("vllm:cache_config_info", "gauge", "Information of the LLMEngine CacheConfig",
               (((*labels, ("block_size", str(BLOCK_SIZE)), ("num_gpu_blocks", str(engine.n_ctx // BLOCK_SIZE)),
                  ("enable_prefix_caching", "True")), 1) for labels, engine in engines))
