"""The speculative-decoding fields every generation request takes, whichever API family it comes through."""

from __future__ import annotations

from pydantic import BaseModel, Field


class DraftFields(BaseModel):
    """LM Studio's `draft_model` plus lmkube's knobs (llama.cpp's --draft-max/-min/-p-min); an lmkube
    extension on /v1/responses and /v1/messages. `inference.sampling_params` maps them onto SamplingParams."""

    draft_model: str | None = Field(default=None, min_length=1)
    draft_max: int | None = Field(default=None, ge=0, le=64)
    draft_min: int | None = Field(default=None, ge=0, le=64)
    draft_p_min: float | None = Field(default=None, ge=0.0, le=1.0)
