"""POST /v1/responses: OpenAI's Responses API over the shared chat layer and the stored conversations.

A request becomes chat messages (`responses_input`), runs through `prepare_chat` like every chat
endpoint, and its parsed output (reasoning, text, tool calls) builds the Response object and its stream
events (`responses_events`). Responses are stored (unless `store: false`) in the conversation store that
`/api/v1/chat` uses, so `previous_response_id` continues a conversation started on either endpoint.
`instructions` apply to this request only and are not stored, as OpenAI documents.

`mcp` tools run on the server: a `server_url` (with `--allow-remote-mcp`), or a `server_label` of
mcp.json (with API tokens). Their tools go to the model next to the function tools; a round whose calls
are all MCP calls runs them, records `mcp_call` items and feeds the results back (at most
`MAX_TOOL_ROUNDS` rounds with tools). A call of a function tool ends the response with `function_call`
items for the client to answer with `function_call_output`. So does a call whose `require_approval`
asks for approval: an `mcp_approval_request` item, stored in the conversation as the assistant's call
under the request's id; the client's `mcp_approval_response` (with `previous_response_id`) runs it (an
`mcp_call` with `approval_request_id`) or gives the model a "not approved" result, and the run goes on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, Request

from ...chat.deltas import ChatDelta, ToolCall
from ...chat.session import TOOL_CHOICE_HEADER, ChatSpec
from ...conversations import ConversationStore, new_response_id
from ...engine.events import Finish
from ...engine.sampling import SamplingParams
from ...errors import APIError, bad_request, error_message
from ...mcp import Integration, McpTool, McpToolbox, open_toolbox, parse_integrations
from ...runtime.instance import ModelInstance
from ...runtime.manager import ModelManager
from ...streaming import EventStreamResponse, SseEvent, unless_disconnected
from .. import inference
from ..chat_run import ChatRun, Round, Sampling
from ..deps import get_conversations, get_manager
from ..tool_loop import ToolLoop, run_to_end, until_submitted
from .responses_events import EventEncoder, McpName, ResponseBuilder
from .responses_input import (
    ResponsesRequest,
    approvals,
    chat_tool_choice,
    check_require_approval,
    echo_tools,
    function_tools,
    input_messages,
    needs_approval,
    response_format,
)
from .responses_store import input_items as stored_input_items

log = logging.getLogger(__name__)


PATH = "/v1/responses"

NOT_APPROVED = "The user did not approve this tool call; it was not run."

# The chat layer names request fields the chat-completions way; these are their Responses names.
_PARAMS = {"messages": "input", "response_format": "text.format"}


def _renamed(error: APIError) -> APIError:
    if error.param is not None:
        head, _, rest = error.param.partition(".")
        if head in _PARAMS:
            error.param = _PARAMS[head] + ("." + rest if rest and head != "response_format" else "")
            error.message = error.message.replace("'response_format", "'text.format")
    return error


def _integrations(tools: list[dict[str, Any]], request: Request) -> tuple[list[Integration], dict[str, Any]]:
    """The request's `mcp` tools as MCP integrations, and each server's `require_approval` by label. One
    with a `server_url` is a per-request server (needs --allow-remote-mcp); one without names a server of
    mcp.json by its `server_label` (needs API tokens, as on /api/v1/chat)."""
    config = request.app.state.config
    items: list[str | dict[str, Any]] = []
    approval: dict[str, Any] = {}
    for index, tool in enumerate(tools):
        check_require_approval(tool.get("require_approval"), f"tools[{index}]")
        approval[str(tool.get("server_label"))] = tool.get("require_approval")
        if tool.get("connector_id") is not None:
            raise bad_request(f"tools[{index}]: connectors are not supported; give a server_url, or the "
                              "server_label of a server in mcp.json.", param="tools")
        allowed = tool.get("allowed_tools")
        if isinstance(allowed, dict):
            allowed = allowed.get("tool_names")
        if tool.get("server_url") is None:
            items.append({"type": "plugin", "id": f"mcp/{tool.get('server_label')}", "allowed_tools": allowed})
            continue
        if not config.allow_remote_mcp:
            raise bad_request("MCP tools with a server_url are disabled on this server; start it with "
                              "--allow-remote-mcp to allow them.", param="tools", code="remote_mcp_disabled")
        items.append({"type": "ephemeral_mcp", "server_label": tool.get("server_label"),
                      "server_url": tool["server_url"], "headers": tool.get("headers"), "allowed_tools": allowed})
    try:
        return parse_integrations(items, home=config.home, allow_remote=True, mcp_json=config.mcp_json,
                                  has_tokens=bool(request.app.state.api_tokens)), approval
    except APIError as exc:
        exc.param = "tools"
        raise


def server_label(integration: Integration) -> str:
    """The label the client gave the server (a plugin's id is `mcp/<server_label>`)."""
    return integration.label.removeprefix("mcp/") if integration.kind == "plugin" else integration.label


def _waiting_calls(history: list[dict[str, Any]]) -> list[ToolCall]:
    """The MCP calls of the conversation's last turn that wait for approval (no result yet)."""
    last = next((m for m in reversed(history) if m.get("role") == "assistant"), None)
    if last is None:
        return []
    answered = {m.get("tool_call_id") for m in history if m.get("role") == "tool"}
    return [ToolCall(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in last.get("tool_calls") or []
            if str(c.get("id")).startswith("mcpr_") and c["id"] not in answered]


def _answered(body: ResponsesRequest, history: list[dict[str, Any]]) -> tuple[list[ToolCall], list[dict[str, Any]]]:
    """The calls that waited for approval: the approved ones (to run), and results for the others (every
    call gets a result, so the conversation stays well formed when the client moved on)."""
    answers = {a.request_id: a.approve for a in approvals(body.input)}
    waiting = _waiting_calls(history)
    for request_id in answers.keys() - {call.id for call in waiting}:
        raise bad_request(f"No pending mcp_approval_request with id '{request_id}' in the conversation "
                          "continued by previous_response_id.", param="input", code="approval_request_not_found")
    approved = [call for call in waiting if answers.get(call.id)]
    refused = [{"role": "tool", "tool_call_id": call.id, "content": NOT_APPROVED}
               for call in waiting if not answers.get(call.id)]
    return approved, refused


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


def _sampling(body: ResponsesRequest, usage: dict[str, Any]) -> Sampling:
    """Each round's parameters: `max_output_tokens` bounds the output of all the rounds together."""
    def sampling(instance: ModelInstance) -> SamplingParams:
        limit = body.max_output_tokens
        left = None if limit is None else max(limit - usage["output_tokens"], 1)
        return inference.sampling_params(body, instance.sampling_defaults, max_tokens=left)
    return sampling


class ResponseEvents:
    """One validated /v1/responses request: `events()` runs it through the shared chat run and tool loop
    (model rounds, MCP calls, storing) as Responses stream events; `builder.response` is the result."""

    def __init__(self, body: ResponsesRequest, run: ChatRun, store: ConversationStore,
                 messages: list[dict[str, Any]], turn: list[dict[str, Any]], functions: list[dict[str, Any]],
                 toolbox: McpToolbox | None, builder: ResponseBuilder, usage: dict[str, Any],
                 approved: list[ToolCall]) -> None:
        self.body = body
        self.run = run
        self.store = store
        self.turn = turn  # what this request adds to the stored conversation (its input items)
        self.toolbox = toolbox
        self.builder = builder
        self.usage = usage  # summed over the rounds; `_sampling` reads it
        self.draft: dict[str, Any] = {}  # speculative decoding's counts, summed over the rounds
        self.incomplete = False
        self._pending: dict[str, int] = {}  # this round's MCP call ids → their output index
        spec = ChatSpec(messages=messages, tool_choice=chat_tool_choice(body.tool_choice),
                        parallel_tool_calls=body.parallel_tool_calls, response_format=response_format(body.text),
                        reasoning_effort=body.reasoning.effort if body.reasoning else None)
        self.loop = ToolLoop(run, spec, toolbox=toolbox, functions=functions, approved=approved)

    def submitted(self) -> bool:
        return bool(self.loop.rounds)

    def result(self) -> dict[str, Any]:
        return self.builder.response

    async def close(self) -> None:
        """Ends every round's generation and the MCP sessions."""
        self.run.cancel()
        if self.toolbox is not None:
            await self.toolbox.close()

    async def events(self) -> AsyncGenerator[list[SseEvent], None]:
        """The stream events, a batch at a time; raises APIError on failure."""
        builder = self.builder
        instance = self.run.instance
        with instance.in_use():
            yield builder.start()
            if self.toolbox is not None:
                for label, tools in _listed_tools(self.toolbox).items():
                    yield builder.mcp_list_tools(label, tools)
                for item in self.toolbox.unavailable:
                    yield builder.mcp_list_tools_failed(server_label(item.integration), item.reason)
                for call in self.loop.approved:
                    tool = self.toolbox.tools[call.name]
                    self._pending[call.id], events = builder.mcp_approved_call(
                        server_label(tool.integration), tool.tool, call.arguments, call.id)
                    yield events
            async for events in self.loop.events(self):
                yield events
            if self.draft:  # lmkube: LM Studio's draft `stats` as an extra top-level key (SDKs keep it)
                builder.response["stats"] = self.draft
            finished = builder.finish(self.usage, incomplete=self.incomplete)
            if self.body.store:  # the Response as returned, for GET /v1/responses/{id} (responses_store.py)
                self.store.add(parent_id=self.body.previous_response_id, model=instance.id,
                               messages=[*self.turn, *self.loop.added], response_id=builder.response["id"],
                               response=builder.response, input_items=stored_input_items(self.body.input))
            yield finished

    # -- the tool loop's encoding (LoopFamily) ---------------------------------------------------------

    def round_submitted(self, round: Round) -> list[SseEvent]:
        return []

    def feed(self, round: Round, deltas: list[ChatDelta]) -> list[SseEvent]:
        events: list[SseEvent] = []
        for delta in deltas:
            events += self.builder.feed(delta)
        return events

    def end_round(self, round: Round, offered: bool) -> tuple[list[SseEvent], list[ToolCall], bool]:
        finish = round.finish
        assert finish is not None
        self._account(round, finish)
        self.incomplete = finish.reason == "length"
        calls = round.result.tool_calls
        events, pending, _approvals = self.builder.end_round(
            calls, status="incomplete" if self.incomplete else "completed")
        if self.incomplete:  # cut by max_output_tokens: no round is left to use their results
            for index, _ in pending:
                events += self.builder.mcp_skipped(index)
            return events, [], False
        self._pending = {call.id: index for index, call in pending}
        # A call of a client's function, or one waiting for approval, ends the response: the client answers it.
        return events, [call for _, call in pending], bool(pending) and len(pending) == len(calls)

    def tool_started(self, tool: McpTool, arguments: dict[str, Any]) -> list[SseEvent]:
        return []

    def tool_done(self, call: ToolCall, tool: McpTool | None, arguments: dict[str, Any] | str | None,
                  output: str, error: str | None, protocol: bool = False) -> list[SseEvent]:
        return self.builder.mcp_result(self._pending[call.id], output, error, protocol=protocol)

    def _account(self, round: Round, finish: Finish) -> None:
        usage = self.usage
        usage["input_tokens"] += finish.prompt_tokens
        usage["input_tokens_details"]["cached_tokens"] += finish.cached_tokens
        usage["output_tokens"] += finish.completion_tokens
        usage["output_tokens_details"]["reasoning_tokens"] += inference.reasoning_tokens(
            round.instance, round.result.reasoning, finish.completion_tokens)
        usage["total_tokens"] = usage["input_tokens"] + usage["output_tokens"]
        inference.add_draft_stats(self.draft, finish)


def _listed_tools(toolbox: McpToolbox) -> dict[str, list[dict[str, Any]]]:
    listed: dict[str, list[dict[str, Any]]] = {}
    for source in toolbox.sources:
        listed.setdefault(server_label(source.integration), [])
    for tool in toolbox.tools.values():
        listed[server_label(tool.integration)].append(
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
                         store: ConversationStore) -> ResponseEvents:
    """Validates the request and loads the model (so that bad input is an HTTP error, not an event in a
    started stream); the first round is submitted by the caller (`until_submitted`, or the drain)."""
    turn = input_messages(body.input)
    tools = function_tools(body.tools)
    if tools.dropped:
        log.info("/v1/responses: left out tools this server cannot run: %s", ", ".join(tools.dropped))
    integrations, approval = _integrations(tools.mcp, request) if tools.mcp else ([], {})
    response_format(body.text)  # validated before anything loads
    history: list[dict[str, Any]] = []
    if body.previous_response_id is not None:
        found = store.history(body.previous_response_id)
        if found is None:
            raise APIError(404, f"Previous response with id '{body.previous_response_id}' not found.",
                           param="previous_response_id", code="previous_response_not_found")
        history = found
    elif approvals(body.input):
        raise bad_request("mcp_approval_response items answer a stored response: send its id as "
                          "previous_response_id.", param="previous_response_id")
    approved, refused = _answered(body, history)
    turn = [*refused, *turn]
    messages = _conversation(body.instructions, history, turn)
    if not messages:
        raise bad_request("'input' is required (a string or an array of input items).", param="input")
    toolbox = await open_toolbox(integrations, sessions=request.app.state.mcp_sessions,
                                 call_timeout=request.app.state.config.mcp_call_timeout) if integrations else None
    try:
        if toolbox is not None and toolbox.unavailable and not toolbox.tools and \
                body.tool_choice not in (None, "auto", "none"):  # a forced call with no server to take it
            first = toolbox.unavailable[0]
            raise APIError(502, first.reason, type="external_connector_error", param="tools", code="http_error")
        usage = _usage_zero()
        run = await ChatRun.open(manager, body.model, ttl=body.ttl, sampling=_sampling(body, usage), param="input",
                                 header_tool_choice=request.headers.get(TOOL_CHOICE_HEADER), rename=_renamed)
        instance = run.instance
        names = {name: McpName(server_label(t.integration), t.tool,
                               needs_approval(approval.get(server_label(t.integration)), t.tool))
                 for name, t in toolbox.tools.items()} if toolbox is not None else {}
        for call in approved:
            if call.name not in names:
                raise bad_request(f"The approved call of '{call.name}' needs its MCP server in 'tools' again.",
                                  param="tools", code="approval_tool_missing")
        builder = ResponseBuilder(_response_body(body, new_response_id(), instance.id), names, tools.namespaced)
        response = ResponseEvents(body, run, store, messages, turn, tools.functions, toolbox, builder, usage,
                                  approved)
    except BaseException:
        if toolbox is not None:
            await toolbox.close()
        raise
    return response


async def _stream(response: ResponseEvents, head: list[list[SseEvent]],
                  rest: AsyncGenerator[list[SseEvent], None]) -> AsyncIterator[bytes]:
    encoder = EventEncoder()
    try:
        for batch in head:
            if batch:  # the first round's submission has no event of its own here
                yield encoder.encode(batch)
        async for batch in rest:
            if batch:
                yield encoder.encode(batch)
    except APIError as exc:  # the stream has started: report it in-band
        yield encoder.encode(response.builder.fail(error_message(PATH, exc), exc.code or exc.type, exc.param))
    except Exception as exc:
        log.exception("/v1/responses stream failed")
        yield encoder.encode(response.builder.fail(f"Internal server error: {exc}", "server_error"))
    finally:
        await rest.aclose()
        await response.close()


async def create_response(
    body: ResponsesRequest,
    request: Request,
    manager: Annotated[ModelManager, Depends(get_manager)],
    store: Annotated[ConversationStore, Depends(get_conversations)],
) -> dict[str, Any] | EventStreamResponse:
    response = await start_response(body, request, manager, store)
    if body.stream:
        return EventStreamResponse(_stream(response, *await until_submitted(response)))
    with response.run.instance.in_use():  # until the drain's first round is submitted
        return await unless_disconnected(request, run_to_end(response))
