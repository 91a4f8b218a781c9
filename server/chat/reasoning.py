"""Separates a model's reasoning from its answer, as text streams in.

- Think tags (DeepSeek-R1 and distills, Qwen3, QwQ, GLM, Seed-OSS, Magistral, ...): `<think>` reasoning
  `</think>` answer. Some templates end the generation prompt with `<think>\\n` already, so the output
  starts inside the reasoning (`starts_in_reasoning`). As in llama-server, a block is recognised only at
  the very start of the output (after whitespace); a tag later on is answer text, and an unclosed block
  is all reasoning. Whitespace around the reasoning and before the answer is dropped.
- Harmony (gpt-oss): messages `<|channel|>NAME<|message|>BODY<|end|>`, later ones prefixed with
  `<|start|>assistant`. Analysis is reasoning; final, and commentary without a recipient (gpt-oss's
  user-visible preambles), are content. A message addressed to a tool (`to=...` in its header, e.g.
  `<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{...}<|call|>`) passes
  through to `content` verbatim, header, body and terminator, for the tool-call parser downstream
  (`<|call|>` is end-of-generation, so a call usually just ends with the stream). That is the only way
  harmony markers reach `content`; none ever reach `reasoning`.

Harmony markers (and some models' think tags) are special tokens: the engine must render them
(`SamplingParams.render_special`) for the splitter to see them.

With no detected style a plain `<think>...</think>` block at the very start is still split: LM Studio
parses reasoning so for every model, GGUFs without a template fall back to ChatML while the model may
still think, and a model that does not reason never opens its answer with a literal `<think>`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from enum import StrEnum
from typing import Any

from ..errors import bad_request
from .deltas import ChatDelta


class ReasoningStyle(StrEnum):
    THINK_TAGS = "think"
    HARMONY = "harmony"


# (open, close) tag pairs models wrap their reasoning in; any pair is accepted from a THINK_TAGS model.
THINK_TAG_PAIRS: tuple[tuple[str, str], ...] = (
    ("<think>", "</think>"),  # DeepSeek-R1, Qwen3, QwQ, GLM-4.5, Hunyuan, ...
    ("<seed:think>", "</seed:think>"),  # ByteDance Seed-OSS
    ("<|START_THINKING|>", "<|END_THINKING|>"),  # Cohere Command A Reasoning
    ("[THINK]", "[/THINK]"),  # Mistral Magistral
    ("◁think▷", "◁/think▷"),  # Moonshot Kimi-VL Thinking
    ("<|begin_of_thought|>", "<|end_of_thought|>"),  # Bespoke-Stratos / OpenThoughts-style fine-tunes
)
_PLAIN_THINK = THINK_TAG_PAIRS[:1]

# Harmony markers (https://cookbook.openai.com/articles/openai-harmony).
_START, _CHANNEL, _MESSAGE = "<|start|>", "<|channel|>", "<|message|>"
# A body ends at a terminator, or where the next message's header begins without one (<|end|> is a control
# token, not rendered unless special tokens are, while llama.cpp always renders gpt-oss's other markers).
_NEXT_HEADER = (_START, _CHANNEL)
_BODY_ENDS = ("<|end|>", "<|return|>", "<|call|>", *_NEXT_HEADER)
_ANALYSIS_OPEN = "<|channel|>analysis<|message|>"
_CHANNEL_RE = re.compile(r"<\|channel\|>\s*([A-Za-z_]+)")
_RECIPIENT_RE = re.compile(r"(?:^|\s|>)to=\S")

_EFFORTS = ("low", "medium", "high")
_THINKING_OFF = ("none", "off", "minimal")
_THINKING_ON = ("on", "auto", "default")


def detect_reasoning_style(template_source: str | None) -> ReasoningStyle | None:
    """The reasoning format a chat template speaks, judged by the markers it mentions."""
    if not template_source:
        return None
    if _CHANNEL in template_source and _MESSAGE in template_source:
        return ReasoningStyle.HARMONY
    # Either tag counts: some templates only strip `...</think>` from history and add `<think>` nowhere.
    if any(o in template_source or c in template_source for o, c in THINK_TAG_PAIRS):
        return ReasoningStyle.THINK_TAGS
    return None


def prompt_opens_reasoning(rendered_prompt: str, style: ReasoningStyle | None) -> bool:
    """Whether the rendered prompt ends inside an open reasoning block, so the output starts in it.

    Only an opening marker followed by nothing but whitespace counts: a `<think>` earlier in the prompt
    (an earlier turn, or a user quoting the tag) must not turn the answer into reasoning.
    """
    tail = rendered_prompt.rstrip()
    if style is ReasoningStyle.HARMONY:
        return tail.endswith(_ANALYSIS_OPEN)
    pairs = THINK_TAG_PAIRS if style is ReasoningStyle.THINK_TAGS else _PLAIN_THINK
    return any(tail.endswith(open_) for open_, _ in pairs)


def template_kwargs_for_effort(reasoning_effort: Any, *, param: str = "reasoning_effort") -> dict[str, Any]:
    """Template variables for a requested reasoning effort (OpenAI `reasoning_effort`, LM Studio `reasoning`).

    `enable_thinking` is always passed, True unless reasoning is turned off, as llama.cpp does: Qwen3
    templates close the think block only when it is False, and llama.cpp's DeepSeek-R1 template closes it
    whenever it is not true. `reasoning_effort` (low|medium|high) is what gpt-oss templates read; they
    default to medium and cannot turn reasoning off, so "none"/"off"/"minimal" ask them for "low".
    "minimal" turns thinking off in on/off templates: it is the nearest of the two settings.
    "on"/"auto"/None keep each template's default effort. Anything else is a 400 naming `param`.
    """
    if reasoning_effort is None:
        return {"enable_thinking": True}
    value = reasoning_effort.strip().lower() if isinstance(reasoning_effort, str) else None
    if value in _THINKING_OFF:
        return {"enable_thinking": False, "reasoning_effort": "low"}
    if value in _THINKING_ON:
        return {"enable_thinking": True}
    if value in _EFFORTS:
        return {"enable_thinking": True, "reasoning_effort": value}
    allowed = ", ".join(repr(v) for v in (*_THINKING_OFF, *_EFFORTS, *_THINKING_ON))
    raise bad_request(f"Invalid value for '{param}': {reasoning_effort!r}. Expected one of {allowed}.", param=param)


def _held_suffix(text: str, markers: Iterable[str]) -> int:
    """Length of the longest tail of `text` that could be the start of a marker still arriving."""
    best = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:n]):
                best = n
                break
    return best


def _find_first(text: str, markers: Iterable[str]) -> tuple[int, str]:
    """Position and text of the earliest marker in `text`, or (-1, "")."""
    found = (-1, "")
    for marker in markers:
        i = text.find(marker)
        if i >= 0 and (found[0] < 0 or i < found[0]):
            found = (i, marker)
    return found


class _ThinkTagSplitter:
    def __init__(self, pairs: tuple[tuple[str, str], ...], starts_in_reasoning: bool) -> None:
        self._pairs = pairs
        self._in_reasoning_at_start = starts_in_reasoning
        self._state = "start"  # start -> reasoning -> after -> content, or start -> content
        self._buf = ""
        self._closers: tuple[str, ...] = tuple(close for _, close in pairs)
        self._reasoning_begun = False
        self._held_space = ""  # trailing reasoning whitespace, given out only if more reasoning follows

    def feed(self, text: str, out: ChatDelta) -> None:
        self._buf += text
        step = {"start": self._start, "reasoning": self._reasoning, "after": self._after, "content": self._content}
        while self._buf and step[self._state](out):
            pass

    def finish(self, out: ChatDelta) -> None:
        rest, self._buf = self._buf, ""
        if self._state == "reasoning" or (self._state == "start" and self._in_reasoning_at_start):
            self._emit_reasoning(rest, out)
        elif self._state in ("start", "content"):
            out.content += rest
        self._held_space = ""

    def _start(self, out: ChatDelta) -> bool:
        stripped = self._buf.lstrip()
        if not stripped:
            return False
        for open_, close in self._pairs:
            if stripped.startswith(open_):
                self._buf = stripped[len(open_) :]
                self._state, self._closers = "reasoning", (close,)
                return True
        if any(open_.startswith(stripped) for open_, _ in self._pairs):
            return False  # maybe an opening tag still arriving
        # The prompt may have opened the block (then any closing tag ends it); otherwise this is the answer.
        self._state = "reasoning" if self._in_reasoning_at_start else "content"
        return True

    def _reasoning(self, out: ChatDelta) -> bool:
        at, tag = _find_first(self._buf, self._closers)
        if at >= 0:
            self._emit_reasoning(self._buf[:at], out)
            self._held_space = ""  # whitespace before the closing tag is not reasoning
            self._buf = self._buf[at + len(tag) :]
            self._state = "after"
            return True
        keep = _held_suffix(self._buf, self._closers)
        cut = len(self._buf) - keep
        self._emit_reasoning(self._buf[:cut], out)
        self._buf = self._buf[cut:]
        return False

    def _after(self, out: ChatDelta) -> bool:
        self._buf = self._buf.lstrip()  # the blank lines between `</think>` and the answer
        if self._buf:
            self._state = "content"
        return bool(self._buf)

    def _content(self, out: ChatDelta) -> bool:
        out.content += self._buf
        self._buf = ""
        return False

    def _emit_reasoning(self, text: str, out: ChatDelta) -> None:
        if not self._reasoning_begun:
            text = text.lstrip()
            if not text:
                return
            self._reasoning_begun = True
        body = text.rstrip()
        if body:
            out.reasoning += self._held_space + body
            self._held_space = text[len(body) :]
        else:
            self._held_space += text


class _HarmonySplitter:
    def __init__(self, starts_in_reasoning: bool) -> None:
        self._state = "body" if starts_in_reasoning else "header"
        self._route = "reasoning" if starts_in_reasoning else "content"  # or "tool": verbatim into content
        self._buf = ""

    def feed(self, text: str, out: ChatDelta) -> None:
        self._buf += text
        while self._buf and (self._header(out) if self._state == "header" else self._body(out)):
            pass

    def finish(self, out: ChatDelta) -> None:
        rest, self._buf = self._buf, ""
        if self._state == "body":
            self._emit(rest, out)
        elif not self._looks_like_header(rest):
            out.content += rest  # not a header after all; a header cut off before its body carries nothing

    def _header(self, out: ChatDelta) -> bool:
        if not self._looks_like_header(self._buf):
            # Plain text from a model that skipped the format. It cannot start with a header marker, so
            # the body state consumes some of it before it can come back here.
            self._state, self._route = "body", "content"
            return True
        at = self._buf.find(_MESSAGE)
        if at < 0:
            return False  # the header is still arriving
        header, self._buf = self._buf[:at], self._buf[at + len(_MESSAGE) :]
        self._state, self._route = "body", _route_for(header)
        if self._route == "tool":
            out.content += header + _MESSAGE
        return True

    def _body(self, out: ChatDelta) -> bool:
        at, marker = _find_first(self._buf, _BODY_ENDS)
        if at >= 0:
            self._emit(self._buf[:at], out)
            if self._route == "tool" and marker not in _NEXT_HEADER:
                out.content += marker
            # The next message's <|start|> or <|channel|> belongs to its header.
            self._buf = self._buf[at:] if marker in _NEXT_HEADER else self._buf[at + len(marker) :]
            self._state = "header"
            return True
        cut = len(self._buf) - _held_suffix(self._buf, _BODY_ENDS)
        self._emit(self._buf[:cut], out)
        self._buf = self._buf[cut:]
        return False

    def _emit(self, text: str, out: ChatDelta) -> None:
        if self._route == "reasoning":
            out.reasoning += text
        else:
            out.content += text

    @staticmethod
    def _looks_like_header(text: str) -> bool:
        head = text.lstrip()
        # Headers open with a marker, or with " to=..." right after the prompt's `<|start|>assistant`.
        return any(head.startswith(p) or p.startswith(head) for p in ("<|", "to="))


def _route_for(header: str) -> str:
    if _RECIPIENT_RE.search(header):
        return "tool"
    channel = _CHANNEL_RE.search(header)
    return "reasoning" if channel and channel.group(1) == "analysis" else "content"


class ReasoningSplitter:
    """Streaming split of generated text into `reasoning` and `content`.

    `feed` returns what can be given out so far (text that might be the start of a marker is held back);
    `finish` returns the rest. Feeding text whole or in any pieces gives the same concatenated result.
    """

    def __init__(self, style: ReasoningStyle | None, *, starts_in_reasoning: bool = False) -> None:
        self.style = style
        if style is ReasoningStyle.HARMONY:
            self._impl: _ThinkTagSplitter | _HarmonySplitter = _HarmonySplitter(starts_in_reasoning)
        else:
            pairs = THINK_TAG_PAIRS if style is ReasoningStyle.THINK_TAGS else _PLAIN_THINK
            self._impl = _ThinkTagSplitter(pairs, starts_in_reasoning)

    def feed(self, text: str) -> ChatDelta:
        out = ChatDelta()
        if text:
            self._impl.feed(text, out)
        return out

    def finish(self) -> ChatDelta:
        out = ChatDelta()
        self._impl.finish(out)
        return out
