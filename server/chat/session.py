"""The chat layer every chat-shaped API calls: messages in, prompt tokens and a grammar out, and
an output pipeline that splits generated text into content, reasoning and tool calls.

    prepared = prepare_chat(instance, ChatSpec(messages=..., tools=..., tool_choice=...))
    params.grammar = prepared.grammar
    output = prepared.new_output()
    for each generated text piece: delta = output.feed(text)   # ChatDelta
    delta = output.finish(); result = output.result

OpenAI's `/v1/chat/completions` and `/v1/responses`, Anthropic's `/v1/messages` and LM Studio's
`/api/v1/chat` differ only in how they spell requests and responses; they all go through here, by way of
the shared chat run (api/chat_run.py), which does the steps above for them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ..engine.vision import PromptImages
from ..errors import APIError
from ..runtime.instance import ModelInstance
from .deltas import ChatDelta, ChatResult
from .images import decode_images
from .prompt import normalize_messages, prompt_tokens, prompt_with_images, refuse_oversized, render_chat
from .reasoning import (
    THINK_TAG_PAIRS,
    ReasoningSplitter,
    ReasoningStyle,
    detect_reasoning_style,
    prompt_opens_reasoning,
    template_kwargs_for_effort,
)
from .structured import check_grammar, response_format_grammar
from .tool_parsers import ToolCallParser
from .tool_prompt import template_polyfills
from .tools import ToolFormat, ToolRegistry, detect_tool_format, rewrite_history_tool_names, tool_call_grammar

ToolChoice = str | Mapping[str, Any] | None


@dataclass
class ChatSpec:
    """A chat request in family-neutral terms: OpenAI-format messages and function tools."""

    messages: Sequence[Mapping[str, Any]]
    tools: Sequence[Mapping[str, Any]] | None = None
    tool_choice: ToolChoice = None  # "auto" | "none" | "required" | {"type": "function", "function": {"name"}}
    parallel_tool_calls: bool = True
    response_format: Mapping[str, Any] | None = None
    reasoning_effort: str | None = None
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    # Prefill: a final assistant message (without tool calls) is continued, not answered. The prompt is the
    # conversation before it with the generation prompt, then its text; the output is only the continuation.
    # Anthropic's /v1/messages and llama-server's /v1/chat/completions do this; /v1/responses does not.
    continue_final: bool = False


# lmkube extension: agent clients send no tool_choice (or "auto") and have no option for one, but can add
# headers; this one forces a call (or picks the mode) for a small model that would not call by itself.
TOOL_CHOICE_HEADER = "lmkube-tool-choice"


def with_header_tool_choice(spec: ChatSpec, header: str | None) -> ChatSpec:
    """`spec` with the `lmkube-tool-choice` header's choice ("required", "none", "auto" or a tool name) where
    the request leaves it to the model. A forced choice forces the turn that answers the user; the turn that
    answers tool results gets `none`, so the model replies in text and the agent loop ends (a small model
    left to itself there calls tools again, often malformed, and the client loops until its own limit)."""
    if not header or not spec.tools or spec.tool_choice not in (None, "auto"):
        return spec
    forced = header not in ("auto", "none")
    for message in reversed(spec.messages):
        if message.get("role") == "tool":
            return replace(spec, tool_choice="none") if forced else spec
        if message.get("role") == "assistant":
            break
    choice = header if header in ("auto", "none", "required") else {"type": "function", "function": {"name": header}}
    return replace(spec, tool_choice=choice)


@dataclass
class PreparedChat:
    prompt: list[int]
    prompt_text: str
    grammar: str | None
    render_special: bool
    reasoning_style: ReasoningStyle | None
    starts_in_reasoning: bool
    tool_format: ToolFormat | None
    registry: ToolRegistry | None
    images: PromptImages | None = None  # the image chunks behind the prompt's placeholder runs

    def new_output(self) -> ChatOutput:
        return ChatOutput(self)


class ChatOutput:
    """Generated text → content, reasoning and tool calls, streaming-safe."""

    def __init__(self, prepared: PreparedChat) -> None:
        self._reasoning = ReasoningSplitter(prepared.reasoning_style, starts_in_reasoning=prepared.starts_in_reasoning)
        self._tools = (
            ToolCallParser(prepared.tool_format, prepared.registry)
            if prepared.registry is not None and prepared.tool_format is not None
            else None
        )
        self._result = ChatResult()
        # Pieces, joined when read: `result.content += piece` copied the whole text on every token.
        self._content: list[str] = []
        self._reasoning_text: list[str] = []

    @property
    def result(self) -> ChatResult:
        self._result.content = "".join(self._content)
        self._result.reasoning = "".join(self._reasoning_text)
        return self._result

    def feed(self, text: str) -> ChatDelta:
        return self._route(self._reasoning.feed(text), final=False)

    def finish(self) -> ChatDelta:
        return self._route(self._reasoning.finish(), final=True)

    def _route(self, split: ChatDelta, *, final: bool) -> ChatDelta:
        delta = ChatDelta(reasoning=split.reasoning)
        if self._tools is None:
            delta.content = split.content
        else:
            parsed = self._tools.feed(split.content) if split.content else ChatDelta()
            if final:
                tail = self._tools.finish()
                parsed.content += tail.content
                parsed.tool_calls.extend(tail.tool_calls)
            delta.content = parsed.content
            delta.tool_calls = parsed.tool_calls
        if delta.content:
            self._content.append(delta.content)
        if delta.reasoning:
            self._reasoning_text.append(delta.reasoning)
        if final and self._tools is not None:
            self._result.tool_calls = list(self._tools.calls)
        return delta


def _named_tool(choice: ToolChoice) -> str | None:
    if isinstance(choice, Mapping):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, Mapping) else None
        if choice.get("type") != "function" or not isinstance(name, str) or not name:
            raise APIError(400, "tool_choice must be \"auto\", \"none\", \"required\" or "
                           "{\"type\": \"function\", \"function\": {\"name\": ...}}", param="tool_choice")
        return name
    if choice not in (None, "auto", "none", "required"):
        raise APIError(400, f"Invalid tool_choice {choice!r}: expected \"auto\", \"none\", \"required\" or a "
                       "named function", param="tool_choice")
    return None


def prepare_chat(instance: ModelInstance, spec: ChatSpec, *, param: str = "messages",
                 fetch_image_urls: bool = False) -> PreparedChat:
    """Blocks for as long as templating, tokenizing and fetching the conversation's images take (a long one:
    seconds); routes run it off the event loop (`asyncio.to_thread`). `param` names the request field of the
    prompt in errors; `fetch_image_urls` lets http(s) image URLs be fetched (else they are a 400)."""
    template_source = instance.template.source
    named = _named_tool(spec.tool_choice)
    registry: ToolRegistry | None = None
    if spec.tools and spec.tool_choice != "none":
        try:
            registry = ToolRegistry([dict(t) for t in spec.tools])
        except ValueError as exc:
            raise APIError(400, str(exc), param="tools") from None
        if named is not None and registry.resolve(named) is None:
            raise APIError(400, f"tool_choice names {named!r}, which is not among the tools", param="tool_choice")
    elif named is not None or spec.tool_choice == "required":
        raise APIError(400, "tool_choice requires tools", param="tool_choice")
    template_format = detect_tool_format(template_source)
    tool_format = template_format if registry is not None else None

    image_urls: list[Any] = []
    messages = normalize_messages(spec.messages, image_urls if instance.projector is not None else None)
    images = decode_images(image_urls, param=param, fetch=fetch_image_urls) if image_urls else None
    refuse_oversized(instance, (m["content"] for m in messages if isinstance(m["content"], str)), param=param)
    prefill: str | None = None
    if spec.continue_final and messages and messages[-1]["role"] == "assistant" and not messages[-1].get("tool_calls"):
        prefill = str(messages[-1]["content"])
        messages = messages[:-1]
    if registry is not None:
        messages = rewrite_history_tool_names(messages, registry, fmt=tool_format)
    template_tools = registry.for_template() if registry else None
    messages = template_polyfills(instance.template, messages, template_tools, template_format)
    kwargs = {**template_kwargs_for_effort(spec.reasoning_effort), **spec.template_kwargs}
    text = render_chat(instance, messages, tools=template_tools, **kwargs)
    style = detect_reasoning_style(template_source)
    opens_reasoning = prompt_opens_reasoning(text, style)
    if prefill is not None:
        # Reasoning the template opened stays open unless the prefill closes it.
        opens_reasoning = opens_reasoning and not any(close in prefill for _, close in THINK_TAG_PAIRS)
        text += prefill

    grammar: str | None = None
    if registry is not None and tool_format is not None and (named is not None or spec.tool_choice == "required"):
        grammar = tool_call_grammar(tool_format, registry, only=named, parallel=spec.parallel_tool_calls)
        check_grammar(instance.model, grammar, param="tools")  # a 400 now rather than a failed generation
    elif spec.response_format is not None:
        grammar = response_format_grammar(dict(spec.response_format), model=instance.model)

    chunks: PromptImages | None = None
    if images:
        prompt, chunks = prompt_with_images(instance, text, images, param=param)
    else:
        prompt = prompt_tokens(instance, text, param=param)
    return PreparedChat(
        prompt=prompt,
        images=chunks,
        prompt_text=text,
        grammar=grammar,
        # Tool-call and channel markers are control tokens in real GGUFs; the parsers need their text.
        render_special=registry is not None or style is ReasoningStyle.HARMONY,
        reasoning_style=style,
        # A forced tool call starts at once, even where the template opened a think block.
        starts_in_reasoning=grammar is None and opens_reasoning,
        tool_format=tool_format,
        registry=registry,
    )
