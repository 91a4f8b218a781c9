"""What the chat layer emits above raw text: content, reasoning and tool-call pieces."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class ToolCallDelta:
    """A piece of tool call `index`: the first piece carries `id` and `name`, later ones argument text."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass(slots=True)
class ChatDelta:
    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.tool_calls)


@dataclass(slots=True)
class ToolCall:
    id: str
    name: str  # the caller's name for the tool (mapped back from the model's normalized name)
    arguments: str  # a JSON object, as text


@dataclass(slots=True)
class ChatResult:
    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
