"""`POST /v1/responses` requests: the wire schema, and its translation into the chat layer's terms.

Input items become OpenAI chat messages (what `ChatSpec` takes): messages keep their role
(`developer` is the system role), `function_call` items become an assistant message's `tool_calls`
(consecutive calls, and the assistant text before them, form one message), `function_call_output`
items become `tool` messages, and `reasoning` items passed back are attached to the next assistant
message as `reasoning_content` (templates that keep past reasoning render it; the rest drop it).
Flat Responses function tools become chat-format tools; `mcp` tools are MCP integrations run by the
server (with `--allow-remote-mcp`); `text.format` becomes a `response_format` for the grammar layer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ...chat.images import image_url_part
from ...errors import APIError, bad_request
from ..draft_fields import DraftFields


class ReasoningConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")

    effort: str | None = None
    summary: str | None = None


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")

    format: dict[str, Any] | None = None
    verbosity: str | None = None


class ResponsesRequest(DraftFields):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    input: str | list[dict[str, Any]] | None = None
    instructions: str | None = None
    previous_response_id: str | None = None
    store: bool = True
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    reasoning: ReasoningConfig | None = None
    text: TextConfig | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stream: bool = False
    metadata: dict[str, str] | None = None
    user: str | None = None
    truncation: str | None = None
    # llama.cpp's extras, under the names /v1/chat/completions uses.
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repeat_penalty: float | None = Field(default=None, gt=0.0)
    seed: int | None = None
    ttl: int | None = Field(default=None, ge=1, description="idle seconds for a model this request JIT-loads")


def _invalid(message: str, param: str = "input") -> APIError:
    return bad_request(message, param=param)


_TEXT_PARTS = {"input_text", "output_text", "text", "summary_text", "reasoning_text"}


def _content(content: Any, where: str) -> str | list[dict[str, Any]]:
    """A user message's content: its text, or (with `input_image` parts) the chat layer's text and image parts."""
    if not isinstance(content, list) or not any(
            isinstance(part, Mapping) and part.get("type") == "input_image" for part in content):
        return _text(content, where)
    parts: list[dict[str, Any]] = []
    for index, part in enumerate(content):
        if isinstance(part, Mapping) and part.get("type") == "input_image":
            if not isinstance(part.get("image_url"), str):
                raise bad_request(f"{where}.content[{index}]: input_image needs an image_url (a base64 data URL); "
                                  "file_id is not supported.", param="input", code="unsupported_content")
            parts.append(image_url_part(part["image_url"]))
        else:
            parts.append({"type": "text", "text": _text([part], f"{where}")})
    return parts


def _text(content: Any, where: str) -> str:
    """A message's content as text: a string, or an array of text parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _invalid(f"{where}.content must be a string or an array of content parts.")
    texts: list[str] = []
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind in _TEXT_PARTS and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in ("input_image", "input_file", "input_audio"):
            raise bad_request(f"{where}.content[{index}]: {kind} is not supported by this server (text only).",
                              param="input", code="unsupported_content")
        elif kind == "refusal":
            texts.append(str(part.get("refusal", "")))
        else:
            raise _invalid(f"{where}.content[{index}] must be a text part ('input_text' or 'output_text'), "
                           f"got type {kind!r}.")
    return "".join(texts)


def _string(item: Mapping[str, Any], key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str) or not value:
        raise _invalid(f"{where}.{key} must be a non-empty string.")
    return value


def _output_text(value: Any, where: str) -> str:
    """A function_call_output's `output`: a string, or content parts (their text)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return _text(value, where)
    raise _invalid(f"{where}.output must be a string or an array of content parts.")


def input_messages(value: str | list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The request's `input` as OpenAI chat messages."""
    if value is None:
        return []
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    messages: list[dict[str, Any]] = []
    reasoning: list[str] = []  # reasoning items waiting for the assistant message they belong to

    def assistant() -> dict[str, Any]:
        """The assistant message that function calls (or text) join: the last one unless a turn ended."""
        last = messages[-1] if messages else None
        if last is None or last["role"] != "assistant" or reasoning:
            last = {"role": "assistant", "content": ""}
            messages.append(last)
        if reasoning:
            last["reasoning_content"] = "".join(reasoning)
            reasoning.clear()
        return last

    for index, item in enumerate(value):
        where = f"input[{index}]"
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise _invalid(f"{where}.role must be 'user', 'system', 'developer' or 'assistant', got {role!r}.")
            if role == "assistant":
                text = _text(item.get("content"), where)
                target = assistant()
                if target.get("tool_calls"):  # text after calls starts a new message
                    target = {"role": "assistant", "content": ""}
                    messages.append(target)
                target["content"] += text
            else:
                if reasoning:  # reasoning with no answer after it (cut short) is still the assistant's turn
                    assistant()
                messages.append({"role": "system" if role == "developer" else role,
                                 "content": _content(item.get("content"), where)})
        elif kind == "function_call":
            name = _string(item, "name", where)
            if isinstance(item.get("namespace"), str) and item["namespace"]:
                name = namespaced_name(item["namespace"], name)
            call: dict[str, Any] = {"id": _string(item, "call_id", where), "type": "function",
                    "function": {"name": name, "arguments": item.get("arguments") or "{}"}}
            if not isinstance(call["function"]["arguments"], str):
                raise _invalid(f"{where}.arguments must be a string (JSON text).")
            assistant().setdefault("tool_calls", []).append(call)
        elif kind == "function_call_output":
            if reasoning:
                assistant()
            messages.append({"role": "tool", "tool_call_id": _string(item, "call_id", where),
                             "content": _output_text(item.get("output"), where)})
        elif kind == "reasoning":
            parts = item.get("content") or item.get("summary") or []
            reasoning.append(_text(parts, where) if isinstance(parts, list) else "")
        elif kind in ("mcp_list_tools", "mcp_call", "mcp_approval_request", "mcp_approval_response",
                      "item_reference"):
            continue  # server-side records (what they produced is in the stored conversation) and approvals
        else:
            raise _invalid(f"{where}: unsupported input item type {kind!r} (expected 'message', 'function_call', "
                           "'function_call_output' or 'reasoning').")
    if reasoning:
        assistant()
    return messages


@dataclass(frozen=True)
class Approval:
    """An `mcp_approval_response` input item: the client's answer to an `mcp_approval_request`."""

    request_id: str
    approve: bool


def approvals(value: str | list[dict[str, Any]] | None) -> list[Approval]:
    """The request's `mcp_approval_response` items."""
    found: list[Approval] = []
    for index, item in enumerate(value if isinstance(value, list) else []):
        if item.get("type") != "mcp_approval_response":
            continue
        where = f"input[{index}]"
        if not isinstance(item.get("approve"), bool):
            raise _invalid(f"{where}.approve must be true or false.")
        found.append(Approval(_string(item, "approval_request_id", where), item["approve"]))
    return found


def needs_approval(setting: Any, tool: str) -> bool:
    """Whether an `mcp` tool entry's `require_approval` asks for approval before `tool` runs. Left out it
    is "never", as on LM Studio (OpenAI's own default is "always"). A filter object: the tools named in
    `never.tool_names` run without approval, those in `always.tool_names` need it, and the rest need it
    unless `always` names tools (then only those do)."""
    if setting is None or setting == "never":
        return False
    if setting == "always" or not isinstance(setting, Mapping):
        return True

    def named(key: str) -> list[str] | None:
        entry = setting.get(key)
        names = entry.get("tool_names") if isinstance(entry, Mapping) else None
        return names if isinstance(names, list) else None

    never, always = named("never"), named("always")
    if never is not None and tool in never:
        return False
    return always is None or tool in always


def check_require_approval(setting: Any, where: str) -> None:
    if setting is None or setting in ("always", "never"):
        return
    if isinstance(setting, Mapping) and set(setting) <= {"always", "never"} and all(
            isinstance(v, Mapping) and isinstance(v.get("tool_names", []), list) for v in setting.values()):
        return
    raise bad_request(f"{where}.require_approval must be \"always\", \"never\" or "
                      "{\"always\": {\"tool_names\": [...]}, \"never\": {\"tool_names\": [...]}}.", param="tools")


def namespaced_name(namespace: str, name: str) -> str:
    """The flat name a namespace's tool gets (Codex's spelling: `namespace__name`)."""
    return f"{namespace.rstrip('_')}__{name.lstrip('_')}"


def _function(tool: Mapping[str, Any], where: str, name: str | None = None) -> dict[str, Any]:
    """A flat Responses function tool (or the chat-completions spelling) as a chat-format tool."""
    if isinstance(tool.get("function"), Mapping):  # the chat-completions spelling, accepted as well
        return dict(tool)
    if not isinstance(tool.get("name"), str) or not tool["name"]:
        raise bad_request(f"{where}.name must be a non-empty string.", param=f"{where}.name")
    function = {"name": name or tool["name"]}
    for key in ("description", "parameters", "strict"):
        if tool.get(key) is not None:
            function[key] = tool[key]
    return {"type": "function", "function": function}


@dataclass
class RequestTools:
    functions: list[dict[str, Any]] = field(default_factory=list)  # chat-format tools for the model
    mcp: list[dict[str, Any]] = field(default_factory=list)  # `mcp` entries, run by the server
    namespaced: dict[str, tuple[str, str]] = field(default_factory=dict)  # flat name → (namespace, name)
    dropped: list[str] = field(default_factory=list)  # hosted tools this server cannot run


def function_tools(tools: list[dict[str, Any]] | None) -> RequestTools:
    """The request's `tools`: function tools (those inside a `namespace` flattened), MCP tools, and the
    hosted tools (web_search, file_search, ...) left out, as the server cannot run them."""
    found = RequestTools()
    for index, tool in enumerate(tools or []):
        kind = tool.get("type")
        where = f"tools[{index}]"
        if kind == "function":
            found.functions.append(_function(tool, where))
        elif kind == "namespace":
            namespace = tool.get("name")
            if not isinstance(namespace, str) or not namespace or not isinstance(tool.get("tools"), list):
                raise bad_request(f"{where}: a namespace needs a non-empty 'name' and a 'tools' array.",
                                  param=f"{where}.name")
            for inner_index, inner in enumerate(tool["tools"]):
                inner_where = f"{where}.tools[{inner_index}]"
                if not isinstance(inner, Mapping) or inner.get("type", "function") != "function":
                    found.dropped.append(f"{namespace}.{inner.get('type') if isinstance(inner, Mapping) else '?'}")
                    continue
                function = _function(inner, inner_where)
                flat = namespaced_name(namespace, function["function"]["name"])
                found.namespaced[flat] = (namespace, function["function"]["name"])
                function["function"] = {**function["function"], "name": flat}
                found.functions.append(function)
        elif kind == "mcp":
            found.mcp.append(tool)
        else:
            found.dropped.append(str(kind))
    return found


def chat_tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    """Responses' tool_choice in chat-completions terms (what the chat layer takes)."""
    if isinstance(choice, Mapping):
        kind = choice.get("type")
        name = choice.get("name")
        if kind in ("function", "mcp") and isinstance(name, str) and name:
            return {"type": "function", "function": {"name": name}}
        if kind == "function" and isinstance(choice.get("function"), Mapping):
            return dict(choice)
        raise bad_request("tool_choice must be \"auto\", \"none\", \"required\" or {\"type\": \"function\", "
                          "\"name\": ...}", param="tool_choice")
    return choice


def response_format(text: TextConfig | None) -> dict[str, Any] | None:
    """`text.format` as a chat `response_format`; json_object is any JSON object, by grammar."""
    spec = text.format if text is not None else None
    if spec is None:
        return None
    kind = spec.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_schema", "json_schema": {"name": "json_object", "schema": {"type": "object"}}}
    if kind == "json_schema":
        schema = spec.get("schema")
        if not isinstance(schema, Mapping):
            raise bad_request("'text.format.schema' must be a JSON schema object.", param="text.format.schema")
        return {"type": "json_schema", "json_schema": {"name": spec.get("name") or "response", "schema": schema,
                                                       "strict": bool(spec.get("strict"))}}
    raise bad_request("'text.format.type' must be 'text', 'json_schema' or 'json_object'.", param="text.format.type")


def echo_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The request's tools as the response repeats them (flat functions; MCP headers left out: secrets)."""
    echoed: list[dict[str, Any]] = []
    for tool in tools or []:
        if tool.get("type") == "function" and isinstance(tool.get("function"), Mapping):
            function = tool["function"]
            tool = {"type": "function", "name": function.get("name"), "description": function.get("description"),
                    "parameters": function.get("parameters"), "strict": function.get("strict")}
        elif tool.get("type") == "function":
            tool = {"description": None, "parameters": None, "strict": None, **tool}
        else:
            tool = {k: v for k, v in tool.items() if k not in ("headers", "authorization")}
        echoed.append(tool)
    return echoed
