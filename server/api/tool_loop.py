"""The server-side MCP tool loop that `/api/v1/chat` (integrations) and `/v1/responses` (`mcp` tools) share.

Each round submits the conversation so far through the request's `ChatRun`; when the model calls MCP
tools the loop runs them on their servers, adds the assistant's calls and the tools' results to the
conversation and goes again, at most `MAX_TOOL_ROUNDS` rounds with tools; one more round without tools
then has to answer. The request's tool_choice binds the first round only; later rounds answer the tool
results freely ("auto"). A family supplies a `LoopFamily`: its spec fields, and the stream events it
writes for deltas, round ends and tool calls.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import replace
from typing import Any, Protocol

from ..chat.deltas import ChatDelta, ChatResult, ToolCall
from ..chat.session import ChatSpec, ToolChoice
from ..errors import APIError
from ..mcp import MAX_TOOL_ROUNDS, McpTool, McpToolbox
from ..streaming import SseEvent
from .chat_run import ChatRun, Round

log = logging.getLogger(__name__)


class LoopFamily(Protocol):
    """What a family adds to the loop: all of it is the family's own encoding."""

    def round_submitted(self, round: Round) -> list[SseEvent]:
        """Events once a round's prompt is submitted (before its first token)."""
        ...

    def feed(self, round: Round, deltas: list[ChatDelta]) -> list[SseEvent]:
        """Events for one engine batch of the round's deltas (`round.finish` is set on the last)."""
        ...

    def end_round(self, round: Round, offered: bool) -> tuple[list[SseEvent], list[ToolCall], bool]:
        """Events closing the round, the calls the server runs now, and whether their results go back to
        the model for another round (else the loop ends once they have run)."""
        ...

    def tool_started(self, tool: McpTool, arguments: dict[str, Any]) -> list[SseEvent]:
        """Events just before a call with valid arguments goes to its MCP server."""
        ...

    def tool_done(self, call: ToolCall, tool: McpTool | None, arguments: dict[str, Any] | str | None,
                  output: str, error: str | None, protocol: bool = False) -> list[SseEvent]:
        """Events for a call's outcome: `tool` None (unknown name), `arguments` a str (they did not parse),
        `error` set (the tool reported a failure; `protocol`: the call itself failed, e.g. timed out),
        else a success."""
        ...


def assistant_message(result: ChatResult, calls: Sequence[ToolCall]) -> dict[str, Any]:
    """The model's turn as a chat message for the conversation (and the stored history)."""
    reply: dict[str, Any] = {"role": "assistant", "content": result.content}
    if result.reasoning:
        reply["reasoning_content"] = result.reasoning
    if calls:
        reply["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                               for c in calls]
    return reply


class ToolLoop:
    """One request's rounds: `events(family)` runs them; `added` is what they add to the conversation
    (the assistant's turns and the tool results), for the family to store."""

    def __init__(self, run: ChatRun, spec: ChatSpec, *, toolbox: McpToolbox | None,
                 functions: Sequence[dict[str, Any]] = (), approved: Sequence[ToolCall] = ()) -> None:
        """`spec`: the first round's, with the conversation so far and the request's tool_choice (tools are
        the loop's: `functions`, the client's own tools, and the toolbox's). `approved`: MCP calls of an earlier
        turn that waited for the client's approval and got it: they run before the first round."""
        self.approved = approved
        self.run = run
        self.spec = spec
        self.toolbox = toolbox
        mcp_tools = toolbox.openai_tools() if toolbox is not None else []
        self.tools: list[dict[str, Any]] = [*functions, *mcp_tools]
        self.added: list[dict[str, Any]] = []
        self.rounds: list[Round] = []

    def round_spec(self, index: int) -> ChatSpec:
        offered = self.tools if index < MAX_TOOL_ROUNDS else []
        if self.tools and not offered:
            log.warning("MCP tool loop: %d rounds called tools; the last round runs without tools", MAX_TOOL_ROUNDS)
        choice: ToolChoice = self.spec.tool_choice if index == 0 else "auto" if offered else None
        return replace(self.spec, messages=[*self.spec.messages, *self.added], tools=offered or None,
                       tool_choice=choice)

    async def events(self, family: LoopFamily) -> AsyncIterator[list[SseEvent]]:
        """The rounds' events, a batch at a time; raises APIError on failure. Hold `instance.in_use()`."""
        for call in self.approved:
            async for events in self._call(family, call):
                yield events
        for index in range(MAX_TOOL_ROUNDS + 1):
            spec = self.round_spec(index)
            round = await self.run.submit(spec)
            self.rounds.append(round)
            yield family.round_submitted(round)
            async for deltas in round.deltas():
                if events := family.feed(round, deltas):
                    yield events
            if round.finish is None:
                raise APIError(500, "generation ended without a result", type="server_error")
            events, calls, more = family.end_round(round, bool(spec.tools))
            if events:
                yield events
            self.added.append(assistant_message(round.result, round.result.tool_calls if spec.tools else []))
            for call in calls:
                async for events in self._call(family, call):
                    yield events
            if not more:
                return

    async def _call(self, family: LoopFamily, call: ToolCall) -> AsyncIterator[list[SseEvent]]:
        """Runs one of the model's tool calls on its MCP server and adds the result to the conversation."""
        tool = self.toolbox.tools.get(call.name) if self.toolbox is not None else None
        arguments = tool.parse_arguments(call.arguments) if tool is not None else None
        error: str | None
        protocol = True  # unless the tool itself answers
        if tool is None or not isinstance(arguments, dict):
            output = error = arguments if isinstance(arguments, str) else f"Cannot find tool with name {call.name}."
        else:
            if started := family.tool_started(tool, arguments):
                yield started
            assert self.toolbox is not None
            run = await self.toolbox.call(tool, arguments)
            output, error, protocol = run.output, run.error, run.protocol
        yield family.tool_done(call, tool, arguments, output, error, protocol)
        self.added.append({"role": "tool", "tool_call_id": call.id, "content": output})


class LoopRequest(Protocol):
    """A family's request running the loop: its events, and how to end it (generations, MCP sessions)."""

    def events(self) -> AsyncGenerator[list[SseEvent], None]: ...

    def submitted(self) -> bool:
        """Whether the first round has been submitted."""
        ...

    async def close(self) -> None: ...

    def result(self) -> dict[str, Any]:
        """The response body, once the events have run."""
        ...


async def until_submitted(request: LoopRequest) -> tuple[list[list[SseEvent]], AsyncGenerator[list[SseEvent], None]]:
    """The request's events up to the first round's submission, and the generator of the rest.

    A stream starts only after this, so a refused request (full queue, prompt too long, unknown model)
    gets its HTTP status and Retry-After like every other family, not a 200 carrying `event: error`.
    On failure the request is closed."""
    events = request.events()
    head: list[list[SseEvent]] = []
    try:
        async for batch in events:
            head.append(batch)
            if request.submitted():
                break
    except BaseException:
        await events.aclose()
        await request.close()
        raise
    return head, events


async def run_to_end(request: LoopRequest) -> dict[str, Any]:
    """Runs a non-streaming request through all its rounds (its events are dropped), closes it and returns
    its response body."""
    try:
        async with aclosing(request.events()) as events:
            async for _ in events:
                pass
    finally:
        await request.close()
    return request.result()
