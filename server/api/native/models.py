"""GET /api/v1/models, POST /api/v1/models/load and /api/v1/models/unload."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Annotated, Any

from fastapi import Depends

from ...chat.reasoning import ReasoningStyle, detect_reasoning_style
from ...engine.llama_lib import ModelLoadError, gpu_offload_supported
from ...engine.speculative import DraftIncompatible
from ...errors import APIError, api_error_body
from ...runtime.estimate import available_memory, estimate_memory, fits
from ...runtime.instance import LoadConfig, ModelInstance, check_num_experts
from ...runtime.manager import ModelManager
from ...runtime.progress import Listener
from ...store.model_store import ModelEntry, ModelNotFound
from ...streaming import EventStreamResponse, sse_event
from ..deps import get_manager
from ..inference import model_not_found
from .schemas import LoadRequest, UnloadRequest

LOAD_PATH = "/api/v1/models/load"


def instance_config(instance: ModelInstance) -> dict[str, Any]:
    if instance.type == "embedding":
        return {"context_length": instance.context_length}
    config = instance.config
    reported: dict[str, Any] = {
        "context_length": instance.context_length,
        "eval_batch_size": config.eval_batch_size,
        "parallel": config.parallel,
        "flash_attention": config.flash_attention is not False,
        "offload_kv_cache_to_gpu": config.offload_kv_cache_to_gpu,
    }
    if instance.variant.expert_count is not None:  # MoE models only, as LM Studio reports it
        reported["num_experts"] = config.num_experts or instance.variant.expert_used_count
    return reported


def reasoning_capability(template: str | None) -> dict[str, Any] | None:
    """LM Studio's `capabilities.reasoning`: which `reasoning` settings the model's template honours."""
    style = detect_reasoning_style(template)
    if style is ReasoningStyle.HARMONY:
        return {"allowed_options": ["low", "medium", "high"], "default": "medium"}
    if style is ReasoningStyle.THINK_TAGS:
        options = ["off", "on"] if template and "enable_thinking" in template else ["on"]
        return {"allowed_options": options, "default": "on"}
    return None


def model_info(entry: ModelEntry, instances: list[ModelInstance]) -> dict[str, Any]:
    selected = entry.default_variant
    assert selected is not None
    info: dict[str, Any] = {
        "type": entry.type,
        "publisher": entry.publisher,
        "key": entry.key,
        "display_name": entry.display_name,
    }
    if entry.type == "llm":
        info["architecture"] = selected.architecture
    info |= {
        "quantization": {"name": selected.quant, "bits_per_weight": selected.bits_per_weight},
        "size_bytes": selected.size_bytes,
        "params_string": selected.params_string,
        "loaded_instances": [{"id": i.id, "config": instance_config(i)} for i in instances],
        "max_context_length": selected.context_length,
        "format": "gguf",
    }
    if entry.type == "llm":
        info["capabilities"] = {
            "vision": selected.mmproj_path is not None,
            "trained_for_tool_use": selected.trained_for_tool_use,
        }
        if (reasoning := reasoning_capability(selected.chat_template)) is not None:
            info["capabilities"]["reasoning"] = reasoning
        info["description"] = None
    info["variants"] = [v.key for v in entry.variants]
    info["selected_variant"] = selected.key
    return info


async def list_models(manager: Annotated[ModelManager, Depends(get_manager)]) -> dict[str, Any]:
    models = []
    for entry in manager.store.scan():
        if entry.default_variant is None:
            continue
        instances = [i for i in manager.loaded() if i.variant.model_key == entry.key]
        models.append(model_info(entry, instances))
    return {"models": models}


async def load_model(
    body: LoadRequest, manager: Annotated[ModelManager, Depends(get_manager)]
) -> dict[str, Any] | EventStreamResponse:
    defaults = LoadConfig(parallel=manager.settings.parallel)
    config = LoadConfig(
        context_length=body.context_length,
        parallel=body.parallel or defaults.parallel,
        eval_batch_size=body.eval_batch_size or defaults.eval_batch_size,
        flash_attention=body.flash_attention,
        offload_kv_cache_to_gpu=(
            defaults.offload_kv_cache_to_gpu if body.offload_kv_cache_to_gpu is None else body.offload_kv_cache_to_gpu
        ),
        gpu=defaults.gpu if body.gpu is None else body.gpu,
        ttl=body.ttl,
        identifier=body.identifier,
        draft_model=body.draft_model,
        num_experts=body.num_experts,
    )
    if isinstance(config.gpu, float) and not 0.0 <= config.gpu <= 1.0:
        raise APIError(400, "'gpu' must be \"max\", \"off\" or a fraction between 0 and 1", param="gpu")
    if body.num_experts is not None:
        try:
            check_num_experts(manager.store.resolve(body.model), body.num_experts)
        except ModelNotFound as exc:
            raise model_not_found(exc) from None
        except ValueError as exc:
            raise APIError(400, str(exc), param="num_experts") from None
    if body.estimate_only:
        return await estimate_load(body.model, config, manager)
    if body.identifier and manager.find_loaded(body.identifier) is not None:
        raise APIError(409, f"An instance with identifier \"{body.identifier}\" is already loaded.",
                       param="identifier", code="identifier_in_use")
    if body.draft_model is not None:
        try:
            manager.store.resolve(body.draft_model)
        except ModelNotFound as exc:
            raise APIError(404, f"Draft model \"{body.draft_model}\" {exc.reason}.", param="draft_model",
                           code="model_not_found") from None
    if not body.force:
        await make_room(body.model, config, manager, evict=body.evict)
    if body.stream:
        return EventStreamResponse(_load_events(body, config, manager))
    return await _load(body, config, manager)


async def _load(body: LoadRequest, config: LoadConfig, manager: ModelManager,
                on_progress: Listener | None = None) -> dict[str, Any]:
    try:
        instance = await manager.load(body.model, config, on_progress=on_progress)
    except ModelNotFound as exc:
        raise model_not_found(exc) from None
    except DraftIncompatible as exc:
        raise APIError(400, str(exc), param="draft_model", code="draft_model_incompatible") from None
    except ModelLoadError as exc:  # a corrupt file, or a forced load llama.cpp could not allocate
        raise APIError(422, str(exc), param="model", code="model_load_failed") from None
    response: dict[str, Any] = {
        "type": instance.type,
        "instance_id": instance.id,
        "load_time_seconds": round(instance.load_seconds, 3),
        "status": "loaded",
    }
    if body.echo_load_config:
        response["load_config"] = instance_config(instance)
    return response


async def _load_events(body: LoadRequest, config: LoadConfig, manager: ModelManager) -> AsyncIterator[bytes]:
    """`model_load.start`, a `model_load.progress` per step of llama.cpp's load callback (rising to 1.0), then
    `model_load.end` with the usual answer as `result`, or `error` (the native error body) if the load failed."""
    updates: asyncio.Queue[float | None] = asyncio.Queue()
    # Not cancelled when the client goes: a load in llama.cpp cannot stop half-way, and the instance must
    # still be recorded (as after a plain load whose client hung up).
    task = asyncio.create_task(_load(body, config, manager, updates.put_nowait))

    def ended(done: asyncio.Task[dict[str, Any]]) -> None:
        updates.put_nowait(None)  # after every progress update: the load scheduled them before its end
        if not done.cancelled():
            done.exception()  # read here: a client gone before the end would leave it "never retrieved"

    task.add_done_callback(ended)
    yield sse_event("model_load.start", {"model": body.model})
    while (fraction := await updates.get()) is not None:
        yield sse_event("model_load.progress", {"model": body.model, "progress": fraction})
    try:
        result = task.result()
    except APIError as exc:
        yield sse_event("error", {"error": api_error_body(LOAD_PATH, exc)["error"]})
        return
    yield sse_event("model_load.end", {"model_instance_id": result["instance_id"], "result": result})


def _gib(n: int | None) -> str:
    return "unknown" if n is None else f"{n / (1 << 30):.2f} GiB"


async def make_room(name: str, config: LoadConfig, manager: ModelManager, *, evict: bool) -> None:
    """Refuses (409) a load whose memory estimate does not fit the free host and GPU memory; with `evict`,
    first unloads other instances, least recently used first (each after its running requests), until it fits."""
    answer = await estimate_load(name, config, manager)
    victims = sorted(manager.loaded(), key=lambda i: i.last_used) if evict else []
    if not answer["fits"] and victims and not await _fits_after_evicting(answer, victims, manager):
        victims = []  # unloading everything would not make room: keep the models loaded
    while not answer["fits"] and victims:
        await manager.unload(victims.pop(0).id, drain=True)
        answer = await estimate_load(name, config, manager)
    if answer["fits"]:
        return
    estimate, available = answer["estimate"], answer["available"]
    needs = f"{_gib(estimate['total_bytes'])}"
    free = f"{_gib(available['ram_bytes'])} of RAM"
    if available.get("ram_limit_bytes") is not None:  # a pod's or container's limit, not the machine's RAM
        free += f" (within the server's memory limit of {_gib(available['ram_limit_bytes'])})"
    if available["gpu_bytes"] is not None:
        needs += f" ({_gib(estimate['host_bytes'])} host, {_gib(estimate['gpu_bytes'])} GPU)"
        free += f" and {_gib(available['gpu_bytes'])} of GPU memory"
    raise APIError(
        409,
        f"Not enough memory to load \"{answer['model']}\" with context_length {answer['context_length']}: it needs "
        f"an estimated {needs}, and {free} {'are' if available['gpu_bytes'] is not None else 'is'} free. Load it "
        "with a smaller context_length, unload a model, or send \"evict\": true (unload other models first) or "
        "\"force\": true (load anyway).",
        param="model",
        code="insufficient_memory",
    )


async def _fits_after_evicting(answer: dict[str, Any], victims: list[ModelInstance], manager: ModelManager) -> bool:
    """Whether the load's estimate fits the free memory plus the estimates of every instance in `victims`."""
    freed_host = freed_gpu = 0
    for instance in victims:
        own = replace(instance.config, context_length=instance.context_length)
        estimate = (await estimate_load(instance.variant.key, own, manager))["estimate"]
        freed_host += estimate["host_bytes"]
        freed_gpu += estimate["gpu_bytes"]
    ram, gpu = answer["available"]["ram_bytes"], answer["available"]["gpu_bytes"]
    wanted = answer["estimate"]
    return ((ram is None or wanted["host_bytes"] <= ram + freed_host)
            and (gpu is None or wanted["gpu_bytes"] <= gpu + freed_gpu))


async def estimate_load(name: str, config: LoadConfig, manager: ModelManager) -> dict[str, Any]:
    """What `estimate_only` answers: the memory this load would take and whether it fits now."""
    try:
        variant = manager.store.resolve(name)
    except ModelNotFound as exc:
        raise model_not_found(exc) from None
    draft_files, draft_key = None, None
    if config.draft_model is not None:
        try:
            draft = manager.store.resolve(config.draft_model)
            draft_files, draft_key = list(draft.files), draft.key
        except ModelNotFound as exc:
            raise APIError(404, f"Draft model \"{config.draft_model}\" {exc.reason}.", param="draft_model",
                           code="model_not_found") from None
    estimate = await asyncio.to_thread(
        estimate_memory, list(variant.files), context_length=config.context_length,
        default_context=manager.settings.default_context_length, parallel=config.parallel,
        eval_batch_size=config.eval_batch_size, flash_attention=config.flash_attention,
        offload_kv_cache=config.offload_kv_cache_to_gpu, gpu=config.gpu, gpu_supported=gpu_offload_supported(),
        embedding=variant.is_embedding, draft_files=draft_files, projector_file=variant.mmproj_path,
    )
    available = await asyncio.to_thread(available_memory)
    answer = {
        "model": variant.key,
        "type": variant.type,
        "context_length": estimate.context_length,
        "parallel": estimate.parallel,
        "flash_attention": estimate.flash_attention,
        "gpu_offload": {"setting": config.gpu, "layers": estimate.gpu_layers, "total_layers": estimate.n_layers + 1},
        "estimate": estimate.as_dict(),
        "available": available,
        "fits": fits(estimate, available),
        "status": "estimated",
    }
    if draft_key is not None and estimate.draft is not None:  # its share is `estimate.draft`, in the totals
        answer["draft_model"] = draft_key
    return answer


async def unload_model(
    body: UnloadRequest, manager: Annotated[ModelManager, Depends(get_manager)]
) -> dict[str, str]:
    try:
        instance = await manager.unload(body.instance_id)
    except ModelNotFound as exc:
        raise APIError(404, f"No loaded instance \"{body.instance_id}\". Loaded: {', '.join(exc.available) or 'none'}",
                       param="instance_id", code="model_not_found") from None
    return {"instance_id": instance.id}


