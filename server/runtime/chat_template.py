"""Renders a model's own chat template (GGUF `tokenizer.chat_template`) in a sandbox.

Templates are untrusted input shipped inside model files, so they run in jinja2's immutable
sandbox with only the helpers real Hugging Face templates expect.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from functools import cached_property, lru_cache
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Used when a GGUF carries no template: ChatML is what most instruction-tuned GGUFs speak.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


# A name and a result no template writes by itself: finding them in a render shows the template used the input.
_PROBE_TOOL = "lmkube_probe_tool"
_PROBE_CALL = "lmkube_probe_call"  # another name than the listed tool's: some templates need `tools` to render
_PROBE_RESULT = "lmkube-probe-result"
_PROBE_TOOLS: list[dict[str, Any]] = [{"type": "function", "function": {
    "name": _PROBE_TOOL, "description": "", "parameters": {"type": "object", "properties": {}}}}]
_PROBE_CALL_HISTORY: list[dict[str, Any]] = [
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": _PROBE_CALL, "arguments": {}}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": _PROBE_RESULT},
]


class ChatTemplateError(ValueError):
    """The template could not be compiled or raised while rendering; the message says why."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _strftime_now(fmt: str) -> str:
    return dt.datetime.now().strftime(fmt)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
    # Hugging Face's tojson keeps non-ASCII text as is, unlike jinja2's HTML-safe default.
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"], autoescape=False
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@lru_cache(maxsize=64)
def _compile(source: str) -> jinja2.Template:
    try:
        return _environment().from_string(source)
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"the model's chat template does not compile: {exc}") from exc


class ChatTemplate:
    def __init__(self, source: str | None, *, bos_token: str = "", eos_token: str = "") -> None:
        self.source = source or CHATML_TEMPLATE
        self.is_fallback = not source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._template = _compile(self.source)

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        try:
            return self._template.render(
                messages=[dict(m) for m in messages],
                tools=list(tools) if tools else None,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                **kwargs,
            )
        except ChatTemplateError:
            raise
        except Exception as exc:  # a template is untrusted code: whatever it raises is its failure, not ours
            raise ChatTemplateError(f"the model's chat template failed: {exc}") from exc

    def _probe(self, messages: Sequence[Mapping[str, Any]], needle: str, **kwargs: Any) -> bool:
        try:
            return needle in self.render(messages, **kwargs)
        except ChatTemplateError:
            return False

    @cached_property
    def renders_tools(self) -> bool:
        """Whether the template shows the model the request's tools (many, and the ChatML fallback, ignore them)."""
        return self._probe([{"role": "user", "content": "hi"}], _PROBE_TOOL, tools=_PROBE_TOOLS)

    @cached_property
    def renders_tool_calls(self) -> bool:
        """Whether an assistant message's `tool_calls` appear in the prompt."""
        return self._probe(_PROBE_CALL_HISTORY, _PROBE_CALL, tools=_PROBE_TOOLS)

    @cached_property
    def renders_tool_results(self) -> bool:
        """Whether `tool` messages (tool results) appear in the prompt."""
        return self._probe(_PROBE_CALL_HISTORY, _PROBE_RESULT, tools=_PROBE_TOOLS)
