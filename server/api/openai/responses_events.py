"""The Response object of `/v1/responses` and the stream events that build it, from one state machine.

`ResponseBuilder` owns the response body; every change to it (an output item opened, text added, an
item finished) returns the stream events that describe the change. Streaming writes the events;
non-streaming drops them and returns `builder.response`, so both end with the same object, which is
also what the openai SDK's stream helper accumulates.

Events are `(type, fields)` pairs; `encode` adds `type` and `sequence_number` and frames them as SSE.
"""

from __future__ import annotations

import copy
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ...chat.deltas import ChatDelta, ToolCall, ToolCallDelta
from ...streaming import SseEvent, sse_event

MCP_CALL_FAILED = -32000  # JSON-RPC's server-error range: the call failed before the tool gave a result


def item_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(24)}"


@dataclass(frozen=True, slots=True)
class McpName:
    """What a model-facing tool name stands for on an MCP server."""

    server_label: str
    tool: str
    approval: bool = False  # the call waits for the client's mcp_approval_response


class ResponseBuilder:
    def __init__(self, response: dict[str, Any], mcp_names: Mapping[str, McpName] | None = None,
                 namespaced: Mapping[str, tuple[str, str]] | None = None) -> None:
        self.response = response  # status "in_progress", output [], usage None
        self.mcp_names = dict(mcp_names or {})
        self.namespaced = dict(namespaced or {})  # flat tool name → (namespace, name), as the client declared it
        self._text: tuple[str, int] | None = None  # the open reasoning/message item: (type, output index)
        self._calls: dict[int, tuple[int, str]] = {}  # this round's tool-call index → (output index, call id)

    @property
    def output(self) -> list[dict[str, Any]]:
        return self.response["output"]

    def snapshot(self) -> dict[str, Any]:
        return copy.deepcopy(self.response)

    def start(self) -> list[SseEvent]:
        return [("response.created", {"response": self.snapshot()}),
                ("response.in_progress", {"response": self.snapshot()})]

    # -- output items --------------------------------------------------------------------------------

    def _add(self, item: dict[str, Any]) -> tuple[int, SseEvent]:
        self.output.append(item)
        index = len(self.output) - 1
        return index, ("response.output_item.added", {"output_index": index, "item": copy.deepcopy(item)})

    def _done(self, index: int) -> SseEvent:
        return "response.output_item.done", {"output_index": index, "item": copy.deepcopy(self.output[index])}

    def _open_text(self, kind: str) -> tuple[int, list[SseEvent]]:
        if self._text is not None and self._text[0] == kind:
            return self._text[1], []
        events = self.close_text()
        item: dict[str, Any]
        part: dict[str, Any]
        if kind == "reasoning":
            item = {"id": item_id("rs"), "type": "reasoning", "summary": [], "content": [], "status": "in_progress"}
            part = {"type": "reasoning_text", "text": ""}
        else:
            item = {"id": item_id("msg"), "type": "message", "status": "in_progress", "role": "assistant",
                    "content": []}
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        index, added = self._add(item)
        item["content"].append(part)
        self._text = (kind, index)
        events += [added, ("response.content_part.added", {"item_id": item["id"], "output_index": index,
                                                            "content_index": 0, "part": dict(part)})]
        return index, events

    def _append_text(self, kind: str, text: str) -> list[SseEvent]:
        if not text:
            return []
        index, events = self._open_text(kind)
        item = self.output[index]
        item["content"][0]["text"] += text
        fields: dict[str, Any] = {"item_id": item["id"], "output_index": index, "content_index": 0, "delta": text}
        if kind == "message":
            fields["logprobs"] = []
        events.append((f"response.{'output_text' if kind == 'message' else 'reasoning_text'}.delta", fields))
        return events

    def close_text(self, status: str = "completed") -> list[SseEvent]:
        """Finishes the open reasoning or message item."""
        if self._text is None:
            return []
        kind, index = self._text
        self._text = None
        item = self.output[index]
        part = item["content"][0]
        item["status"] = status
        where = {"item_id": item["id"], "output_index": index, "content_index": 0}
        if kind == "message":
            text_done: SseEvent = ("response.output_text.done", {**where, "text": part["text"], "logprobs": []})
        else:
            text_done = ("response.reasoning_text.done", {**where, "text": part["text"]})
        return [text_done, ("response.content_part.done", {**where, "part": copy.deepcopy(part)}),
                self._done(index)]

    def feed(self, delta: ChatDelta) -> list[SseEvent]:
        """Events for one piece of parsed output: reasoning, answer text, tool-call pieces."""
        events = self._append_text("reasoning", delta.reasoning) + self._append_text("message", delta.content)
        for piece in delta.tool_calls:
            index = self._calls.get(piece.index, (None, ""))[0]
            if index is None:
                events += self.close_text()
                mcp = self.mcp_names.get(piece.name or "")
                item: dict[str, Any]
                if mcp is not None and mcp.approval:
                    item = {"id": item_id("mcpr"), "type": "mcp_approval_request", "server_label": mcp.server_label,
                            "name": mcp.tool, "arguments": ""}
                elif mcp is not None:
                    item = {"id": item_id("mcp"), "type": "mcp_call", "server_label": mcp.server_label,
                            "name": mcp.tool, "arguments": "", "status": "in_progress"}
                else:
                    item = {"id": item_id("fc"), "type": "function_call", "status": "in_progress",
                            "arguments": "", "call_id": piece.id, "name": piece.name}
                    if piece.name in self.namespaced:
                        item["namespace"], item["name"] = self.namespaced[piece.name]
                index, added = self._add(item)
                self._calls[piece.index] = (index, piece.id or "")
                events.append(added)
            item = self.output[index]
            if piece.arguments:
                item["arguments"] += piece.arguments
                if item["type"] == "mcp_approval_request":  # OpenAI streams no argument deltas for these
                    continue
                kind = "mcp_call_arguments" if item["type"] == "mcp_call" else "function_call_arguments"
                events.append((f"response.{kind}.delta", {"item_id": item["id"], "output_index": index,
                                                          "delta": piece.arguments}))
        return events

    def end_round(self, calls: list[ToolCall], *,
                  status: str) -> tuple[list[SseEvent], list[tuple[int, ToolCall]], list[ToolCall]]:
        """Closes this round's items against the parsed calls: function calls are done; MCP calls (returned
        with their output index) wait for `mcp_result`; calls that need approval are done as
        `mcp_approval_request` items (returned, their id now the approval request's). Announced calls
        that did not parse are incomplete."""
        events = self.close_text(status)
        by_id = {call.id: call for call in calls}
        announced = {call_id for _, call_id in self._calls.values()}
        for call in calls:  # the parser announces every call it returns; this keeps the output whole if not
            if call.id not in announced:
                events += self.feed(ChatDelta(tool_calls=[ToolCallDelta(-1 - len(self._calls), call.id, call.name)]))
        pending: list[tuple[int, ToolCall]] = []
        approvals: list[ToolCall] = []
        for index, call_id in self._calls.values():
            item = self.output[index]
            found = by_id.get(call_id)
            if found is None:
                if item["type"] != "mcp_approval_request":  # which has no status
                    item["status"] = "incomplete"
                events.append(self._done(index))
                continue
            item["arguments"] = found.arguments
            where = {"item_id": item["id"], "output_index": index}
            if item["type"] == "mcp_approval_request":
                found.id = item["id"]  # the conversation keeps the call under the id the approval names
                approvals.append(found)
                events.append(self._done(index))
            elif item["type"] == "mcp_call":
                events += [("response.mcp_call_arguments.done", {**where, "arguments": found.arguments}),
                           ("response.mcp_call.in_progress", where)]
                pending.append((index, found))
            else:
                item["status"] = "completed"
                events += [("response.function_call_arguments.done",
                            {**where, "name": item["name"], "arguments": found.arguments}), self._done(index)]
        self._calls = {}
        return events, pending, approvals

    def mcp_approved_call(self, server_label: str, name: str, arguments: str,
                          approval_id: str) -> tuple[int, list[SseEvent]]:
        """An approved call's `mcp_call` item, in progress until `mcp_result`."""
        index, added = self._add({"id": item_id("mcp"), "type": "mcp_call", "server_label": server_label,
                                  "name": name, "arguments": arguments, "approval_request_id": approval_id,
                                  "status": "in_progress"})
        where = {"item_id": self.output[index]["id"], "output_index": index}
        return index, [added, ("response.mcp_call_arguments.done", {**where, "arguments": arguments}),
                       ("response.mcp_call.in_progress", where)]

    def mcp_result(self, index: int, output: str, error: str | None, *, protocol: bool = False) -> list[SseEvent]:
        """The call's outcome; an error as OpenAI's `McpToolCallError`: the tool's own failure (its content),
        or a protocol error (the call timed out, the server is gone, the arguments were not an object)."""
        item = self.output[index]
        failure: dict[str, Any] | None = None
        if error is not None and protocol:
            failure = {"type": "mcp_protocol_error", "code": MCP_CALL_FAILED, "message": error}
        elif error is not None:
            failure = {"type": "mcp_tool_execution_error", "content": [{"type": "text", "text": error}]}
        item.update(output=output, error=failure, status="failed" if error else "completed")
        kind = "failed" if error else "completed"
        return [(f"response.mcp_call.{kind}", {"item_id": item["id"], "output_index": index}), self._done(index)]

    def mcp_skipped(self, index: int) -> list[SseEvent]:
        self.output[index]["status"] = "incomplete"
        return [self._done(index)]

    def mcp_list_tools_failed(self, server_label: str, error: str) -> list[SseEvent]:
        """A server that could not be reached or started: its listing with the error; the run goes on."""
        index, added = self._add({"id": item_id("mcpl"), "type": "mcp_list_tools", "server_label": server_label,
                                  "tools": [], "error": error})
        where = {"item_id": self.output[index]["id"], "output_index": index}
        return [added, ("response.mcp_list_tools.in_progress", where), ("response.mcp_list_tools.failed", where),
                self._done(index)]

    def mcp_list_tools(self, server_label: str, tools: list[dict[str, Any]]) -> list[SseEvent]:
        item: dict[str, Any] = {"id": item_id("mcpl"), "type": "mcp_list_tools", "server_label": server_label,
                                "tools": []}
        index, added = self._add(item)
        where = {"item_id": item["id"], "output_index": index}
        item["tools"] = tools
        return [added, ("response.mcp_list_tools.in_progress", where),
                ("response.mcp_list_tools.completed", where), self._done(index)]

    # -- the end -------------------------------------------------------------------------------------

    def finish(self, usage: dict[str, Any], *, incomplete: bool) -> list[SseEvent]:
        events = self.close_text("incomplete" if incomplete else "completed")
        if not self.output:  # nothing generated (e.g. max_output_tokens=1 hit a partial character)
            _, opened = self._open_text("message")
            events += opened + self.close_text("incomplete" if incomplete else "completed")
        self.response.update(status="incomplete" if incomplete else "completed", usage=usage,
                             completed_at=int(time.time()),
                             incomplete_details={"reason": "max_output_tokens"} if incomplete else None)
        final = "response.incomplete" if incomplete else "response.completed"
        return [*events, (final, {"response": self.snapshot()})]

    def fail(self, message: str, code: str | None, param: str | None = None) -> list[SseEvent]:
        events = self.close_text("incomplete")
        self.response.update(status="failed", error={"code": code or "server_error", "message": message})
        return [*events, ("error", {"code": code, "message": message, "param": param}),
                ("response.failed", {"response": self.snapshot()})]


class EventEncoder:
    """SSE frames with increasing sequence numbers."""

    def __init__(self) -> None:
        self.sequence = 0

    def encode(self, events: list[SseEvent]) -> bytes:
        out = bytearray()
        for name, fields in events:
            out += sse_event(name, {**fields, "sequence_number": self.sequence})
            self.sequence += 1
        return bytes(out)
