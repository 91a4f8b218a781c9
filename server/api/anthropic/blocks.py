"""The chat layer's output as Anthropic content blocks and stream events.

Streaming and non-streaming responses are both built here, from the same sequence of chat deltas:
`MessageBuilder.feed` turns each delta into `content_block_*` events while it accumulates the blocks,
so the message the SDK assembles from a stream is the message a plain request returns.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from ...chat.deltas import ChatDelta, ChatResult
from ...engine.events import Finish
from ...streaming import SseEvent


def tool_use_id(call_id: str) -> str:
    """Anthropic's `toolu_` id for a chat-layer call id (`call_…`); the same id on both paths."""
    return "toolu_" + call_id.removeprefix("call_")


def signature(thinking: str) -> str:
    """An opaque, deterministic signature: clients must send thinking blocks back with one, nobody checks it."""
    return "lmkube-" + hashlib.sha256(thinking.encode(errors="surrogatepass")).hexdigest()[:32]


def stop_reason(finish: Finish, result: ChatResult) -> tuple[str, str | None]:
    if result.tool_calls:
        return "tool_use", None
    if finish.reason == "length":
        return "max_tokens", None
    if finish.stop_sequence is not None:
        return "stop_sequence", finish.stop_sequence
    return "end_turn", None


def usage(finish: Finish) -> dict[str, int]:
    """Anthropic counts cache reads apart: input + cache_read + cache_creation is the whole prompt."""
    cached = min(finish.cached_tokens, finish.prompt_tokens)
    return {"input_tokens": finish.prompt_tokens - cached, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": cached, "output_tokens": finish.completion_tokens}


class MessageBuilder:
    def __init__(self, message_id: str, model: str, prompt_tokens: int) -> None:
        self.message_id = message_id
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.blocks: list[dict[str, Any]] = []
        self._open: str | None = None  # "thinking" | "text" | "tool_use": the kind of the last block, while open
        self._tools: dict[int, int] = {}  # the chat layer's call index → block index
        self._arguments: dict[int, str] = {}  # block index → argument text streamed so far

    def start(self) -> list[SseEvent]:
        message: dict[str, Any] = {"id": self.message_id, "type": "message", "role": "assistant", "model": self.model,
                   "content": [], "stop_reason": None, "stop_sequence": None,
                   "usage": {"input_tokens": self.prompt_tokens, "cache_creation_input_tokens": 0,
                             "cache_read_input_tokens": 0, "output_tokens": 0}}
        return [("message_start", {"message": message}), ("ping", {})]

    def feed(self, delta: ChatDelta) -> list[SseEvent]:
        events: list[SseEvent] = []
        if delta.reasoning:
            self._write("thinking", {"type": "thinking", "thinking": "", "signature": ""},
                        {"type": "thinking_delta", "thinking": delta.reasoning}, events)
            self.blocks[-1]["thinking"] += delta.reasoning
        if delta.content:
            self._write("text", {"type": "text", "text": ""}, {"type": "text_delta", "text": delta.content}, events)
            self.blocks[-1]["text"] += delta.content
        for piece in delta.tool_calls:
            if piece.id is not None:
                self._close(events)
                self._tools[piece.index] = len(self.blocks)
                block = {"type": "tool_use", "id": tool_use_id(piece.id), "name": piece.name or "", "input": {}}
                self.blocks.append(block)
                self._open = "tool_use"
                events.append(("content_block_start", {"index": len(self.blocks) - 1, "content_block": dict(block)}))
            index = self._tools.get(piece.index)
            if index is None or not piece.arguments:
                continue
            if index != len(self.blocks) - 1 or self._open != "tool_use":
                continue  # a call's text after another block began cannot be streamed into its closed block
            self._arguments[index] = self._arguments.get(index, "") + piece.arguments
            events.append(("content_block_delta", {"index": index, "delta": {"type": "input_json_delta",
                                                                             "partial_json": piece.arguments}}))
        return events

    def _write(self, kind: str, empty: dict[str, Any], delta: dict[str, Any], events: list[SseEvent]) -> None:
        if self._open != kind:
            self._close(events)
            self.blocks.append(empty)
            self._open = kind
            events.append(("content_block_start", {"index": len(self.blocks) - 1, "content_block": dict(empty)}))
        events.append(("content_block_delta", {"index": len(self.blocks) - 1, "delta": delta}))

    def _close(self, events: list[SseEvent]) -> None:
        if self._open is None:
            return
        index = len(self.blocks) - 1
        block = self.blocks[index]
        if self._open == "thinking":
            block["signature"] = signature(block["thinking"])
            events.append(("content_block_delta", {"index": index, "delta": {"type": "signature_delta",
                                                                             "signature": block["signature"]}}))
        elif self._open == "tool_use":
            block["input"] = _object(self._arguments.get(index, ""))
        events.append(("content_block_stop", {"index": index}))
        self._open = None

    def finish(self, finish: Finish, result: ChatResult) -> list[SseEvent]:
        """The closing events; `message()` is complete after this."""
        events: list[SseEvent] = []
        self._close(events)
        self._finish = finish
        self._result = result
        reason, sequence = stop_reason(finish, result)
        delta: dict[str, Any] = {"delta": {"stop_reason": reason, "stop_sequence": sequence}, "usage": usage(finish)}
        if finish.draft_model is not None:  # lmkube: speculative decoding's counts (an extra key SDKs keep)
            delta["stats"] = finish.draft_stats()
        events.append(("message_delta", delta))
        events.append(("message_stop", {}))
        return events

    def message(self) -> dict[str, Any]:
        """The whole message (after `finish`), as a non-streaming response."""
        reason, sequence = stop_reason(self._finish, self._result)
        # A call the parser announced and then found malformed came back as text: its block goes.
        calls = {tool_use_id(c.id) for c in self._result.tool_calls}
        blocks = [b for b in self.blocks if b["type"] != "tool_use" or b["id"] in calls]
        message: dict[str, Any] = {"id": self.message_id, "type": "message", "role": "assistant", "model": self.model,
                   "content": blocks, "stop_reason": reason, "stop_sequence": sequence,
                   "usage": usage(self._finish)}
        if self._finish.draft_model is not None:
            message["stats"] = self._finish.draft_stats()
        return message


def _object(arguments: str) -> dict[str, Any]:
    try:
        value = json.loads(arguments, strict=False) if arguments else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
