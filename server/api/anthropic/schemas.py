"""Wire schemas of the Anthropic Messages API (`/v1/messages`, `/v1/messages/count_tokens`).

Requests are validated here; responses are built as dicts (see `blocks.py`). Fields Anthropic defines
that a local server has no use for (`metadata`, `service_tier`, `cache_control`, `citations`, ...) are
accepted and ignored, so clients written for Anthropic's API work unchanged.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..draft_fields import DraftFields


class _Block(BaseModel):
    model_config = ConfigDict(extra="ignore")  # cache_control, citations, ...


class TextBlock(_Block):
    type: Literal["text"]
    text: str


class ImageBlock(_Block):
    type: Literal["image"]
    source: dict[str, Any]


class DocumentBlock(_Block):
    type: Literal["document"]
    source: dict[str, Any]
    title: str | None = None


class ToolUseBlock(_Block):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any] = Field(default_factory=dict)


class ToolReferenceBlock(_Block):
    """Tool search's result (Claude Code's ToolSearch): the named deferred tool is now available."""

    type: Literal["tool_reference"]
    tool_name: str


class ToolResultBlock(_Block):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[Annotated[TextBlock | ImageBlock | DocumentBlock | ToolReferenceBlock,
                                  Field(discriminator="type")]] | None = None
    is_error: bool = False


class ThinkingBlock(_Block):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(_Block):
    type: Literal["redacted_thinking"]
    data: str = ""


ContentBlock = Annotated[
    TextBlock | ImageBlock | DocumentBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock,
    Field(discriminator="type"),
]


BLOCK_TYPES = ("text", "image", "document", "tool_use", "tool_result", "thinking", "redacted_thinking")


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    # "system": Claude Code 2.1 sends one in the middle of the conversation (it becomes a system turn there).
    role: Literal["user", "assistant", "system"]
    content: str | list[ContentBlock]

    @field_validator("content", mode="before")
    @classmethod
    def _known_blocks(cls, value: Any) -> Any:
        # Otherwise pydantic reports the union's first member ("should be a valid string"), not the bad block.
        if isinstance(value, list):
            for i, block in enumerate(value):
                kind = block.get("type") if isinstance(block, dict) else None
                if kind not in BLOCK_TYPES:
                    raise ValueError(f"content block {i} has type {kind!r}; expected one of {', '.join(BLOCK_TYPES)}")
        return value


class Tool(BaseModel):
    """A client tool (`name`, `description`, `input_schema`); server tools carry another `type`."""

    model_config = ConfigDict(extra="allow")

    type: str | None = None
    name: str = Field(min_length=1)
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    defer_loading: bool = False  # tool search: shown to the model once a tool_reference names it


class ToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False


class Thinking(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["enabled", "disabled", "adaptive", "between_tools"]
    budget_tokens: int | None = Field(default=None, ge=0)


class OutputFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")

    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None
    format: OutputFormat | None = None


class MessagesInput(BaseModel):
    """What `count_tokens` and `messages` share: everything that goes into the prompt."""

    model_config = ConfigDict(extra="ignore")  # metadata, service_tier, container, anthropic-beta fields, ...

    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    output_config: OutputConfig | None = None
    ttl: int | None = Field(default=None, ge=1, description="lmkube: idle seconds for a model this request JIT-loads")


class MessagesRequest(MessagesInput, DraftFields):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)  # Anthropic's range is 0..1; 2 as OpenAI's
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    seed: int | None = None  # lmkube extension, as on /v1/chat/completions
    stream: bool = False

    @field_validator("stop_sequences")
    @classmethod
    def _bounded_stops(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(value) > 16:
            raise ValueError("at most 16 stop sequences are supported")
        if value is not None and not all(value):
            raise ValueError("stop sequences must be non-empty strings")
        return value
