"""LM Studio's native /api/v1 chat endpoint: `POST /api/v1/chat`, stateful and streaming.

One async generator (`NativeChatEvents.events`) drives a request from the model load to the last token and
yields LM Studio's named events; streaming writes them as SSE, non-streaming drains it and returns
the `chat.end` result. Templates, reasoning splitting and sampling are the shared chat layer's.

With MCP `integrations` the server runs the tool loop itself: the servers' tools go to the model as
function tools, each call the model makes is sent to its MCP server and the result goes back into the
context, until the model answers without calling a tool (at most `MAX_TOOL_ROUNDS` rounds with tools;
one more round without tools then has to answer). lmkube extension: a `tool_choice` field
("auto" | "none" | "required" | {"type": "function", "function": {"name": ...}}) applies to the first
round only; later rounds run with "auto".
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Annotated, Any, Literal

from fastapi import Depends, Request
from pydantic import ConfigDict, Field

from ...chat.deltas import ChatDelta, ChatResult, ToolCall
from ...chat.images import image_url_part
from ...chat.session import ChatSpec
from ...conversations import ConversationStore
from ...engine.events import Finish
from ...engine.sampling import SamplingParams
from ...errors import APIError, api_error_body
from ...mcp import McpTool, McpToolbox, open_toolbox, parse_integrations, unavailable_error
from ...runtime.instance import ModelInstance
from ...runtime.manager import ModelManager
from ...store.model_store import ModelNotFound, ModelVariant
from ...streaming import EventStreamResponse, SseEvent, sse_event, unless_disconnected
from .. import inference
from ..chat_run import ChatRun, Round
from ..deps import get_conversations, get_manager
from ..draft_fields import DraftFields
from ..tool_loop import ToolLoop, run_to_end, until_submitted

log = logging.getLogger(__name__)


PATH = "/api/v1/chat"


class NativeChatRequest(DraftFields):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    input: str | list[Any]
    system_prompt: str | None = None
    integrations: list[str | dict[str, Any]] | None = None
    stream: bool = False
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repeat_penalty: float | None = Field(default=None, gt=0.0)
    # Not in LM Studio's documented schema; accepted as llama.cpp extensions.
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    seed: int | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    reasoning: Literal["off", "low", "medium", "high", "on"] | None = None
    context_length: int | None = Field(default=None, ge=1)
    store: bool = True
    previous_response_id: str | None = None
    ttl: float | None = Field(default=None, gt=0, description="idle seconds for a model this request JIT-loads")
    # lmkube extension: tool_choice for the first round of the MCP tool loop (later rounds: "auto").
    tool_choice: str | dict[str, Any] | None = None

    def sampling(self, instance: ModelInstance) -> SamplingParams:
        return inference.sampling_params(self, instance.sampling_defaults, max_tokens=self.max_output_tokens)


def _invalid_input(message: str) -> APIError:
    return APIError(400, message, param="input", code="invalid_union")


def _parse_input(value: str | list[Any]) -> tuple[str | list[dict[str, Any]], bool]:
    """The user's message content (the chat layer's text and image parts where there are images), and
    whether the input had images."""
    if isinstance(value, str):
        return value, False
    if not value:
        raise _invalid_input("'input' must be a string or a non-empty array of items.")
    texts: list[str] = []
    parts: list[dict[str, Any]] = []
    images = False
    for index, item in enumerate(value):
        kind = item.get("type") if isinstance(item, dict) else None
        if kind in ("text", "message"):  # the docs' table says "message", the real server "text": take both
            content = item.get("content")
            if not isinstance(content, str):
                raise _invalid_input(f"input[{index}].content must be a string.")
            texts.append(content)
            parts.append({"type": "text", "text": ("\n" if len(texts) > 1 else "") + content})
        elif kind == "image":
            if not isinstance(item.get("data_url"), str):
                raise _invalid_input(f"input[{index}].data_url must be a string (a data: URL).")
            images = True
            parts.append(image_url_part(item["data_url"]))
        else:
            raise _invalid_input(f"Invalid discriminator value at input[{index}]. Expected 'text' | 'image'")
    return (parts if images else "\n".join(texts)), images


def _check_model(manager: ModelManager, name: str) -> tuple[ModelInstance | None, ModelVariant | None]:
    """The loaded instance for `name`, else the variant a JIT load would load (404 for unknown models,
    400 for embedding models, both before anything is loaded or evicted)."""
    loaded = manager.find_loaded(name)
    if loaded is not None:
        return loaded, None
    try:
        if not manager.settings.jit:
            raise ModelNotFound(name, manager.listed_model_ids())
        variant = manager.store.resolve(name)
    except ModelNotFound as exc:
        raise inference.model_not_found(exc) from None
    return None, variant


def _conversation(history: list[dict[str, Any]], turn: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """History plus this turn; the latest system prompt is the conversation's, and it goes first."""
    messages = [*history, *turn]
    systems = [m for m in messages if m.get("role") == "system"]
    rest = [m for m in messages if m.get("role") != "system"]
    return [systems[-1], *rest] if systems else rest


class NativeChatEvents:
    """LM Studio's events and result for one /api/v1/chat request: `events()` runs it through the shared
    chat run and tool loop, `result()` is the response body."""

    def __init__(self, manager: ModelManager, store: ConversationStore, body: NativeChatRequest,
                 history: list[dict[str, Any]], turn: list[dict[str, Any]], instance_id: str,
                 toolbox: McpToolbox | None = None) -> None:
        self.manager = manager
        self.store = store
        self.body = body
        self.history = history
        self.turn = turn  # the messages this request adds: system prompt (if any) and the user input
        self.instance_id = instance_id
        self.toolbox = toolbox
        self.output: list[dict[str, Any]] = []
        self.stats: dict[str, Any] = {"input_tokens": 0, "total_output_tokens": 0, "reasoning_output_tokens": 0,
                                      "tokens_per_second": 0.0, "time_to_first_token_seconds": 0.0}
        self.response_id: str | None = None
        self.loop: ToolLoop | None = None
        self._open: str | None = None  # the output item being written: "reasoning" | "message"
        self._first_finish = True
        self._round_started = False  # the current round's first batch has been seen
        self._announced: set[int] = set()  # the current round's tool calls with a tool_call.start
        self._opened: ChatRun | None = None  # the run `_load` opened
        self._loading = False  # a JIT load has begun: the stream starts now, to show its progress live
        self._prefill_sent = 0.0  # the current round's last prompt_processing.progress

    def result(self) -> dict[str, Any]:
        body: dict[str, Any] = {"model_instance_id": self.instance_id, "output": self.output, "stats": self.stats}
        if self.response_id is not None:
            body["response_id"] = self.response_id
        return body

    def submitted(self) -> bool:
        """Whether the stream may start: once the first round is submitted (so that a refusal is an HTTP
        error), or as soon as a JIT load begins, whose progress the client should see as it happens (what
        refuses the request after that comes as an `error` event, as LM Studio sends it)."""
        return self._loading or (self.loop is not None and bool(self.loop.rounds))

    async def close(self) -> None:
        """Ends every round's generation and the MCP sessions."""
        if self.loop is not None:
            self.loop.run.cancel()
        if self.toolbox is not None:
            await self.toolbox.close()

    async def events(self) -> AsyncGenerator[list[SseEvent], None]:
        """LM Studio's events for this request, a batch at a time; raises APIError on failure."""
        body = self.body
        yield [("chat.start", {"model_instance_id": self.instance_id})]
        loads = self.manager.find_loaded(body.model) is None
        if loads:
            self._loading = True
            yield [("model_load.start", {"model_instance_id": self.instance_id})]
            async for events in self._load():
                yield events
            assert self._opened is not None
            run = self._opened
        else:
            run = await self._open_run()
        run.report_prefill = True
        instance = run.instance
        with instance.in_use():  # entered before any other await: nothing can unload it under us
            self.instance_id = instance.id
            if loads:
                instance.claims -= 1  # in use now: the claim `_load` took is no longer needed
                self.stats["model_load_time_seconds"] = round(instance.load_seconds, 3)
                yield [("model_load.end", {"model_instance_id": instance.id,
                                           "load_time_seconds": round(instance.load_seconds, 3)})]
            for item in self.toolbox.unavailable if self.toolbox is not None else []:
                # A server that could not start: the chat goes on without its tools, and says why.
                failure = {"reason": item.reason,
                           "metadata": {"type": "invalid_name", "tool_name": item.integration.label}}
                self.output.append({"type": "invalid_tool_call", **failure})
                yield [("tool_call.failure", failure)]
            has_tools = self.toolbox is not None and bool(self.toolbox.tools)
            choice = (body.tool_choice if body.tool_choice is not None else "auto") if has_tools else None
            spec = ChatSpec(messages=_conversation(self.history, self.turn), tool_choice=choice,
                            reasoning_effort=body.reasoning)
            self.loop = ToolLoop(run, spec, toolbox=self.toolbox)
            async for events in self.loop.events(self):
                yield events
            if body.store:
                node = self.store.add(parent_id=body.previous_response_id, model=instance.id,
                                      messages=[*self.turn, *self.loop.added])
                self.response_id = node.id

    async def _open_run(self, on_load_progress: Callable[[float], None] | None = None) -> ChatRun:
        body = self.body
        return await ChatRun.open(self.manager, body.model, ttl=body.ttl, context_length=body.context_length,
                                  sampling=body.sampling, param="input",
                                  on_load_progress=on_load_progress)

    async def _load(self) -> AsyncIterator[list[SseEvent]]:
        """JIT-loads the model (`_opened` is then the run), with a `model_load.progress` event for each step of
        llama.cpp's load callback, in order, ending at 1.0. The loaded instance comes with one claim (so that
        nothing unloads it before the caller uses it), which the caller drops once it is in use."""
        updates: asyncio.Queue[float | None] = asyncio.Queue()

        async def opened() -> ChatRun:
            run = await self._open_run(updates.put_nowait)
            run.instance.claims += 1  # no await before this: the manager's own claim ended just now
            return run

        task = asyncio.create_task(opened())
        # After every progress update: the loading thread schedules them before its own result.
        task.add_done_callback(lambda _task: updates.put_nowait(None))
        sent = 0.0
        try:
            while (fraction := await updates.get()) is not None:
                sent = fraction
                yield [("model_load.progress", {"model_instance_id": self.instance_id, "progress": fraction})]
            run = task.result()  # raises what the load raised (a load failure)
            if sent < 1.0:  # loaded by another request's load that had made progress before this one listened
                yield [("model_load.progress", {"model_instance_id": run.instance.id, "progress": 1.0})]
            self._opened = run
        finally:
            if not task.done():
                task.cancel()
            elif self._opened is None and not task.cancelled() and task.exception() is None:
                task.result().instance.claims -= 1  # the stream was closed before it could use the instance

    # -- the tool loop's encoding (LoopFamily) ---------------------------------------------------------

    def round_submitted(self, round: Round) -> list[SseEvent]:
        self._round_started = False
        self._announced = set()
        self._prefill_sent = 0.0
        return [("prompt_processing.start", {})]

    def feed(self, round: Round, deltas: list[ChatDelta]) -> list[SseEvent]:
        events: list[SseEvent] = []
        if not self._round_started and not deltas and round.finish is None:
            # A chunk of a long prompt was computed (the engine prefills in chunks of the batch size).
            if round.prefill > self._prefill_sent:
                self._prefill_sent = round.prefill
                events.append(("prompt_processing.progress", {"progress": self._prefill_sent}))
            return events
        if not self._round_started:
            events += [("prompt_processing.progress", {"progress": 1.0}), ("prompt_processing.end", {})]
            self._round_started = True
        for delta in deltas:
            self._append("reasoning", delta.reasoning, events)
            self._append("message", delta.content, events)
            for piece in delta.tool_calls:
                tool = self.toolbox.tools.get(piece.name) if self.toolbox and piece.name else None
                if tool is not None and piece.index not in self._announced:
                    self._announced.add(piece.index)
                    self._close(events)
                    events.append(("tool_call.start", {"tool": tool.tool, "provider_info": tool.provider_info}))
        if round.finish is not None:
            self._close(events)
            self._account(round.instance, round.finish, round.result)
        return events

    def end_round(self, round: Round, offered: bool) -> tuple[list[SseEvent], list[ToolCall], bool]:
        calls = round.result.tool_calls if offered else []
        return [], calls, bool(calls)

    def tool_started(self, tool: McpTool, arguments: dict[str, Any]) -> list[SseEvent]:
        return [("tool_call.arguments", {"tool": tool.tool, "arguments": arguments,
                                         "provider_info": tool.provider_info})]

    def tool_done(self, call: ToolCall, tool: McpTool | None, arguments: dict[str, Any] | str | None,
                  output: str, error: str | None, protocol: bool = False) -> list[SseEvent]:
        if tool is None:
            failure: dict[str, Any] = {"reason": output, "metadata": {"type": "invalid_name", "tool_name": call.name}}
        elif error is not None:
            failure = {"reason": error, "metadata": {
                "type": "invalid_arguments", "tool_name": tool.tool,
                "arguments": call.arguments if isinstance(arguments, str) else arguments,
                "provider_info": tool.provider_info}}
        else:
            item = {"type": "tool_call", "tool": tool.tool, "arguments": arguments, "output": output,
                    "provider_info": tool.provider_info}
            self.output.append(item)
            return [("tool_call.success", {k: v for k, v in item.items() if k != "type"})]
        self.output.append({"type": "invalid_tool_call", **failure})
        return [("tool_call.failure", failure)]

    def _append(self, kind: str, text: str, events: list[SseEvent]) -> None:
        if not text:
            return
        if self._open != kind:
            self._close(events)
            events.append((f"{kind}.start", {}))
            self.output.append({"type": kind, "content": ""})
            self._open = kind
        self.output[-1]["content"] += text
        events.append((f"{kind}.delta", {"content": text}))

    def _close(self, events: list[SseEvent]) -> None:
        if self._open is not None:
            events.append((f"{self._open}.end", {}))
            self._open = None

    def _account(self, instance: ModelInstance, finish: Finish, result: ChatResult) -> None:
        """Adds one round's token counts to the stats (prompt and output tokens summed over the rounds)."""
        reasoning_tokens = inference.reasoning_tokens(instance, result.reasoning, finish.completion_tokens)
        stats = self.stats
        first = self._first_finish
        self._first_finish = False
        stats["input_tokens"] = (0 if first else stats["input_tokens"]) + finish.prompt_tokens
        stats["total_output_tokens"] = (0 if first else stats["total_output_tokens"]) + finish.completion_tokens
        stats["reasoning_output_tokens"] = (0 if first else stats["reasoning_output_tokens"]) + reasoning_tokens
        stats["tokens_per_second"] = finish.tokens_per_second
        if first:
            stats["time_to_first_token_seconds"] = finish.time_to_first_token or 0.0
        inference.add_draft_stats(stats, finish)


async def _stream(chat: NativeChatEvents, head: list[list[SseEvent]],
                  rest: AsyncGenerator[list[SseEvent], None]) -> AsyncIterator[bytes]:
    async def batches() -> AsyncIterator[list[SseEvent]]:
        for batch in head:
            yield batch
        async for batch in rest:
            yield batch

    try:
        async for events in batches():
            yield b"".join(sse_event(name, data) for name, data in events)
    except APIError as exc:
        yield sse_event("error", {"error": api_error_body(PATH, exc)["error"]})
    except Exception as exc:  # the stream has started: report it in-band, then still end it
        yield sse_event("error", {"error": {"type": "internal_error", "message": f"Internal server error: {exc}"}})
    finally:
        await rest.aclose()
        await chat.close()
    yield sse_event("chat.end", {"result": chat.result()})


async def chat(
    body: NativeChatRequest,
    request: Request,
    manager: Annotated[ModelManager, Depends(get_manager)],
    store: Annotated[ConversationStore, Depends(get_conversations)],
) -> dict[str, Any] | EventStreamResponse:
    config = request.app.state.config
    integrations = parse_integrations(
        body.integrations or [], home=config.home, allow_remote=config.allow_remote_mcp,
        has_tokens=bool(request.app.state.api_tokens), mcp_json=config.mcp_json,
    )
    if body.tool_choice not in (None, "auto", "none") and not integrations:
        raise APIError(400, "tool_choice requires MCP integrations (the tools come from them).", param="tool_choice")
    content, images = _parse_input(body.input)
    loaded, variant = _check_model(manager, body.model)
    if body.draft_model is not None:  # refused before a stream starts; compatibility is checked at submit
        try:
            manager.store.resolve(body.draft_model)
        except ModelNotFound as exc:
            raise inference.draft_not_found(exc) from None
    if variant is not None and variant.type != "llm":
        raise APIError(400, f"Model \"{body.model}\" is an embedding model; it cannot serve this endpoint.",
                       param="model", code="model_not_supported")
    target = loaded.variant if loaded is not None else variant
    if images and (target is None or target.mmproj_path is None):
        raise APIError(400, f"Model \"{body.model}\" does not support image input (it has no vision projector).",
                       param="input", code="model_not_vision_capable")
    history: list[dict[str, Any]] = []
    if body.previous_response_id is not None:
        if not body.previous_response_id.startswith("resp_"):
            raise APIError(400, "'previous_response_id' must start with 'resp_'.", param="previous_response_id")
        found = store.history(body.previous_response_id)
        if found is None:
            raise APIError(404, f"Response with id '{body.previous_response_id}' not found.",
                           param="previous_response_id", code="previous_response_not_found")
        history = found
    turn: list[dict[str, Any]] = []
    if body.system_prompt is not None:
        turn.append({"role": "system", "content": body.system_prompt})
    turn.append({"role": "user", "content": content})
    instance_id = loaded.id if loaded is not None else variant.model_key if variant is not None else body.model
    toolbox = await open_toolbox(integrations, sessions=request.app.state.mcp_sessions,
                                 call_timeout=config.mcp_call_timeout) if integrations else None
    if toolbox is not None and not toolbox.tools and body.tool_choice not in (None, "auto", "none"):
        await toolbox.close()
        if toolbox.unavailable:  # a forced call with no server to take it
            raise unavailable_error(toolbox)
        raise APIError(400, "tool_choice requires tools, but the integrations offer none (check allowed_tools).",
                       param="tool_choice")
    native = NativeChatEvents(manager, store, body, history, turn, instance_id, toolbox)
    if body.stream:
        return EventStreamResponse(_stream(native, *await until_submitted(native)))
    return await unless_disconnected(request, run_to_end(native))
