"""Wire schemas of LM Studio's native /api/v1 endpoints."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool

from ...store.paths import check_name

Name = Annotated[str, AfterValidator(check_name)]


class LoadRequest(BaseModel):
    # LM Studio rejects unrecognised keys on load; so do we, so typos do not pass silently.
    model_config = ConfigDict(extra="forbid")

    model: Name
    context_length: int | None = Field(default=None, ge=1)
    eval_batch_size: int | None = Field(default=None, ge=1)
    # Strict: "yes" or "0" would pass a lax bool, and a typo'd value should not silently turn a setting on.
    flash_attention: StrictBool | None = None
    offload_kv_cache_to_gpu: StrictBool | None = None
    num_experts: int | None = Field(default=None, ge=1)
    parallel: int | None = Field(default=None, ge=1, le=256)
    ttl: float | None = Field(default=None, gt=0)
    identifier: Name | None = None
    echo_load_config: StrictBool = False
    gpu: Literal["max", "off"] | float | None = None
    # Speculative decoding: the draft model requests to this instance use unless they name their own.
    draft_model: Name | None = None
    # lmkube extension (LM Studio's `lms load --estimate-only`): report the memory a load would take, load nothing.
    estimate_only: bool = False
    # lmkube extensions for a load whose estimate does not fit the free memory (refused by default):
    # unload other instances first, least recently used first, until it fits; or load it anyway.
    evict: bool = False
    force: bool = False
    # lmkube extension: answer with a stream of model_load.* events (server-sent events, as /api/v1/chat's), the
    # progress of llama.cpp's load as it goes, the usual answer last; what `lmkube load` and the operator use.
    stream: StrictBool = False


class UnloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    instance_id: Name
