"""LM Studio's native /api/v1 chat endpoint: `POST /api/v1/chat`, stateful and streaming.

One async generator (`NativeChat.events`) drives a request from the model load to the last token and
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
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import ConfigDict, Field

from ...chat.session import ChatOutput, ChatSpec, prepare_chat
from ...conversations import ConversationStore
from ...engine.events import Finish, TextDelta
from ...engine.sampling import SamplingParams
from ...errors import APIError, error_body
from ...mcp import MAX_TOOL_ROUNDS, McpToolbox, open_toolbox, parse_integrations
from ...runtime.instance import ModelInstance
from ...runtime.manager import ModelManager
from ...store.model_store import ModelNotFound, ModelVariant
from ...streaming import EventStreamResponse, sse_event, unless_disconnected
from .. import inference
from ..deps import get_conversations, get_manager
from ..draft_fields import DraftFields

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api/v1")

Event = tuple[str, dict[str, Any]]


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

    def sampling(self) -> SamplingParams:
        return inference.sampling_params(self, max_tokens=self.max_output_tokens)


def _invalid_input(message: str) -> APIError:
    return APIError(400, message, param="input", code="invalid_union")


def _parse_input(value: str | list[Any]) -> tuple[str, bool]:
    """The user's text, and whether the input had images."""
    if isinstance(value, str):
        return value, False
    if not value:
        raise _invalid_input("'input' must be a string or a non-empty array of items.")
    texts: list[str] = []
    images = False
    for index, item in enumerate(value):
        kind = item.get("type") if isinstance(item, dict) else None
        if kind in ("text", "message"):  # the docs' table says "message", the real server "text": take both
            content = item.get("content")
            if not isinstance(content, str):
                raise _invalid_input(f"input[{index}].content must be a string.")
            texts.append(content)
        elif kind == "image":
            if not isinstance(item.get("data_url"), str):
                raise _invalid_input(f"input[{index}].data_url must be a string (a data: URL).")
            images = True
        else:
            raise _invalid_input(f"Invalid discriminator value at input[{index}]. Expected 'text' | 'image'")
    return "\n".join(texts), images


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


class NativeChat:
    """One /api/v1/chat request after validation: `events()` runs it, `result()` is the response body."""

    def __init__(self, manager: ModelManager, store: ConversationStore, body: NativeChatRequest,
                 history: list[dict[str, Any]], turn: list[dict[str, Any]], instance_id: str,
                 toolbox: McpToolbox | None = None) -> None:
        self.manager = manager
        self.store = store
        self.body = body
        self.history = history
        self.turn = turn  # the messages this request adds: system prompt (if any) and the user input
        self.instance_id = instance_id
        self.output: list[dict[str, Any]] = []
        self.stats: dict[str, Any] = {"input_tokens": 0, "total_output_tokens": 0, "reasoning_output_tokens": 0,
                                      "tokens_per_second": 0.0, "time_to_first_token_seconds": 0.0}
        self.response_id: str | None = None
        self._open: str | None = None  # the output item being written: "reasoning" | "message"
        self.toolbox = toolbox
        self.added: list[dict[str, Any]] = []  # assistant tool-call and tool messages of this request's loop
        self._first_finish = True

    def result(self) -> dict[str, Any]:
        body: dict[str, Any] = {"model_instance_id": self.instance_id, "output": self.output, "stats": self.stats}
        if self.response_id is not None:
            body["response_id"] = self.response_id
        return body

    async def _acquire(self) -> ModelInstance:
        body = self.body
        if body.context_length is None:
            return await inference.acquire(self.manager, body.model, ttl=body.ttl, kind="llm")
        try:  # the kind was checked before the stream started (_check_model)
            return await self.manager.acquire(body.model, ttl=body.ttl, context_length=body.context_length)
        except ModelNotFound as exc:
            raise inference.model_not_found(exc) from None

    def _append(self, kind: str, text: str, events: list[Event]) -> None:
        if not text:
            return
        if self._open != kind:
            self._close(events)
            events.append((f"{kind}.start", {}))
            self.output.append({"type": kind, "content": ""})
            self._open = kind
        self.output[-1]["content"] += text
        events.append((f"{kind}.delta", {"content": text}))

    def _close(self, events: list[Event]) -> None:
        if self._open is not None:
            events.append((f"{self._open}.end", {}))
            self._open = None

    async def events(self) -> AsyncGenerator[list[Event], None]:
        """LM Studio's events for this request, a batch at a time; raises APIError on failure."""
        body = self.body
        yield [("chat.start", {"model_instance_id": self.instance_id})]
        loads = self.manager.find_loaded(body.model) is None
        if loads:
            yield [("model_load.start", {"model_instance_id": self.instance_id})]
        instance = await self._acquire()
        with instance.in_use():  # entered before any other await: nothing can unload it under us
            self.instance_id = instance.id
            if loads:
                self.stats["model_load_time_seconds"] = round(instance.load_seconds, 3)
                yield [("model_load.progress", {"model_instance_id": instance.id, "progress": 1.0}),
                       ("model_load.end", {"model_instance_id": instance.id,
                                           "load_time_seconds": round(instance.load_seconds, 3)})]
            messages = _conversation(self.history, self.turn)
            tools = self.toolbox.openai_tools() if self.toolbox is not None and self.toolbox.tools else None
            for round_index in range(MAX_TOOL_ROUNDS + 1):
                offered = tools if round_index < MAX_TOOL_ROUNDS else None
                if tools and offered is None:
                    log.warning("MCP tool loop: %d rounds called tools; the last round runs without tools",
                                MAX_TOOL_ROUNDS)
                choice = (body.tool_choice if round_index == 0 and body.tool_choice is not None else "auto") \
                    if offered else None
                spec = ChatSpec(messages=[*messages, *self.added], tools=offered, tool_choice=choice,
                                reasoning_effort=body.reasoning)
                output: ChatOutput | None = None
                async for events in self._generate(instance, spec):
                    if isinstance(events, list):
                        yield events
                    else:
                        output = events
                calls = output.result.tool_calls if output is not None and offered else []
                if not calls:
                    self._store(instance, output)
                    return
                self.added.append({"role": "assistant", "content": output.result.content, "tool_calls": [
                    {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                    for c in calls]})
                for call in calls:
                    async for events in self._run_tool(call):
                        yield events

    async def _generate(self, instance: ModelInstance, spec: ChatSpec) -> AsyncIterator[list[Event] | ChatOutput]:
        """One model round: its events, then (last) its ChatOutput."""
        prepared = await asyncio.to_thread(prepare_chat, instance, spec, param="input")
        params = self.body.sampling()
        params.grammar = prepared.grammar
        params.render_special = prepared.render_special
        await inference.load_draft(instance, params)
        generation = inference.submit(instance, prepared.prompt, params, param="input")
        yield [("prompt_processing.start", {})]
        output: ChatOutput = prepared.new_output()
        first = True
        started: set[int] = set()
        try:
            async for batch in generation:
                events: list[Event] = []
                if first:
                    events += [("prompt_processing.progress", {"progress": 1.0}), ("prompt_processing.end", {})]
                    first = False
                for event in batch:
                    if isinstance(event, TextDelta):
                        delta = output.feed(event.text)
                    elif event.reason == "error":
                        raise APIError(500, f"Generation failed: {event.error}", type="server_error")
                    else:
                        delta = output.finish()
                    self._append("reasoning", delta.reasoning, events)
                    self._append("message", delta.content, events)
                    for piece in delta.tool_calls:
                        tool = self.toolbox.tools.get(piece.name) if self.toolbox and piece.name else None
                        if tool is not None and piece.index not in started:
                            started.add(piece.index)
                            self._close(events)
                            events.append(("tool_call.start", {"tool": tool.tool, "provider_info": tool.provider_info}))
                    if isinstance(event, Finish):
                        self._close(events)
                        self._account(instance, event, output)
                if events:
                    yield events
        finally:
            generation.cancel()
        yield output

    async def _run_tool(self, call: Any) -> AsyncIterator[list[Event]]:
        """Runs one of the model's tool calls on its MCP server; records the item and the tool message."""
        tool = self.toolbox.tools.get(call.name) if self.toolbox is not None else None
        failure: dict[str, Any] | None = None
        if tool is None:
            reason = f"Cannot find tool with name {call.name}."
            failure = {"reason": reason, "metadata": {"type": "invalid_name", "tool_name": call.name}}
            content = reason
        else:
            arguments = tool.parse_arguments(call.arguments)
            if isinstance(arguments, str):
                reason = arguments
                failure = {"reason": reason, "metadata": {"type": "invalid_arguments", "tool_name": tool.tool,
                                                          "arguments": call.arguments,
                                                          "provider_info": tool.provider_info}}
                content = reason
            else:
                info = {"tool": tool.tool, "arguments": arguments, "provider_info": tool.provider_info}
                yield [("tool_call.arguments", info)]
                run = await self.toolbox.call(tool, arguments)
                content = run.output
                if run.error is not None:
                    failure = {"reason": run.error, "metadata": {"type": "invalid_arguments", "tool_name": tool.tool,
                                                                 "arguments": arguments,
                                                                 "provider_info": tool.provider_info}}
                else:
                    item = {"type": "tool_call", "tool": tool.tool, "arguments": arguments, "output": run.output,
                            "provider_info": tool.provider_info}
                    self.output.append(item)
                    yield [("tool_call.success", {k: v for k, v in item.items() if k != "type"})]
        if failure is not None:
            self.output.append({"type": "invalid_tool_call", **failure})
            yield [("tool_call.failure", failure)]
        self.added.append({"role": "tool", "tool_call_id": call.id, "content": content})

    def _account(self, instance: ModelInstance, finish: Finish, output: ChatOutput) -> None:
        """Adds one round's token counts to the stats (prompt and output tokens summed over the rounds)."""
        reasoning_tokens = inference.reasoning_tokens(instance, output.result.reasoning, finish.completion_tokens)
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

    def _store(self, instance: ModelInstance, output: ChatOutput | None) -> None:
        if not self.body.store or output is None:
            return
        result = output.result
        reply: dict[str, Any] = {"role": "assistant", "content": result.content}
        if result.reasoning:
            reply["reasoning_content"] = result.reasoning
        node = self.store.add(parent_id=self.body.previous_response_id, model=instance.id,
                              messages=[*self.turn, *self.added, reply])
        self.response_id = node.id


async def _admitted(chat: NativeChat) -> tuple[list[list[Event]], AsyncGenerator[list[Event], None]]:
    """The chat's events up to its first generation's submission, and the iterator of the rest.

    Streaming starts only after this, so a refused request (full queue, prompt too long, unknown model)
    gets its HTTP status and Retry-After like every other family, not a 200 carrying `event: error`."""
    events = chat.events()
    head: list[list[Event]] = []
    try:
        async for batch in events:
            head.append(batch)
            if any(name == "prompt_processing.start" for name, _ in batch):
                break
    except BaseException:
        await events.aclose()
        if chat.toolbox is not None:
            await chat.toolbox.close()
        raise
    return head, events


async def _stream(
    chat: NativeChat, head: list[list[Event]], rest: AsyncGenerator[list[Event], None]
) -> AsyncIterator[bytes]:
    async def batches() -> AsyncIterator[list[Event]]:
        for batch in head:
            yield batch
        async for batch in rest:
            yield batch

    try:
        async for events in batches():
            yield b"".join(sse_event(name, data) for name, data in events)
    except APIError as exc:
        yield sse_event("error", {"error": error_body(router.prefix + "/chat", exc)["error"]})
    except Exception as exc:  # the stream has started: report it in-band, then still end it
        yield sse_event("error", {"error": {"type": "internal_error", "message": f"Internal server error: {exc}"}})
    finally:
        await rest.aclose()
        if chat.toolbox is not None:
            await chat.toolbox.close()
    yield sse_event("chat.end", {"result": chat.result()})


async def _drain(chat: NativeChat) -> dict[str, Any]:
    try:
        async for _ in chat.events():
            pass
    finally:
        if chat.toolbox is not None:
            await chat.toolbox.close()
    return chat.result()


@router.post("/chat", response_model=None)
async def chat(
    body: NativeChatRequest,
    request: Request,
    manager: Annotated[ModelManager, Depends(get_manager)],
    store: Annotated[ConversationStore, Depends(get_conversations)],
) -> dict[str, Any] | EventStreamResponse:
    config = request.app.state.config
    integrations = parse_integrations(
        body.integrations or [], home=config.home, allow_remote=config.allow_remote_mcp,
        has_tokens=bool(request.app.state.api_tokens),
    )
    if body.tool_choice not in (None, "auto", "none") and not integrations:
        raise APIError(400, "tool_choice requires MCP integrations (the tools come from them).", param="tool_choice")
    text, images = _parse_input(body.input)
    loaded, variant = _check_model(manager, body.model)
    if body.draft_model is not None:  # refused before a stream starts; compatibility is checked at submit
        try:
            manager.store.resolve(body.draft_model)
        except ModelNotFound as exc:
            raise inference.draft_not_found(exc) from None
    if variant is not None and variant.type != "llm":
        raise APIError(400, f"Model \"{body.model}\" is an embedding model; it cannot serve this endpoint.",
                       param="model", code="model_not_supported")
    if images:
        target = loaded.variant if loaded is not None else variant
        has_projector = target is not None and target.mmproj_path is not None
        message = ("Image input is not supported by this server yet." if has_projector
                   else f"Model \"{body.model}\" does not support image input (it has no vision projector).")
        raise APIError(400, message, param="input", code="model_not_vision_capable")
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
    turn.append({"role": "user", "content": text})
    instance_id = loaded.id if loaded is not None else variant.model_key if variant is not None else body.model
    toolbox = await open_toolbox(integrations) if integrations else None
    if toolbox is not None and not toolbox.tools and body.tool_choice not in (None, "auto", "none"):
        await toolbox.close()
        raise APIError(400, "tool_choice requires tools, but the integrations offer none (check allowed_tools).",
                       param="tool_choice")
    native = NativeChat(manager, store, body, history, turn, instance_id, toolbox)
    if body.stream:
        return EventStreamResponse(_stream(native, *await _admitted(native)))
    return await unless_disconnected(request, _drain(native))
