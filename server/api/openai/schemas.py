"""Wire schemas of the OpenAI-compatible endpoints (requests validated here; responses built as dicts)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ...engine.sampling import SamplingParams
from ...errors import bad_request
from ...runtime.instance import ModelInstance
from ..draft_fields import DraftFields
from ..inference import sampling_params


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(DraftFields):
    """Parameters shared by chat and text completions (OpenAI's plus llama.cpp's extras)."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=-1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repeat_penalty: float | None = Field(default=None, gt=0.0)
    seed: int | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0, allow_inf_nan=False)]] | None = None
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ttl: int | None = Field(default=None, ge=1, description="idle seconds for a model this request JIT-loads")

    @field_validator("stop")
    @classmethod
    def _bounded_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 16:
            raise ValueError("at most 16 stop sequences are supported")
        return value

    @field_validator("n")
    @classmethod
    def _single_choice(cls, value: int) -> int:
        if value != 1:
            raise ValueError("only n=1 is supported")
        return value

    def sampling(self, instance: ModelInstance, *, max_tokens: int | None = None) -> SamplingParams:
        params = sampling_params(self, instance.sampling_defaults,
                                 max_tokens=max_tokens if max_tokens is not None else self.max_tokens)
        if self.logit_bias:
            params.logit_bias = _token_bias(self.logit_bias, instance.model.n_vocab)
        if self.stop:
            params.stop = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        return params

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def _token_bias(raw: dict[str, float], n_vocab: int) -> dict[int, float]:
    bias: dict[int, float] = {}
    for key, value in raw.items():
        try:
            token = int(key)
        except ValueError:
            raise bad_request(f"logit_bias keys must be token ids, got {key!r}", param="logit_bias") from None
        if not 0 <= token < n_vocab:
            raise bad_request(f"logit_bias token {token} is outside the vocabulary (0..{n_vocab - 1})",
                              param="logit_bias")
        bias[token] = value
    return bias


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=-1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    reasoning_effort: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # llama-server's extension, e.g. enable_thinking
    preset: str | None = None

    @field_validator("max_tokens", "max_completion_tokens")
    @classmethod
    def _generates_something(cls, value: int | None) -> int | None:
        # OpenAI refuses 0 (the other families' minimum is 1 too); -1 is LM Studio's "no limit".
        if value == 0:
            raise ValueError("must be at least 1, or -1 for no limit")
        return value


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=-1)
    echo: bool = False

    @field_validator("max_tokens")
    @classmethod
    def _generates_something(cls, value: int | None) -> int | None:
        # As on the chat route: 0 used to generate a token anyway (a generation always samples one).
        if value == 0:
            raise ValueError("must be at least 1, or -1 for no limit")
        return value


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    ttl: int | None = Field(default=None, ge=1)
