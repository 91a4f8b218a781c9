"""Tools and tool history in the prompt when the model's chat template leaves them out.

Many GGUF templates (SmolLM2's among them) and the ChatML fallback ignore `tools`, assistant
`tool_calls` and `tool` messages. Like LM Studio and llama-server, the chat layer then writes them
itself: a system-prompt section that lists the tools and shows the call format the output parser
reads (`tool_parsers.py`), past calls as that same text in the assistant turn, and tool results as a
user turn. Only what the template does not render is written, so templates that know tools keep
their own spelling.

Conversations with a system message after the first turn (Claude Code sends one) render as they
stand where the template allows it; a template that refuses them gets them folded into the next
user turn (or the previous one), which keeps the earlier prompt, and its KV cache, unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from ..runtime.chat_template import ChatTemplate
from .tools import ToolFormat, arguments_as_mapping

# The call each format's parser reads, as the model should write it.
_CALL_SHAPES = {
    ToolFormat.HERMES: ("For each function call, return a JSON object with the function name and arguments within "
                        "<tool_call></tool_call> XML tags:\n<tool_call>\n"
                        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'),
    ToolFormat.LLAMA3: ("To call a function, respond with only a JSON object of the form "
                        '{"name": <function-name>, "parameters": <args-json-object>}.'),
    ToolFormat.MISTRAL: ("To call functions, respond with [TOOL_CALLS] followed by a JSON array of calls: "
                         '[TOOL_CALLS][{"name": <function-name>, "arguments": <args-json-object>}]'),
    ToolFormat.GPT_OSS: ("To call a function, write <|channel|>commentary to=functions.<function-name> "
                         "<|constrain|>json<|message|> followed by the arguments as a JSON object."),
}


def tools_section(tools: Sequence[Mapping[str, Any]], fmt: ToolFormat) -> str:
    """The system-prompt text that tells the model which tools exist and how to call them."""
    listed = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            f"You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{listed}\n"
            f"</tools>\n\n{_CALL_SHAPES[fmt]}")


def with_tools_section(messages: list[dict[str, Any]], section: str) -> list[dict[str, Any]]:
    """The section appended to the leading system message, or as a new one in front."""
    if messages and messages[0].get("role") == "system":
        first = messages[0]
        content = first.get("content") or ""
        return [{**first, "content": f"{content}\n\n{section}" if content else section}, *messages[1:]]
    return [{"role": "system", "content": section}, *messages]


def _call_text(call: Mapping[str, Any], fmt: ToolFormat) -> str:
    function = call.get("function") or {}
    arguments = arguments_as_mapping(function.get("arguments"))
    name = function.get("name")
    match fmt:
        case ToolFormat.LLAMA3:
            return json.dumps({"name": name, "parameters": arguments}, ensure_ascii=False)
        case ToolFormat.MISTRAL:
            return "[TOOL_CALLS]" + json.dumps([{"name": name, "arguments": arguments}], ensure_ascii=False)
        case ToolFormat.GPT_OSS:
            return (f"<|channel|>commentary to=functions.{name} <|constrain|>json<|message|>"
                    + json.dumps(arguments, ensure_ascii=False))
        case _:
            return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False) + \
                "\n</tool_call>"


def inline_tool_history(messages: list[dict[str, Any]], fmt: ToolFormat, *, calls: bool,
                        results: bool) -> list[dict[str, Any]]:
    """Past calls (`calls`) written into their assistant turns and tool results (`results`) as user turns."""
    out: list[dict[str, Any]] = []
    for message in messages:
        role = message.get("role")
        if calls and role == "assistant" and message.get("tool_calls"):
            texts = [message.get("content") or "", *(_call_text(c, fmt) for c in message["tool_calls"])]
            message = {k: v for k, v in message.items() if k != "tool_calls"}
            message["content"] = "\n".join(t for t in texts if t)
        elif results and role == "tool":
            text = f"<tool_response>\n{message.get('content') or ''}\n</tool_response>"
            if out and out[-1].get("role") == "user" and out[-1].get("lmkube_tool_results"):
                out[-1] = {**out[-1], "content": f"{out[-1]['content']}\n{text}"}
                continue
            message = {"role": "user", "content": text, "lmkube_tool_results": True}
        out.append(message)
    return [{k: v for k, v in m.items() if k != "lmkube_tool_results"} for m in out]


def has_tool_history(messages: Sequence[Mapping[str, Any]]) -> bool:
    return any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)


def has_late_system(messages: Sequence[Mapping[str, Any]]) -> bool:
    return any(m.get("role") == "system" for m in messages[1:])


def fold_late_system(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """System messages after the first become part of the next user turn (else the previous one, else a user turn)."""
    out: list[dict[str, Any]] = [dict(m) for m in messages[:1]]
    carried: list[str] = []
    for message in messages[1:]:
        if message.get("role") == "system":
            carried.append(message.get("content") or "")
            continue
        if carried and message.get("role") == "user":
            message = {**message, "content": "\n\n".join([*carried, message.get("content") or ""])}
            carried = []
        out.append(dict(message))
    if carried:
        last = out[-1] if out else None
        if last is not None and last.get("role") == "user":
            last["content"] = "\n\n".join([last.get("content") or "", *carried])
        else:
            out.append({"role": "user", "content": "\n\n".join(carried)})
    return out


def template_polyfills(template: ChatTemplate, messages: list[dict[str, Any]],
                       tools: Sequence[Mapping[str, Any]] | None, fmt: ToolFormat) -> list[dict[str, Any]]:
    """`messages` with what `template` would drop (tools, past calls, tool results) written in as text."""
    if has_tool_history(messages):
        calls, results = not template.renders_tool_calls, not template.renders_tool_results
        if calls or results:
            messages = inline_tool_history(messages, fmt, calls=calls, results=results)
    if tools and not template.renders_tools:
        messages = with_tools_section(messages, tools_section(tools, fmt))
    return messages
