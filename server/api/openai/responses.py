"""POST /v1/responses: OpenAI's Responses API over the shared chat layer and the stored conversations.

A request becomes chat messages (`responses_input`), runs through `prepare_chat` like every chat
endpoint, and its parsed output (reasoning, text, tool calls) builds the Response object and its stream
events (`responses_events`). Responses are stored (unless `store: false`) in the conversation store that
`/api/v1/chat` uses, so `previous_response_id` continues a conversation started on either endpoint.
`instructions` apply to this request only and are not stored, as OpenAI documents.

`mcp` tools (with `--allow-remote-mcp`) run on the server: their tools go to the model next to the
function tools; a round whose calls are all MCP calls runs them, records `mcp_call` items and feeds
the results back (at most `MAX_TOOL_ROUNDS` rounds with tools). A call of a function tool ends the
response with `function_call` items for the client to answer with `function_call_output`. MCP tools
run without approval: `require_approval` must be "never" (or left out).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request

from ...chat.deltas import ToolCall
from ...chat.session import (
    TOOL_CHOICE_HEADER,
    ChatOutput,
    ChatSpec,
    PreparedChat,
    prepare_chat,
    with_header_tool_choice,
)
from ...conversations import ConversationStore, new_response_id
from ...engine.events import Finish, TextDelta
from ...engine.generation import GenerationRequest
from ...errors import APIError, bad_request, error_message
from ...mcp import MAX_TOOL_ROUNDS, McpToolbox, open_toolbox, parse_integrations
from ...runtime.instance import ModelInstance
from ...runtime.manager import ModelManager
from ...streaming import EventStreamResponse, unless_disconnected
from .. import inference
from ..deps import get_conversations, get_manager
from .responses_events import Event, EventEncoder, McpName, ResponseBuilder
from .responses_input import (
    ResponsesRequest,
    chat_tool_choice,
    echo_tools,
    function_tools,
    input_messages,
    response_format,
)

log = logging.getLogger(__name__)

router = APIRouter()

# The chat layer names request fields the chat-completions way; these are their Responses names.
_PARAMS = {"messages": "input", "response_format": "text.format"}


def _renamed(error: APIError) -> APIError:
    if error.param is not None:
        head, _, rest = error.param.partition(".")
        if head in _PARAMS:
            error.param = _PARAMS[head] + ("." + rest if rest and head != "response_format" else "")
            error.message = error.message.replace("'response_format", "'text.format")
    return error


def _integrations(tools: list[dict[str, Any]], request: Request) -> list[Any]:
    """The request's `mcp` tools as MCP integrations (400 when the server does not allow them)."""
    config = request.app.state.config
    if not config.allow_remote_mcp:
        raise bad_request("MCP tools ({\"type\": \"mcp\"}) are disabled on this server; start it with "
                          "--allow-remote-mcp to allow them.", param="tools", code="remote_mcp_disabled")
    items = []
    for index, tool in enumerate(tools):
        approval = tool.get("require_approval")
        if approval not in (None, "never") and not (isinstance(approval, dict) and "always" not in approval):
            raise bad_request(f"tools[{index}].require_approval: this server runs MCP tools without approval; "
                              "use \"never\".", param="tools")
        if tool.get("connector_id") is not None or not isinstance(tool.get("server_url"), str):
            raise bad_request(f"tools[{index}]: only MCP servers given by server_url are supported.", param="tools")
        allowed = tool.get("allowed_tools")
        if isinstance(allowed, dict):
            allowed = allowed.get("tool_names")
        items.append({"type": "ephemeral_mcp", "server_label": tool.get("server_label"),
                      "server_url": tool["server_url"], "headers": tool.get("headers"), "allowed_tools": allowed})
    try:
        return parse_integrations(items, home=config.home, allow_remote=True, has_tokens=True)
    except APIError as exc:
        exc.param = "tools"
        raise


def _conversation(instructions: str | None, history: list[dict[str, Any]],
                  turn: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every system and developer item where it stands, `instructions` before them all, as OpenAI's API
    reads them; the leading ones (Codex sends its agent prompt and more as developer items) become one
    system message, since most templates take a single system turn first."""
    messages = [*([{"role": "system", "content": instructions}] if instructions else []), *history, *turn]
    lead = 0
    while lead < len(messages) and messages[lead].get("role") == "system":
        lead += 1
    if lead < 2:
        return messages
    joined = "\n\n".join(m.get("content") or "" for m in messages[:lead])
    return [{"role": "system", "content": joined}, *messages[lead:]]


def _usage_zero() -> dict[str, Any]:
    return {"input_tokens": 0, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": 0, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 0}


class ResponseRun:
    """One validated request: `events()` runs it (model rounds, MCP calls, storing) as stream events."""

    def __init__(self, body: ResponsesRequest, instance: ModelInstance, store: ConversationStore,
                 messages: list[dict[str, Any]], turn: list[dict[str, Any]], functions: list[dict[str, Any]],
                 toolbox: McpToolbox | None, builder: ResponseBuilder) -> None:
        self.body = body
        self.instance = instance
        self.store = store
        self.messages = messages  # the conversation before this response's output
        self.turn = turn  # what this request adds to the stored conversation (its input items)
        self.functions = functions
        self.toolbox = toolbox
        self.builder = builder
        self.added: list[dict[str, Any]] = []  # assistant and tool messages this response produced
        self.usage = _usage_zero()
        self.draft: dict[str, Any] = {}  # speculative decoding's counts, summed over the rounds
        self.first: tuple[PreparedChat, GenerationRequest] | None = None
        self.header_tool_choice: str | None = None  # the lmkube-tool-choice header

    def spec(self, round_index: int) -> ChatSpec:
        mcp_tools = self.toolbox.openai_tools() if self.toolbox is not None else []
        tools = [*self.functions, *mcp_tools] if round_index < MAX_TOOL_ROUNDS else []
        # The request's tool_choice binds the first round (where the chat layer validates it); later rounds
        # answer the tool results freely.
        choice = chat_tool_choice(self.body.tool_choice) if round_index == 0 else "auto" if tools else None
        text = self.body.text
        spec = ChatSpec(
            messages=[*self.messages, *self.added], tools=tools or None, tool_choice=choice,
            parallel_tool_calls=self.body.parallel_tool_calls, response_format=response_format(text),
            reasoning_effort=self.body.reasoning.effort if self.body.reasoning else None,
        )
        return with_header_tool_choice(spec, self.header_tool_choice) if round_index == 0 else spec

    def submit(self, round_index: int) -> tuple[PreparedChat, GenerationRequest]:
        try:
            prepared = prepare_chat(self.instance, self.spec(round_index))
        except APIError as exc:
            raise _renamed(exc) from None
        limit = self.body.max_output_tokens
        params = inference.sampling_params(
            self.body, max_tokens=None if limit is None else max(limit - self.usage["output_tokens"], 1))
        params.grammar = prepared.grammar
        params.render_special = prepared.render_special
        return prepared, inference.submit(self.instance, prepared.prompt, params, param="input")

    async def events(self) -> AsyncIterator[list[Event]]:
        """The stream events, a batch at a time; raises APIError on failure."""
        builder = self.builder
        with self.instance.in_use():
            yield builder.start()
            if self.toolbox is not None:
                for label, tools in _listed_tools(self.toolbox).items():
                    yield builder.mcp_list_tools(label, tools)
            incomplete = False
            for round_index in range(MAX_TOOL_ROUNDS + 1):
                prepared, generation = self.first if round_index == 0 and self.first else self.submit(round_index)
                output = prepared.new_output()
                finish: Finish | None = None
                try:
                    async for batch in generation:
                        events: list[Event] = []
                        for event in batch:
                            if isinstance(event, TextDelta):
                                events += builder.feed(output.feed(event.text))
                            elif event.reason == "error":
                                raise APIError(500, f"Generation failed: {event.error}", type="server_error")
                            else:
                                finish = event
                                events += builder.feed(output.finish())
                        if events:
                            yield events
                finally:
                    generation.cancel()
                if finish is None:
                    raise APIError(500, "generation ended without a result", type="server_error")
                self._account(finish, output)
                incomplete = finish.reason == "length"
                calls = output.result.tool_calls
                events, pending = builder.end_round(calls, status="incomplete" if incomplete else "completed")
                yield events
                self._record(output, calls)
                for index, call in pending:  # cut by max_output_tokens: no round is left to use their results
                    yield builder.mcp_skipped(index) if incomplete else await self._run_mcp(index, call)
                if incomplete or not pending or len(pending) < len(calls):
                    break
            if self.body.store:
                self.store.add(parent_id=self.body.previous_response_id, model=self.instance.id,
                               messages=[*self.turn, *self.added], response_id=builder.response["id"])
            if self.draft:  # lmkube: LM Studio's draft `stats` as an extra top-level key (SDKs keep it)
                builder.response["stats"] = self.draft
            yield builder.finish(self.usage, incomplete=incomplete)

    def _account(self, finish: Finish, output: ChatOutput) -> None:
        usage = self.usage
        usage["input_tokens"] += finish.prompt_tokens
        usage["input_tokens_details"]["cached_tokens"] += finish.cached_tokens
        usage["output_tokens"] += finish.completion_tokens
        usage["output_tokens_details"]["reasoning_tokens"] += inference.reasoning_tokens(
            self.instance, output.result.reasoning, finish.completion_tokens)
        usage["total_tokens"] = usage["input_tokens"] + usage["output_tokens"]
        inference.add_draft_stats(self.draft, finish)

    def _record(self, output: ChatOutput, calls: list[ToolCall]) -> None:
        result = output.result
        reply: dict[str, Any] = {"role": "assistant", "content": result.content}
        if result.reasoning:
            reply["reasoning_content"] = result.reasoning
        if calls:
            reply["tool_calls"] = [{"id": c.id, "type": "function",
                                    "function": {"name": c.name, "arguments": c.arguments}} for c in calls]
        self.added.append(reply)

    async def _run_mcp(self, index: int, call: ToolCall) -> list[Event]:
        assert self.toolbox is not None
        tool = self.toolbox.tools[call.name]
        arguments = tool.parse_arguments(call.arguments)
        if isinstance(arguments, str):
            output, error = arguments, arguments
        else:
            run = await self.toolbox.call(tool, arguments)
            output, error = run.output, run.error
        self.added.append({"role": "tool", "tool_call_id": call.id, "content": output})
        return self.builder.mcp_result(index, output, error)


def _listed_tools(toolbox: McpToolbox) -> dict[str, list[dict[str, Any]]]:
    listed: dict[str, list[dict[str, Any]]] = {}
    for connection in toolbox.connections:
        listed.setdefault(connection.integration.label, [])
    for tool in toolbox.tools.values():
        listed[tool.connection.integration.label].append(
            {"name": tool.tool, "description": tool.description, "input_schema": tool.input_schema,
             "annotations": None})
    return listed


def _response_body(body: ResponsesRequest, response_id: str, model: str) -> dict[str, Any]:
    """The Response object before any output: the request's settings echoed, status in_progress."""
    effort = body.reasoning.effort if body.reasoning else None
    return {
        "id": response_id, "object": "response", "created_at": int(time.time()), "status": "in_progress",
        "background": False, "completed_at": None, "error": None, "incomplete_details": None,
        "instructions": body.instructions, "max_output_tokens": body.max_output_tokens, "model": model,
        "output": [], "parallel_tool_calls": body.parallel_tool_calls,
        "previous_response_id": body.previous_response_id,
        "reasoning": {"effort": effort, "summary": None}, "store": body.store,
        "temperature": body.temperature, "text": {"format": (body.text.format if body.text else None)
                                                  or {"type": "text"}},
        "tool_choice": body.tool_choice if body.tool_choice is not None else "auto",
        "tools": echo_tools(body.tools), "top_p": body.top_p, "truncation": "disabled", "usage": None,
        "user": body.user, "metadata": body.metadata or {},
    }


async def start_response(body: ResponsesRequest, request: Request, manager: ModelManager,
                         store: ConversationStore) -> ResponseRun:
    """Validates the request, loads the model and submits the first round (so that bad input is an
    HTTP error, not an event in a started stream)."""
    turn = input_messages(body.input)
    tools = function_tools(body.tools)
    if tools.dropped:
        log.info("/v1/responses: left out tools this server cannot run: %s", ", ".join(tools.dropped))
    integrations = _integrations(tools.mcp, request) if tools.mcp else []
    response_format(body.text)  # validated before anything loads
    history: list[dict[str, Any]] = []
    if body.previous_response_id is not None:
        found = store.history(body.previous_response_id)
        if found is None:
            raise APIError(400, f"Previous response with id '{body.previous_response_id}' not found.",
                           param="previous_response_id", code="previous_response_not_found")
        history = found
    messages = _conversation(body.instructions, history, turn)
    if not messages:
        raise bad_request("'input' is required (a string or an array of input items).", param="input")
    toolbox = await open_toolbox(integrations) if integrations else None
    try:
        instance = await inference.acquire(manager, body.model, ttl=body.ttl, kind="llm")
        names = {name: McpName(t.connection.integration.label, t.tool) for name, t in toolbox.tools.items()} \
            if toolbox is not None else {}
        builder = ResponseBuilder(_response_body(body, new_response_id(), instance.id), names, tools.namespaced)
        run = ResponseRun(body, instance, store, messages, turn, tools.functions, toolbox, builder)
        run.header_tool_choice = request.headers.get(TOOL_CHOICE_HEADER)
        with instance.in_use():
            await inference.load_draft(instance, inference.sampling_params(body, max_tokens=None))
            run.first = run.submit(0)
    except BaseException:
        if toolbox is not None:
            await toolbox.close()
        raise
    return run


async def _stream(run: ResponseRun) -> AsyncIterator[bytes]:
    encoder = EventEncoder()
    try:
        async with aclosing(run.events()) as events:
            async for batch in events:
                yield encoder.encode(batch)
    except APIError as exc:  # the stream has started: report it in-band
        yield encoder.encode(run.builder.fail(error_message("/v1/responses", exc), exc.code or exc.type, exc.param))
    except Exception as exc:
        log.exception("/v1/responses stream failed")
        yield encoder.encode(run.builder.fail(f"Internal server error: {exc}", "server_error"))
    finally:
        if run.first is not None:
            run.first[1].cancel()
        if run.toolbox is not None:
            await run.toolbox.close()


async def _drain(run: ResponseRun) -> dict[str, Any]:
    try:
        async with aclosing(run.events()) as events:
            async for _ in events:
                pass
    finally:
        if run.first is not None:
            run.first[1].cancel()
        if run.toolbox is not None:
            await run.toolbox.close()
    return run.builder.response


@router.post("/v1/responses", response_model=None)
async def create_response(
    body: ResponsesRequest,
    request: Request,
    manager: Annotated[ModelManager, Depends(get_manager)],
    store: Annotated[ConversationStore, Depends(get_conversations)],
) -> dict[str, Any] | EventStreamResponse:
    run = await start_response(body, request, manager, store)
    if body.stream:
        return EventStreamResponse(_stream(run))
    return await unless_disconnected(request, _drain(run))
