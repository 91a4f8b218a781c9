"""Request presets: a named system prompt, sampling defaults and response format, as LM Studio's `preset`.

Files live in `$LMKUBE_HOME/presets/` as `<name>.yaml`, `<name>.yml`, `<name>.json` or `<name>.preset.json`
and are read on every request, so edits apply at once. LM Studio ids such as `"@local:focus"` name
`focus`. Two formats are read:

lmkube's own (YAML or JSON); unknown keys are errors so typos do not pass silently:

    system_prompt: You are terse.
    sampling: {temperature: 0.2, top_p: 0.9, max_tokens: 512, stop: ["###"]}
    response_format: {type: json_schema, json_schema: {name: answer, schema: {type: object}}}

LM Studio's exported `*.preset.json` (`{"identifier": "@local:focus", "operation": {"fields": [...]}}`),
copied as is: system prompt, temperature, top-k/top-p/min-p, repeat penalty, max tokens, stop strings and
a JSON-schema `structured` setting are used; app-only fields are ignored. Such a file may also be found
by its `identifier` when its file name is the display name.

Unlike the report that LM Studio's REST API applies only a preset's structured-output part
(lmstudio-bug-tracker#1389), every part applies here, each only where the request leaves it unset.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import yaml

from ..errors import APIError, bad_request
from ..store.paths import lmkube_home
from .structured import json_schema_of

SUFFIXES = (".preset.json", ".yaml", ".yml", ".json")  # .preset.json first: it also ends in .json
SAMPLING_KEYS = (
    "temperature", "top_p", "top_k", "min_p", "repeat_penalty", "presence_penalty", "frequency_penalty",
    "max_tokens", "stop", "seed",
)  # fmt: skip
_OWN_KEYS = frozenset({"name", "description", "system_prompt", "sampling", "response_format"})
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_. -]{0,127}")
_LOCAL_PREFIX = "@local:"
_MAX_FILE_BYTES = 1 << 20
_LMS_FIELDS = {
    "llm.prediction.systemPrompt": "system_prompt",
    "llm.prediction.temperature": "temperature",
    "llm.prediction.topKSampling": "top_k",
    "llm.prediction.topPSampling": "top_p",
    "llm.prediction.minPSampling": "min_p",
    "llm.prediction.repeatPenalty": "repeat_penalty",
    "llm.prediction.maxPredictedTokens": "max_tokens",
    "llm.prediction.stopStrings": "stop",
    "llm.prediction.structured": "response_format",
}
# What an unchecked LM Studio checkbox setting means; None: no setting at all.
_LMS_DISABLED: dict[str, Any] = {"top_p": 1.0, "min_p": 0.0, "repeat_penalty": 1.0, "max_tokens": None}


class _Invalid(ValueError):
    """A problem with a preset file's content; the message says what."""


@dataclass(slots=True)
class Preset:
    name: str
    system_prompt: str | None = None
    sampling: dict[str, Any] = field(default_factory=dict)  # only the keys the preset sets, see SAMPLING_KEYS
    response_format: dict[str, Any] | None = None
    source: Path | None = None  # the file it was read from


def default_presets_dir() -> Path:
    return lmkube_home() / "presets"


def available_presets(presets_dir: Path | None = None) -> list[str]:
    directory = presets_dir or default_presets_dir()
    if not directory.is_dir():
        return []
    names = {_stem(p.name) for p in directory.iterdir() if p.is_file() and _stem(p.name)}
    return sorted(n for n in names if n and _NAME_RE.fullmatch(n))


def load_preset(name: str, presets_dir: Path | None = None) -> Preset:
    """The preset called `name` (or `@local:name`); 400 if the name is unknown or invalid, or the file malformed."""
    directory = presets_dir or default_presets_dir()
    key = _preset_key(name)
    path = _find(directory, key)
    if path is None:
        known = ", ".join(available_presets(directory)) or "none"
        raise bad_request(f"Preset '{name}' not found. Available presets: {known}.", param="preset",
                          code="preset_not_found")
    try:
        return _parse(key, _read(path), path)
    except _Invalid as exc:
        raise bad_request(f"Preset file '{path.name}' is malformed: {exc}", param="preset") from exc


def apply_preset(preset: Preset, request_fields: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `request_fields` with the preset's defaults wherever the request leaves a field unset (None).

    Sampling keys use the names in SAMPLING_KEYS. The system prompt is prepended to `messages` only when
    they hold no system (or developer) message: LM Studio uses a preset's prompt when the conversation
    brings none, and a caller's own system message is the more specific instruction.
    """
    fields = dict(request_fields)
    for key, value in preset.sampling.items():
        if fields.get(key) is None:
            fields[key] = list(value) if isinstance(value, list) else value
    if preset.response_format is not None and fields.get("response_format") is None:
        fields["response_format"] = json.loads(json.dumps(preset.response_format))  # callers may mutate theirs
    messages = fields.get("messages")
    if preset.system_prompt and isinstance(messages, list) and not any(_is_system(m) for m in messages):
        fields["messages"] = [{"role": "system", "content": preset.system_prompt}, *messages]
    return fields


def _is_system(message: Any) -> bool:
    return isinstance(message, Mapping) and message.get("role") in ("system", "developer")


def _preset_key(name: Any) -> str:
    key = name.strip() if isinstance(name, str) else ""
    if key.startswith(_LOCAL_PREFIX):
        key = key[len(_LOCAL_PREFIX) :]
    # Letters, digits and `_. -` only, never a leading dot: no separators, so no way out of the folder.
    if not _NAME_RE.fullmatch(key) or ".." in key:
        raise bad_request(f"Invalid preset name {name!r}: use letters, digits, '_', '-', '.' and spaces.",
                          param="preset")
    return key


def _stem(filename: str) -> str:
    for suffix in SUFFIXES:
        if filename.endswith(suffix):
            return filename[: -len(suffix)]
    return ""


def _find(directory: Path, key: str) -> Path | None:
    for suffix in SUFFIXES:
        path = directory / f"{key}{suffix}"
        if path.is_file():
            return path
    # LM Studio names its files after the display name; the id lives inside.
    if directory.is_dir():
        wanted = {key, _LOCAL_PREFIX + key}
        for path in sorted(directory.glob("*.json")):
            try:
                data = json.loads(path.read_bytes()[:_MAX_FILE_BYTES])
            except (OSError, ValueError):
                continue
            if isinstance(data, dict) and data.get("identifier") in wanted:
                return path
    return None


def _read(path: Path) -> Any:
    try:
        raw = path.read_bytes()
        if len(raw) > _MAX_FILE_BYTES:
            raise _Invalid(f"larger than {_MAX_FILE_BYTES} bytes")
        text = raw.decode("utf-8-sig")
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as exc:
        raise _Invalid(str(exc).replace("\n", " ")) from exc


def _parse(key: str, data: Any, path: Path) -> Preset:
    if not isinstance(data, dict):
        raise _Invalid("the top level must be a mapping")
    if "operation" in data or "identifier" in data:
        return _parse_lmstudio(key, data, path)
    unknown = sorted(set(data) - _OWN_KEYS)
    if unknown:
        hint = " (sampling settings go under 'sampling:')" if set(unknown) & set(SAMPLING_KEYS) else ""
        raise _Invalid(f"unknown key(s) {', '.join(map(repr, unknown))}{hint}")
    sampling = data.get("sampling") or {}
    if not isinstance(sampling, dict):
        raise _Invalid("'sampling' must be a mapping")
    bad = sorted(set(sampling) - set(SAMPLING_KEYS))
    if bad:
        raise _Invalid(f"unknown sampling key(s) {', '.join(map(repr, bad))}; known: {', '.join(SAMPLING_KEYS)}")
    return Preset(
        name=key,
        system_prompt=_system_prompt(data.get("system_prompt")),
        sampling=_sampling(sampling),
        response_format=_response_format(data.get("response_format")),
        source=path,
    )


def _parse_lmstudio(key: str, data: dict[str, Any], path: Path) -> Preset:
    operation = data.get("operation") or {}
    fields = operation.get("fields") if isinstance(operation, dict) else None
    if not isinstance(fields, list):
        raise _Invalid("'operation.fields' must be a list")
    values: dict[str, Any] = {}
    for entry in fields:
        if not isinstance(entry, dict) or not isinstance(entry.get("key"), str):
            raise _Invalid("each of 'operation.fields' must be an object with a 'key' and a 'value'")
        target = _LMS_FIELDS.get(entry["key"])
        if target is None:
            continue  # app-side settings (context overflow policy, tools, CPU threads, ...)
        value = entry.get("value")
        if isinstance(value, dict) and "checked" in value:  # LM Studio's checkbox settings
            value = value.get("value") if value["checked"] else _LMS_DISABLED.get(target)
        values[target] = value
    prompt = values.pop("system_prompt", None)
    structured = values.pop("response_format", None)
    return Preset(
        name=key,
        system_prompt=_system_prompt(prompt),
        sampling=_sampling(values),
        response_format=_structured(structured, key),
        source=path,
    )


def _structured(value: Any, name: str) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _Invalid("'llm.prediction.structured' must be an object")
    kind = value.get("type")
    if kind in ("none", None):
        return None
    if kind != "json":
        raise _Invalid(f"structured output of type {kind!r} is not supported (only 'json' with a 'jsonSchema')")
    return _response_format({"type": "json_schema", "json_schema": {"name": name, "schema": value.get("jsonSchema")}})


def _system_prompt(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _Invalid("the system prompt must be a string")
    return value if value.strip() else None


def _response_format(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    try:
        json_schema_of(value)  # the same checks a request's own response_format gets
    except APIError as exc:
        raise _Invalid(exc.message) from exc
    return dict(value)


def _number(lo: float | None = None, hi: float | None = None, *, integer: bool = False) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        kinds: tuple[type, ...] = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise _Invalid(f"must be {'an integer' if integer else 'a number'}, not {value!r}")
        number = cast(float, value)  # an int or a float: checked just above
        if lo is not None and number < lo:
            raise _Invalid(f"must be at least {lo}, not {value!r}")
        if hi is not None and number > hi:
            raise _Invalid(f"must be at most {hi}, not {value!r}")
        return value

    return check


def _stop(value: Any) -> list[str]:
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _Invalid(f"must be a string or a list of strings, not {value!r}")
    return [s for s in stops if s]


_CHECKS: dict[str, Callable[[Any], Any]] = {
    "temperature": _number(0.0),
    "top_p": _number(0.0, 1.0),
    "top_k": _number(0, integer=True),
    "min_p": _number(0.0, 1.0),
    "repeat_penalty": _number(0.0),
    "presence_penalty": _number(-2.0, 2.0),
    "frequency_penalty": _number(-2.0, 2.0),
    "max_tokens": _number(1, integer=True),
    "stop": _stop,
    "seed": _number(integer=True),
}


def _sampling(values: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in values.items():
        if value is None:
            continue  # unset, as in a request
        try:
            out[key] = _CHECKS[key](value)
        except _Invalid as exc:
            raise _Invalid(f"'{key}' {exc}") from exc
    return out
