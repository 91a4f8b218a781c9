"""Anthropic requests in the chat layer's family-neutral terms (OpenAI-format messages and function tools).

Everything past this point (templates, tool formats and grammars, reasoning) is `server/chat`'s; this
module only respells. Tool-call ids pass through unchanged, so a `tool_use` id the server generated
comes back on the `tool_result` that answers it.
"""

from __future__ import annotations

import json
from typing import Any

from ...chat.session import ChatSpec, ToolChoice
from ...errors import APIError
from .schemas import (
    ContentBlock,
    DocumentBlock,
    ImageBlock,
    MessagesInput,
    RedactedThinkingBlock,
    TextBlock,
    ThinkingBlock,
    ToolReferenceBlock,
    ToolResultBlock,
    ToolUseBlock,
)
from .schemas import (
    ToolChoice as AnthropicToolChoice,
)

# Anthropic's thinking budget → the chat layer's effort (gpt-oss templates read it; on/off templates only
# see that thinking is on). Budgets start at 1,024 tokens; these steps split the common range in three.
_EFFORT_STEPS = ((4096, "low"), (16384, "medium"))


def chat_spec(body: MessagesInput) -> ChatSpec:
    choice, parallel = _tool_choice(body.tool_choice)
    return ChatSpec(
        messages=_messages(body),
        tools=_tools(body),
        tool_choice=choice,
        parallel_tool_calls=parallel,
        reasoning_effort=_reasoning_effort(body),
        response_format=_response_format(body),
        continue_final=True,  # Anthropic's prefill: a final assistant message is continued
    )


def _invalid(message: str, param: str) -> APIError:
    return APIError(400, message, param=param)


def _image_part(block: ImageBlock, where: str) -> dict[str, Any]:
    """OpenAI's image part, so the chat layer decides what images mean for the model (a clear 400 without vision)."""
    source = block.source
    kind = source.get("type")
    if kind == "base64" and isinstance(source.get("data"), str):
        url = f"data:{source.get('media_type', 'image/png')};base64,{source['data']}"
    elif kind == "url" and isinstance(source.get("url"), str):
        url = source["url"]
    else:
        raise _invalid(f"{where}.source must be {{\"type\": \"base64\", \"media_type\", \"data\"}} or "
                       f"{{\"type\": \"url\", \"url\"}}; got type {kind!r}.", where)
    return {"type": "image_url", "image_url": {"url": url}}


def _document_text(block: DocumentBlock, where: str) -> dict[str, Any]:
    source = block.source
    if source.get("type") == "text" and isinstance(source.get("data"), str):
        text = source["data"] if not block.title else f"{block.title}\n\n{source['data']}"
        return {"type": "text", "text": text}
    raise _invalid(f"{where}: only plain-text documents (source type 'text') are supported, not "
                   f"{source.get('type')!r}.", where)


def _parts(blocks: list[Any], where: str) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = []
    for i, block in enumerate(blocks):
        if isinstance(block, TextBlock):
            parts.append({"type": "text", "text": block.text})
        elif isinstance(block, ImageBlock):
            parts.append(_image_part(block, f"{where}.{i}"))
        elif isinstance(block, DocumentBlock):
            parts.append(_document_text(block, f"{where}.{i}"))
    return parts


def _tool_result(block: ToolResultBlock, where: str) -> dict[str, Any]:
    content = block.content
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    else:
        parts = _parts(content, f"{where}.content")
        parts += [{"type": "text", "text": f"Tool {b.tool_name} loaded."}
                  for b in content if isinstance(b, ToolReferenceBlock)]
        if any(p["type"] != "text" for p in parts):
            raise _invalid(f"{where}: images in tool results are not supported.", where)
        text = "".join(p["text"] for p in parts)
    if block.is_error:  # templates have no error flag: the model has to read it
        text = f"Error: {text}" if text else "Error"
    return {"role": "tool", "tool_call_id": block.tool_use_id, "content": text}


def _user_turn(blocks: list[ContentBlock], where: str) -> list[dict[str, Any]]:
    """Tool results become tool messages, first (they answer the previous assistant turn); the rest one user message."""
    results: list[dict[str, Any]] = []
    others: list[Any] = []
    for i, block in enumerate(blocks):
        if isinstance(block, ToolResultBlock):
            results.append(_tool_result(block, f"{where}.{i}"))
        elif isinstance(block, TextBlock | ImageBlock | DocumentBlock):
            others.append(block)
        elif isinstance(block, ThinkingBlock | RedactedThinkingBlock | ToolUseBlock):
            raise _invalid(f"{where}.{i}: a user message cannot contain a '{block.type}' block.", f"{where}.{i}")
    messages = results
    if others or not results:
        messages.append({"role": "user", "content": _parts(others, where)})
    return messages


def _assistant_turn(blocks: list[ContentBlock], where: str) -> dict[str, Any]:
    texts: list[str] = []
    reasoning: list[str] = []
    calls: list[dict[str, Any]] = []
    for i, block in enumerate(blocks):
        if isinstance(block, TextBlock):
            texts.append(block.text)
        elif isinstance(block, ThinkingBlock):
            reasoning.append(block.thinking)
        elif isinstance(block, ToolUseBlock):
            calls.append({"id": block.id, "type": "function",
                          "function": {"name": block.name, "arguments": json.dumps(block.input, ensure_ascii=False)}})
        elif isinstance(block, RedactedThinkingBlock):
            continue  # opaque to anyone but its author
        else:
            raise _invalid(f"{where}.{i}: an assistant message cannot contain a '{block.type}' block.", f"{where}.{i}")
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
    if reasoning:
        message["reasoning_content"] = "\n".join(reasoning)
    if calls:
        message["tool_calls"] = calls
    return message


def _system_text(blocks: list[Any], where: str) -> str:
    for i, block in enumerate(blocks):
        if not isinstance(block, TextBlock):
            raise _invalid(f"{where}.{i}: a system message can only contain text blocks, not '{block.type}'.",
                           f"{where}.{i}")
    return "\n\n".join(block.text for block in blocks)


def _messages(body: MessagesInput) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    system = body.system if isinstance(body.system, str) else "\n\n".join(b.text for b in body.system or [])
    if system:
        messages.append({"role": "system", "content": system})
    for index, message in enumerate(body.messages):
        where = f"messages.{index}.content"
        content = message.content
        if isinstance(content, str):
            messages.append({"role": message.role, "content": content})
        elif message.role == "system":  # a system turn where it stands (the chat layer folds it if it must)
            messages.append({"role": "system", "content": _system_text(content, where)})
        elif message.role == "user":
            messages.extend(_user_turn(content, where))
        else:
            messages.append(_assistant_turn(content, where))
    last = messages[-1] if messages else None
    if last is not None and last["role"] == "assistant" and last["content"] != last["content"].rstrip():
        # Anthropic's rule for a prefill (the model would continue after the whitespace; it tokenizes badly).
        raise _invalid("messages: final assistant content cannot end with trailing whitespace",
                       f"messages.{len(body.messages) - 1}.content")
    return messages


def _referenced_tools(body: MessagesInput) -> set[str]:
    """Deferred tools that tool search has loaded: those a tool_result's `tool_reference` names."""
    names: set[str] = set()
    for message in body.messages:
        for block in message.content if isinstance(message.content, list) else ():
            if isinstance(block, ToolResultBlock) and isinstance(block.content, list):
                names.update(b.tool_name for b in block.content if isinstance(b, ToolReferenceBlock))
    return names


def _tools(body: MessagesInput) -> list[dict[str, Any]] | None:
    if not body.tools:
        return None
    loaded = _referenced_tools(body) if any(tool.defer_loading for tool in body.tools) else set()
    tools = []
    for i, tool in enumerate(body.tools):
        if tool.defer_loading and tool.name not in loaded:
            continue  # as on Anthropic's API: not in the prompt until tool search references it
        if tool.type not in (None, "custom"):
            raise _invalid(f"tools.{i}: server tool {tool.type!r} ({tool.name!r}) is not supported by this server; "
                           "only client tools (name, description, input_schema) are.", f"tools.{i}.type")
        if tool.input_schema is None:
            raise _invalid(f"Missing required parameter: 'tools.{i}.input_schema'.", f"tools.{i}.input_schema")
        function: dict[str, Any] = {"name": tool.name, "parameters": tool.input_schema}
        if tool.description is not None:
            function["description"] = tool.description
        tools.append({"type": "function", "function": function})
    return tools


def _tool_choice(choice: AnthropicToolChoice | None) -> tuple[ToolChoice, bool]:
    """The chat layer's tool_choice, and whether parallel calls are allowed."""
    if choice is None:
        return None, True
    parallel = not choice.disable_parallel_tool_use
    match choice.type:
        case "auto":
            return "auto", parallel
        case "any":
            return "required", parallel
        case "none":
            return "none", parallel
        case _:
            if not choice.name:
                raise _invalid("tool_choice of type 'tool' needs a 'name'.", "tool_choice.name")
            return {"type": "function", "function": {"name": choice.name}}, parallel


def _reasoning_effort(body: MessagesInput) -> str | None:
    thinking = body.thinking
    effort = body.output_config.effort if body.output_config is not None else None
    if thinking is not None and thinking.type == "disabled":
        return "off"
    if effort is not None:
        return "high" if effort in ("xhigh", "max") else effort
    if thinking is None:
        return None  # the template's default
    budget = thinking.budget_tokens
    if thinking.type != "enabled" or budget is None:  # adaptive, between_tools
        return "on"
    return next((level for limit, level in _EFFORT_STEPS if budget < limit), "high")


def _response_format(body: MessagesInput) -> dict[str, Any] | None:
    """Structured outputs (`output_config.format`) become the chat layer's grammar-enforced json_schema format."""
    output_format = body.output_config.format if body.output_config is not None else None
    if output_format is None:
        return None
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": output_format.schema_}}
