"""The request's function tools as the model sees them, and grammars that force valid calls.

Models are shown normalized tool names (only `[A-Za-z0-9_]`): several chat templates and call
formats cannot carry dots or dashes (gpt-oss writes `to=functions.NAME`, Mistral `NAME[ARGS]`), so
every name goes through the registry on the way in and is mapped back on the way out.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from jsonschema import Draft7Validator

from lmkube.random_ids import ALPHANUMERIC, random_string

from .structured import JsonSchemaConverter


class ToolFormat(StrEnum):
    HERMES = "hermes"  # <tool_call>{"name": ..., "arguments": {...}}</tool_call> (Qwen, Hermes)
    LLAMA3 = "llama3"  # a bare {"name": ..., "parameters": {...}} object, or after <|python_tag|>
    MISTRAL = "mistral"  # [TOOL_CALLS][{...}] (Nemo) or [TOOL_CALLS]name[ARGS]{...} (Small 3.2)
    GPT_OSS = "gpt-oss"  # harmony: <|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{...}


def detect_tool_format(template_source: str | None) -> ToolFormat:
    """Picks the call format from the markers the chat template writes for tool calls in history."""
    src = template_source or ""
    if "<|channel|>" in src:
        return ToolFormat.GPT_OSS
    if "[TOOL_CALLS]" in src:
        return ToolFormat.MISTRAL
    if "<tool_call>" in src:  # checked before Llama 3: Hermes-3 is a Llama 3.1 fine-tune speaking Hermes
        return ToolFormat.HERMES
    if "<|start_header_id|>" in src or "<|python_tag|>" in src:
        return ToolFormat.LLAMA3
    return ToolFormat.HERMES  # ChatML-style templates without tool markup: Hermes is the common choice


# -- the registry ---------------------------------------------------------------------------------

_NOT_NAME_CHARS = re.compile(r"[^A-Za-z0-9_]+")


def normalize_tool_name(name: str) -> str:
    """`get-weather.now` -> `get_weather_now`: runs of other characters become one underscore."""
    return _NOT_NAME_CHARS.sub("_", name)


def _empty_parameters() -> dict[str, Any]:
    return {"type": "object", "properties": {}}


@dataclass(frozen=True, slots=True)
class _Tool:
    caller: str  # the name the request used
    name: str  # the name the model sees
    description: str
    parameters: dict[str, Any]


# Checks a tool's `parameters` against the JSON Schema meta-schema (Draft 7: later drafts' keywords pass as
# unknown ones; about half a millisecond a tool). Unlike `response_format`, a valid schema the grammar
# converter cannot express is still accepted (a forced call then gets any JSON object).
_META_SCHEMA = Draft7Validator(Draft7Validator.META_SCHEMA)
MAX_TOOLS = 1024  # per request: each costs template text, a meta-schema check and grammar rules


def _parse_tool(tool: Any, i: int) -> _Tool:
    if not isinstance(tool, dict):
        raise ValueError(f"tools[{i}] must be an object")
    kind = tool.get("type", "function")
    # Anthropic's client tools say "custom" (or nothing) and carry `input_schema`.
    if kind != "function" and not (kind == "custom" and "input_schema" in tool):
        raise ValueError(f"tools[{i}]: unsupported tool type {kind!r}; only function tools are supported")
    fn = tool.get("function", tool)  # the Responses API and Anthropic put the fields on the tool itself
    if not isinstance(fn, dict):
        raise ValueError(f"tools[{i}].function must be an object")
    name = fn.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"tools[{i}]: the function needs a non-empty string 'name'")
    parameters = fn.get("parameters", fn.get("input_schema"))
    if parameters is None:
        parameters = _empty_parameters()
    elif not isinstance(parameters, dict):
        raise ValueError(f"tools[{i}] ({name!r}): 'parameters' must be a JSON Schema object")
    elif (problem := next(_META_SCHEMA.iter_errors(parameters), None)) is not None:
        where = "".join(f"[{p!r}]" for p in problem.absolute_path)
        raise ValueError(f"tools[{i}] ({name!r}): 'parameters' is not a valid JSON Schema: "
                         f"{problem.message}{f' at parameters{where}' if where else ''}")
    description = fn.get("description")
    # Several templates concatenate the description unconditionally, so a missing one becomes "".
    return _Tool(name, normalize_tool_name(name), "" if description is None else str(description), parameters)


class ToolRegistry:
    """The request's function tools; model-facing names are normalized (snake_case, [a-zA-Z0-9_]) and mapped back."""

    def __init__(self, tools: list[dict]) -> None:
        if not isinstance(tools, list):
            raise ValueError("'tools' must be a list")
        if len(tools) > MAX_TOOLS:
            raise ValueError(f"a request may offer at most {MAX_TOOLS} tools, not {len(tools)}")
        self._tools: dict[str, _Tool] = {}
        self._by_caller: dict[str, str] = {}
        for i, raw in enumerate(tools):
            tool = _parse_tool(raw, i)
            other = self._tools.get(tool.name)
            if other is not None:
                same = other.caller == tool.caller
                why = "appears twice" if same else f"and {other.caller!r} both become {tool.name!r}"
                raise ValueError(f"tools[{i}]: the tool name {tool.caller!r} {why}; tool names must be unique")
            self._tools[tool.name] = tool
            self._by_caller[tool.caller] = tool.name

    def __len__(self) -> int:
        return len(self._tools)

    def __iter__(self) -> Iterator[str]:
        return iter(self._tools)

    @property
    def names(self) -> list[str]:
        """Model-facing names, in request order."""
        return list(self._tools)

    def for_template(self) -> list[dict]:
        return [
            {"type": "function",
             "function": {"name": t.name, "description": t.description, "parameters": t.parameters}}
            for t in self._tools.values()
        ]

    def caller_name(self, model_name: str) -> str | None:
        """The request's name for a name the model wrote; None for an unknown tool."""
        tool = self._tools.get(model_name)
        if tool is not None:
            return tool.caller
        return model_name if model_name in self._by_caller else None  # the model used the original name

    def model_name(self, caller_name: str) -> str:
        # History may name tools this request no longer offers: normalize those the same way.
        return self._by_caller.get(caller_name) or normalize_tool_name(caller_name)

    def resolve(self, name: str) -> str | None:
        """The model-facing name for either spelling of a known tool's name."""
        return name if name in self._tools else self._by_caller.get(name)

    def schema(self, model_name: str) -> dict:
        return self._tools[model_name].parameters


# -- history --------------------------------------------------------------------------------------

_ID_ALPHABET = ALPHANUMERIC
_MISTRAL_ID = re.compile(r"[A-Za-z0-9]{9}")


def new_call_id() -> str:
    """OpenAI-style call id: `call_` and 24 random alphanumerics."""
    return "call_" + random_string(_ID_ALPHABET, 24)


def mistral_call_id(call_id: str) -> str:
    """Mistral templates reject ids that are not 9 alphanumerics; others map to a stable 9-character id."""
    if _MISTRAL_ID.fullmatch(call_id):
        return call_id
    number = int.from_bytes(hashlib.sha256(call_id.encode()).digest()[:8], "big")
    chars = []
    for _ in range(9):
        number, digit = divmod(number, len(_ID_ALPHABET))
        chars.append(_ID_ALPHABET[digit])
    return "".join(chars)


def arguments_as_mapping(arguments: Any) -> Any:
    # Templates write `arguments | tojson`: a JSON string would be quoted a second time.
    if arguments is None or arguments == "":
        return {}
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments)
        except ValueError:
            return arguments
        return parsed if isinstance(parsed, dict) else arguments
    return arguments


def _rewrite_call(call: Any, registry: ToolRegistry, fmt: ToolFormat | None) -> Any:
    if not isinstance(call, dict):
        return call
    call = dict(call)
    fn = call.get("function")
    if isinstance(fn, dict):
        fn = dict(fn)
        if isinstance(fn.get("name"), str):
            fn["name"] = registry.model_name(fn["name"])
        fn["arguments"] = arguments_as_mapping(fn.get("arguments"))
        call["function"] = fn
    if fmt is ToolFormat.MISTRAL and isinstance(call.get("id"), str):
        call["id"] = mistral_call_id(call["id"])
    return call


def rewrite_history_tool_names(
    messages: list[dict], registry: ToolRegistry, *, fmt: ToolFormat | None = None
) -> list[dict]:
    """Copies of `messages` whose tool calls use model-facing names and mapping arguments.

    With `fmt=MISTRAL` call ids (and the tool results' `tool_call_id`) also become 9 alphanumerics.
    """
    out = []
    for message in messages:
        role = message.get("role")
        if role == "assistant" and message.get("tool_calls"):
            message = {**message, "tool_calls": [_rewrite_call(c, registry, fmt) for c in message["tool_calls"]]}
        elif role == "tool":
            message = dict(message)
            if isinstance(message.get("name"), str):
                message["name"] = registry.model_name(message["name"])
            if fmt is ToolFormat.MISTRAL and isinstance(message.get("tool_call_id"), str):
                message["tool_call_id"] = mistral_call_id(message["tool_call_id"])
        out.append(message)
    return out


# -- grammars -------------------------------------------------------------------------------------


def _new_converter() -> JsonSchemaConverter:
    return JsonSchemaConverter()


def _arguments_rule(schema: dict, prefix: str) -> tuple[str, dict[str, str]]:
    """The rule for one tool's arguments object, and the rules it needs."""
    if schema.get("type", "object") == "object":
        converter = _new_converter()
        try:
            resolved = converter.resolve_refs(copy.deepcopy(schema), prefix)
            return converter.visit(resolved, f"{prefix}-args"), converter._rules
        except Exception:  # the converter raises assorted errors on schemas it cannot express
            pass
    # Unsupported schema: still force a JSON object, so the call itself stays well-formed.
    converter = _new_converter()
    return converter.visit({"type": "object"}, f"{prefix}-args"), converter._rules


def _lit(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # JSON string escapes are valid GBNF literal escapes


def _char_class_escape(c: str) -> str:
    return "\\" + c if c in "\\]^-[" else c


def _until(rules: dict[str, str], name: str, literal: str) -> str:
    """Any text that does not contain `literal`, then `literal`: one right-recursive rule per matched prefix.

    Restarting on the first character is exact only because it occurs once in `literal`.
    """
    first = literal[0]
    assert literal.count(first) == 1
    head = _char_class_escape(first)
    rules[f"{name}-0"] = f"[^{head}] {name}-0 | {_lit(first)} {name}-1"
    for i in range(1, len(literal)):
        done = "" if i == len(literal) - 1 else f" {name}-{i + 1}"
        rules[f"{name}-{i}"] = (
            f"{_lit(literal[i])}{done} | {_lit(first)} {name}-1 | [^{_char_class_escape(literal[i])}{head}] {name}-0"
        )
    return f"{name}-0"


# Each further call nests one more optional group; llama.cpp's grammar parser refuses (or recurses too
# deep on) hundreds of them, which a request with that many tools produced.
MAX_PARALLEL_CALLS = 16


def _repeat(item: str, sep: str, count: int) -> str:
    """`item`, then up to `count - 1` more, each after `sep`."""
    tail = ""
    for _ in range(count - 1):
        tail = f"({sep} {item}{' ' + tail if tail else ''})?"
    return f"{item} {tail}".rstrip()


def _json_call(name: str, args_rule: str, key: str, extra: str = "") -> str:
    parts = ['"{"', _lit('"name"'), '":"', _lit(json.dumps(name)), '","', _lit(f'"{key}"'), '":"']
    return " tc-sp ".join(parts) + f" tc-sp {args_rule}{extra} " + '"}"'


def _alternatives(rules: dict[str, str], rule: str, calls: dict[str, str]) -> str:
    for i, body in enumerate(calls.values()):
        rules[f"{rule}-{i}"] = body
    rules[rule] = " | ".join(f"{rule}-{i}" for i in range(len(calls)))
    return rule


def _hermes(rules: dict[str, str], args: dict[str, str], limit: int) -> str:
    calls = {
        n: f'"<tool_call>" [ \\n]? {_json_call(n, a, "arguments")} [ \\n]? "</tool_call>"'
        for n, a in args.items()
    }
    return _repeat(_alternatives(rules, "tc-call", calls), "[ \\n]{0,2}", limit)


def _llama3(rules: dict[str, str], args: dict[str, str], limit: int) -> str:
    calls = {n: _json_call(n, a, "parameters") for n, a in args.items()}
    return _repeat(_alternatives(rules, "tc-call", calls), '[;\\n] " "?', limit)


def _mistral(rules: dict[str, str], args: dict[str, str], limit: int) -> str:
    # Both generations of the format: the model picks the one it was trained on.
    rules["tc-id"] = '"," tc-sp "\\"id\\"" tc-sp ":" tc-sp "\\"" [a-zA-Z0-9]{9} "\\"" tc-sp'
    items = {n: _json_call(n, a, "arguments", " tc-id?") for n, a in args.items()}
    named = {n: f'{_lit(n)} ("[CALL_ID]" [a-zA-Z0-9]{{9}})? "[ARGS]" {a}' for n, a in args.items()}
    comma = '"," tc-sp'
    array = f'"[" tc-sp {_repeat(_alternatives(rules, "tc-item", items), comma, limit)} "]"'
    sequence = _repeat(_alternatives(rules, "tc-named", named), '"[TOOL_CALLS]"', limit)
    return f'"[TOOL_CALLS]" ({array} | {sequence})'


def _gpt_oss(rules: dict[str, str], args: dict[str, str], limit: int) -> str:
    # The call ends at the args: <|call|> is an end-of-generation token, which grammars cannot spell out.
    rules["tc-constrain"] = '(" " "<|constrain|>"? "json" | "<|constrain|>json")?'  # never glued to the name
    calls = {
        n: f'({_lit(f"<|channel|>commentary to=functions.{n}")} | {_lit(f" to=functions.{n}<|channel|>commentary")}) '
        f'tc-constrain "<|message|>" {a}'
        for n, a in args.items()
    }
    return _alternatives(rules, "tc-call", calls)


_FORMATS: dict[ToolFormat, Callable[[dict[str, str], dict[str, str], int], str]] = {
    ToolFormat.HERMES: _hermes, ToolFormat.LLAMA3: _llama3, ToolFormat.MISTRAL: _mistral, ToolFormat.GPT_OSS: _gpt_oss,
}


def _reasoning_prefix(fmt: ToolFormat, rules: dict[str, str]) -> str:
    if fmt is ToolFormat.GPT_OSS:
        body = _until(rules, "tc-think", "<|end|>")
        return f'("<|channel|>analysis<|message|>" {body} "<|start|>assistant")? '
    return f'("<think>" {_until(rules, "tc-think", "</think>")} [ \\n]{{0,2}})? '


def tool_call_grammar(
    fmt: ToolFormat,
    registry: ToolRegistry,
    *,
    only: str | None = None,
    parallel: bool = True,
    reasoning: bool = False,
    max_calls: int | None = None,
) -> str:
    """GBNF that makes the model emit at least one valid call in `fmt`, arguments following each schema.

    `only` (either spelling of a tool name) restricts the calls to that tool. With `parallel` up to
    `max_calls` calls (default: one per allowed tool, at most MAX_PARALLEL_CALLS), else exactly one;
    gpt-oss always makes one, because harmony ends a call with an end-of-generation token. `reasoning`
    lets a thinking model reason first (`<think>...</think>`, for gpt-oss an analysis message).
    """
    if only is not None:
        name = registry.resolve(only)
        if name is None:
            raise ValueError(f"tool_choice names {only!r}, which is not one of the request's tools")
        names = [name]
    else:
        names = registry.names
    if not names:
        raise ValueError("a tool-call grammar needs at least one tool")
    rules: dict[str, str] = {"tc-sp": '" "?'}
    args: dict[str, str] = {}
    for i, name in enumerate(names):
        args[name], tool_rules = _arguments_rule(registry.schema(name), f"tool{i}")
        for key, rule in tool_rules.items():
            # Tool rules are prefixed per tool; anything shared is one of the converter's fixed primitives.
            assert rules.setdefault(key, rule) == rule, f"grammar rule {key} defined twice"
    limit = max(1, max_calls or min(len(names), MAX_PARALLEL_CALLS)) if parallel else 1
    body = _FORMATS[fmt](rules, args, limit)
    rules["root"] = (_reasoning_prefix(fmt, rules) if reasoning else "") + body
    return "\n".join(f"{key} ::= {rule}" for key, rule in rules.items()) + "\n"
