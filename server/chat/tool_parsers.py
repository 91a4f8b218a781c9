"""Finds tool calls in generated text as it streams, for each call format models are trained on.

Text that could be the start of a call marker is held back until it is decided. A call is announced
(index, id, name) once its name is known and its arguments object has begun; the raw argument text
then streams as it arrives. Whatever turns out not to be a well-formed call of a known tool comes
back as plain content, so no text is lost. Non-streaming callers feed everything once, then finish.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from .deltas import ChatDelta, ToolCall, ToolCallDelta
from .tools import ToolFormat, ToolRegistry, new_call_id

_WS = " \t\n\r"
_STRING_STOP = re.compile(r'["\\]')
_ARG_KEYS = ("arguments", "parameters")
_INVALID = object()


def _loads(text: str) -> Any:
    try:
        return json.loads(text, strict=False)  # strict=False: models put raw newlines in code arguments
    except ValueError:
        return _INVALID


def _compact(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    try:
        text.encode()
    except UnicodeEncodeError:  # a lone surrogate from a \uD800-style escape: keep it escaped
        text = json.dumps(value, separators=(",", ":"))
    return text


def _skip_ws(text: str, pos: int) -> int:
    return len(text) - len(text[pos:].lstrip(_WS))


def _caller(registry: ToolRegistry, name: Any) -> str | None:
    return registry.caller_name(name) if isinstance(name, str) else None


@dataclass(eq=False, slots=True)
class _Draft:
    """One call as far as it has been read; positions index the attempt's raw text."""

    name: str | None = None  # the caller's name for the tool, once read and known
    args_start: int = -1  # where an object-valued arguments value starts: the text that streams
    args_end: int = -1
    seen: int = -1  # how far the text has been read
    arguments: str | None = None  # compact JSON, once the call is complete
    index: int = -1  # set when the call is announced
    call_id: str = ""
    sent: int = -1  # raw position up to which argument text has been streamed
    done: bool = False  # complete and handed out


class _ObjectReader:
    """Follows one JSON object as its text arrives: where it ends and where its top-level members sit.

    It tracks only strings and nesting, resumably, so streamed text is read once; json.loads checks
    the object when it closes. `wrapper` objects are `{"name": ..., "arguments": {...}}` ("parameters"
    too; other keys are ignored), else the object is the arguments.
    """

    def __init__(self, registry: ToolRegistry, draft: _Draft, start: int, *, wrapper: bool, name_first: bool) -> None:
        self.registry, self.draft, self.start, self.pos = registry, draft, start, start
        self.wrapper = wrapper
        self.name_first = name_first  # a bare object (Llama 3) must look like a call from its first key
        self.depth = self.keys = 0
        self.string_start = self.value_start = self.end = -1
        self.in_string = self.awaiting_value = self.error = False
        self.last_string, self.key = "", None
        if not wrapper:
            draft.args_start = start

    def read(self, raw: str) -> bool | None:
        """True once complete, False when malformed, None while unfinished."""
        self._scan(raw)
        self.draft.seen = min(self.pos, len(raw))
        if self.error:
            return False
        return None if self.end < 0 else self._complete(raw)

    def _scan(self, raw: str) -> None:
        pos = self.pos
        while pos < len(raw) and self.end < 0 and not self.error:
            c = raw[pos]
            if self.in_string:
                match = _STRING_STOP.search(raw, pos)
                if match is None:
                    pos = len(raw)
                elif raw[match.start()] == "\\":
                    pos = match.start() + 2  # may point past the text: the escaped character is still to come
                else:
                    pos = match.start() + 1
                    self.in_string = False
                    if self.depth == 1:
                        self._string_closed(raw[self.string_start : pos])
                continue
            pos += 1
            if c in _WS:
                continue
            if self.depth == 0 and c != "{":  # wrappers and arguments are always objects
                self.error = True
            elif self.depth == 1 and self.awaiting_value:
                self._value_started(raw, pos - 1)
            if c == '"':
                self.in_string, self.string_start = True, pos - 1
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth == 1 and self.draft.args_start == self.value_start and self.wrapper:
                    self.draft.args_end = pos
                self.end = pos if self.depth == 0 else -1
            elif c == ":" and self.depth == 1:
                self.key, self.awaiting_value = _loads(self.last_string), True
                self.keys += 1
                self.error = self.name_first and self.keys == 1 and self.key not in ("name", "type")
        self.pos = pos

    def _value_started(self, raw: str, pos: int) -> None:
        self.value_start, self.awaiting_value = pos, False
        if self.wrapper and self.key in _ARG_KEYS and raw[pos] == "{" and self.draft.args_start < 0:
            self.draft.args_start = pos

    def _string_closed(self, text: str) -> None:
        self.last_string = text
        if self.wrapper and self.key == "name" and self.value_start == self.string_start:
            self.draft.name = _caller(self.registry, _loads(text))  # unknown tools fail before being announced
            self.error = self.draft.name is None

    def _complete(self, raw: str) -> bool:
        value = _loads(raw[self.start : self.end])
        if not isinstance(value, dict):
            return False
        draft = self.draft
        if self.wrapper:
            if "name" not in value and isinstance(value.get("function"), dict):
                value = value["function"]  # the OpenAI shape, {"type": "function", "function": {...}}
            draft.name = _caller(self.registry, value.get("name"))
            value = next((value[k] for k in _ARG_KEYS if k in value), None)
            if isinstance(value, str):  # some models send the arguments as a JSON string
                value = _loads(value)
            value = {} if value is None else value  # tools without parameters are often called without
        else:
            draft.args_end = self.end
        if draft.name is None or not isinstance(value, dict):
            return False
        draft.arguments = _compact(value)
        return True


class _Fail(Exception):
    """Not a call after all."""


Program = Generator[None, None, int]  # yields while it needs more text, returns where the calls end


class _Attempt:
    """One try at reading call(s) from a marker on; the parser appends arriving text to `raw`.

    The format's reading program is a generator, so it resumes where it stopped when text arrives.
    """

    def __init__(self, registry: ToolRegistry, marker: str, raw: str, program: Callable[[_Attempt], Program]) -> None:
        self.registry, self.marker, self.raw = registry, marker, raw
        self.drafts: list[_Draft] = []
        self.end = -1  # where the call text ends, once done
        self.failed = False
        self.boundary = 0  # end of the last complete call, for a marker followed by several calls
        self.final = False
        self._program = program(self)

    def read(self, final: bool) -> None:
        """Advances over the text; decides `end` or `failed` now if `final`."""
        self.final = final
        try:
            next(self._program)
            self.failed = final
        except StopIteration as stop:
            self.end = stop.value
        except _Fail:
            self.failed = True

    def wait(self) -> Generator[None, None, None]:
        if self.final:
            raise _Fail
        yield

    def skip_ws(self, pos: int) -> Generator[None, None, int]:
        """The position of the next non-space character."""
        while (j := _skip_ws(self.raw, pos)) == len(self.raw):
            yield from self.wait()
        return j

    def until(self, pos: int, text: str, limit: int, stop: re.Pattern[str]) -> Generator[None, None, int]:
        """Where `text` occurs within `limit` characters, with no `stop` match before it."""
        while (i := self.raw.find(text, pos, pos + limit + len(text))) < 0:
            if stop.search(self.raw, pos, pos + limit) or len(self.raw) >= pos + limit + len(text):
                raise _Fail
            yield from self.wait()
        if stop.search(self.raw, pos, i):
            raise _Fail
        return i

    def closing(self, pos: int, tag: str) -> Generator[None, None, int]:
        """Takes an optional closing `tag` after the call."""
        while True:
            j = _skip_ws(self.raw, pos)
            rest = self.raw[j : j + len(tag)]
            if rest == tag:
                return j + len(tag)
            if self.final:  # whitespace that ends the output goes with the call
                return j if j == len(self.raw) else pos
            if not tag.startswith(rest):
                return pos
            yield

    def call(self, name: str) -> _Draft:
        """Starts a call whose name came before its arguments object."""
        if (caller := _caller(self.registry, name)) is None:
            raise _Fail
        self.drafts.append(_Draft(name=caller))
        return self.drafts[-1]

    def read_object(self, pos: int, draft: _Draft | None = None, *, name_first: bool = False) -> Program:
        """Reads a call wrapper object, or the arguments object of `draft`."""
        if draft is None:
            self.drafts.append(draft := _Draft())
        reader = _ObjectReader(self.registry, draft, pos, wrapper=draft.name is None, name_first=name_first)
        while (result := reader.read(self.raw)) is None:
            yield from self.wait()
        if not result:
            raise _Fail
        self.boundary = reader.end
        return reader.end


# -- the formats ---------------------------------------------------------------------------------


def _hermes(a: _Attempt) -> Program:
    end = yield from a.read_object((yield from a.skip_ws(len(a.marker))))
    return (yield from a.closing(end, "</tool_call>"))


def _llama3(a: _Attempt) -> Program:
    if a.marker == "{":
        return (yield from a.read_object(0, name_first=True))
    return (yield from a.read_object((yield from a.skip_ws(len(a.marker)))))


_MISTRAL_HEADER = re.compile(r"([A-Za-z0-9_.\-]+)(?:\[CALL_ID\][A-Za-z0-9_\-]*)?")
_SPACE = re.compile(r"\s")


def _mistral(a: _Attempt) -> Program:
    pos = yield from a.skip_ws(len(a.marker))
    if a.raw[pos] == "{":
        return (yield from a.read_object(pos))
    if a.raw[pos] != "[":  # Mistral Small 3.2: name[CALL_ID]id[ARGS]{...}
        args = yield from a.until(pos, "[ARGS]", 192, _SPACE)
        header = _MISTRAL_HEADER.fullmatch(a.raw, pos, args)
        draft = a.call(header.group(1) if header else "")
        return (yield from a.read_object((yield from a.skip_ws(args + 6)), draft))
    pos += 1
    while True:  # Mistral Nemo: [{"name": ..., "arguments": {...}, "id": ...}, ...]
        end = yield from a.read_object((yield from a.skip_ws(pos)))
        while (pos := _skip_ws(a.raw, end)) == len(a.raw) and not a.final:
            yield
        if a.raw[pos : pos + 1] != ",":
            return pos + 1 if a.raw[pos : pos + 1] == "]" else end  # a missing "]" still ends the calls
        pos += 1


_HARMONY_STOPS = re.compile(r"<\|(?:end|start|call|return)\|>")
_HARMONY_RECIPIENT = re.compile(r"to=functions\.([^\s<]+)")


def _harmony(a: _Attempt) -> Program:
    """A message header naming `functions.NAME` as recipient, in either place harmony allows it."""
    header_end = yield from a.until(len(a.marker), "<|message|>", 256, _HARMONY_STOPS)
    recipient = _HARMONY_RECIPIENT.search(a.raw, 0, header_end)
    draft = a.call(recipient.group(1) if recipient else "")
    end = yield from a.read_object((yield from a.skip_ws(header_end + len("<|message|>"))), draft)
    return (yield from a.closing(end, "<|call|>"))  # usually absent: <|call|> ends generation


@dataclass(frozen=True)
class _Spec:
    markers: tuple[str, ...]
    program: Callable[[_Attempt], Program]
    separators: str = _WS  # what may sit between calls (and is dropped there)
    bare_json: bool = False  # a `{` where a call may start begins one (Llama 3)


_SPECS = {
    ToolFormat.HERMES: _Spec(("<tool_call>",), _hermes),
    ToolFormat.LLAMA3: _Spec(("<|python_tag|>",), _llama3, _WS + ";", bare_json=True),
    ToolFormat.MISTRAL: _Spec(("[TOOL_CALLS]",), _mistral),
    # No separators: harmony has none between messages, and " to=functions." starts with a space.
    ToolFormat.GPT_OSS: _Spec(("<|start|>", "<|channel|>", " to=functions."), _harmony, ""),
}


class ToolCallParser:
    """Streaming: feed content text as generated; get ChatDeltas with plain content and tool-call pieces.

    Calls get indexes 0, 1, 2... in the order they are announced. A call announced while streaming
    whose text then turns out malformed (cut off, bad JSON) is listed in `abandoned` and its text
    comes back as content; `calls` holds only complete calls. Whitespace between calls is dropped.
    """

    def __init__(self, fmt: ToolFormat, registry: ToolRegistry) -> None:
        self._spec = _SPECS[ToolFormat(fmt)]
        self._longest = max(map(len, self._spec.markers))
        self._registry = registry
        self._text = ""  # arrived text neither emitted nor handed to an attempt
        self._sep = ""  # separators held where a call may start: dropped if one does
        self._call_position = True  # the start of the output, or just after a call
        self._after_call = False
        self._attempt: _Attempt | None = None
        self._calls: list[ToolCall] = []
        self._next_index = 0
        self._out = ChatDelta()
        self.abandoned: list[int] = []

    @property
    def calls(self) -> list[ToolCall]:
        """Complete calls: caller names, arguments as compact JSON text."""
        return list(self._calls)

    def feed(self, text: str) -> ChatDelta:
        self._out = ChatDelta()
        if self._attempt is not None:
            self._attempt.raw += text
        else:
            self._text += text
        self._pump(final=False)
        if self._attempt is not None:
            # Announced only here, after the whole chunk was read: a call that is complete (or broken)
            # within one chunk, as in non-streaming use, is decided before any of it goes out.
            self._stream_open_call(self._attempt)
        return self._out

    def finish(self) -> ChatDelta:
        self._out = ChatDelta()
        self._pump(final=True)
        if not self._after_call:
            self._out.content += self._sep
        self._sep = ""
        return self._out

    def _pump(self, final: bool) -> None:
        while self._advance(final) if self._attempt is not None else self._scan(final):
            pass

    def _scan(self, final: bool) -> bool:
        """Emits plain text up to the next call marker; True if an attempt started there."""
        text = self._text
        if self._call_position:
            body = text.lstrip(self._spec.separators)
            self._sep += text[: len(text) - len(body)]
            text = body
        hit = self._find_marker(text)
        if hit is None:
            keep = 0 if final else self._held_back(text)
            self._content(text[: len(text) - keep])
            self._text = text[len(text) - keep :]
            return False
        i, marker = hit
        self._content(text[:i])
        self._text = ""
        self._attempt = _Attempt(self._registry, marker, text[i:], self._spec.program)
        return True

    def _find_marker(self, text: str) -> tuple[int, str] | None:
        if self._spec.bare_json and self._call_position and text.startswith("{"):
            return 0, "{"
        hits = [(i, m) for m in self._spec.markers if (i := text.find(m)) >= 0]
        return min(hits) if hits else None

    def _held_back(self, text: str) -> int:
        """Length of the longest end of `text` that could still grow into a marker."""
        for k in range(min(len(text), self._longest - 1), 0, -1):
            if any(m.startswith(text[-k:]) for m in self._spec.markers):
                return k
        return 0

    def _content(self, text: str) -> None:
        if text:
            self._out.content += self._sep + text
            self._sep = ""
            self._call_position = self._after_call = False

    def _advance(self, final: bool) -> bool:
        """Reads the attempt on; True once it is decided."""
        attempt = self._attempt
        assert attempt is not None
        attempt.read(final)
        for draft in attempt.drafts:
            if draft.arguments is not None and not draft.done:
                self._complete(attempt, draft)
        if attempt.failed:
            self.abandoned += [d.index for d in attempt.drafts if d.index >= 0 and not d.done]
            if any(d.done for d in attempt.drafts):  # the calls before the malformed one stand
                self._text = attempt.raw[attempt.boundary :]
            else:
                self._content(attempt.marker)
                self._text = attempt.raw[len(attempt.marker) :]
        elif attempt.end >= 0:
            self._text = attempt.raw[attempt.end :]
        else:
            return False
        self._attempt = None
        return True

    def _announce(self, draft: _Draft) -> None:
        draft.index, draft.call_id, draft.sent = self._next_index, new_call_id(), draft.args_start
        self._next_index += 1
        self._out.tool_calls.append(ToolCallDelta(draft.index, draft.call_id, draft.name, ""))

    def _send(self, draft: _Draft, text: str) -> None:
        if text:
            self._out.tool_calls.append(ToolCallDelta(draft.index, arguments=text))

    def _stream_open_call(self, attempt: _Attempt) -> None:
        for draft in attempt.drafts:
            if draft.done or draft.name is None or draft.args_start < 0:
                continue
            if draft.index < 0:
                self._announce(draft)
            upto = draft.args_end if draft.args_end >= 0 else draft.seen
            if upto > draft.sent:
                self._send(draft, attempt.raw[draft.sent : upto])
                draft.sent = upto

    def _complete(self, attempt: _Attempt, draft: _Draft) -> None:
        assert draft.name is not None and draft.arguments is not None
        if draft.index < 0:
            self._announce(draft)
        if draft.args_start >= 0:  # the raw object text, as streamed
            self._send(draft, attempt.raw[draft.sent : draft.args_end])
        else:  # arguments given as a string, or none
            self._send(draft, draft.arguments)
        draft.done = True
        self._calls.append(ToolCall(draft.call_id, draft.name, draft.arguments))
        self._sep = ""
        self._call_position = self._after_call = True
