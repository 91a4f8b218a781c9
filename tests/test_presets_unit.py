"""Presets: lmkube YAML/JSON and LM Studio files, precedence, and the 400s (unknown, malformed, traversal)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from lmkube.server.chat.presets import Preset, apply_preset, available_presets, default_presets_dir, load_preset
from lmkube.server.errors import APIError

SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
FOCUS_YAML = """\
# A terse assistant.
system_prompt: You are terse.
sampling:
  temperature: 0.2
  top_p: 0.9
  max_tokens: 256
  stop: "###"
  seed: 7
response_format:
  type: json_schema
  json_schema: {name: answer, schema: {type: object, properties: {answer: {type: string}}, required: [answer]}}
"""
LMSTUDIO_PRESET = {
    "identifier": "@local:my-focus",
    "name": "My Focus",
    "changed": True,
    "operation": {
        "fields": [
            {"key": "llm.prediction.systemPrompt", "value": "Stay on topic."},
            {"key": "llm.prediction.temperature", "value": 0.3},
            {"key": "llm.prediction.topKSampling", "value": 20},
            {"key": "llm.prediction.topPSampling", "value": {"checked": False, "value": 0.8}},
            {"key": "llm.prediction.minPSampling", "value": {"checked": True, "value": 0.1}},
            {"key": "llm.prediction.repeatPenalty", "value": {"checked": True, "value": 1.1}},
            {"key": "llm.prediction.maxPredictedTokens", "value": {"checked": False, "value": 1000}},
            {"key": "llm.prediction.stopStrings", "value": ["END"]},
            {"key": "llm.prediction.structured", "value": {"type": "json", "jsonSchema": SCHEMA}},
            {"key": "llm.prediction.contextOverflowPolicy", "value": "rollingWindow"},
        ]
    },
    "load": {"fields": []},
}


@pytest.fixture
def presets(tmp_path: Path) -> Path:
    directory = tmp_path / "presets"
    directory.mkdir()
    (directory / "focus.yaml").write_text(FOCUS_YAML)
    (directory / "creative.json").write_text(json.dumps({"sampling": {"temperature": 1.2, "top_k": 100}}))
    (directory / "My Focus.preset.json").write_text(json.dumps(LMSTUDIO_PRESET))
    (directory / "notes.txt").write_text("not a preset")
    return directory


def error_of(name: str, directory: Path) -> APIError:
    with pytest.raises(APIError) as caught:
        load_preset(name, directory)
    assert caught.value.status == 400
    assert caught.value.param == "preset"
    return caught.value


def test_yaml_preset(presets: Path) -> None:
    preset = load_preset("focus", presets)
    assert preset == Preset(
        name="focus",
        system_prompt="You are terse.",
        sampling={"temperature": 0.2, "top_p": 0.9, "max_tokens": 256, "stop": ["###"], "seed": 7},
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}},
        source=presets / "focus.yaml",
    )
    assert load_preset("@local:focus", presets) == preset


def test_json_preset(presets: Path) -> None:
    preset = load_preset("creative", presets)
    assert (preset.system_prompt, preset.sampling, preset.response_format) == (
        None, {"temperature": 1.2, "top_k": 100}, None)


def test_lmstudio_preset_found_by_identifier(presets: Path) -> None:
    preset = load_preset("@local:my-focus", presets)
    assert preset.system_prompt == "Stay on topic."
    # Unchecked top-p means off (1.0); unchecked max tokens means no limit (unset).
    assert preset.sampling == {"temperature": 0.3, "top_k": 20, "top_p": 1.0, "min_p": 0.1, "repeat_penalty": 1.1,
                               "stop": ["END"]}
    assert preset.response_format == {"type": "json_schema", "json_schema": {"name": "my-focus", "schema": SCHEMA}}
    assert load_preset("My Focus", presets).sampling == preset.sampling  # and by its file name


def test_request_wins_and_preset_fills_the_rest(presets: Path) -> None:
    preset = load_preset("focus", presets)
    request: dict[str, Any] = {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "temperature": 0.7,
        "top_p": None,  # explicit null counts as unset
        "stop": [],
    }
    merged = apply_preset(preset, request)
    assert merged["temperature"] == 0.7
    assert merged["top_p"] == 0.9
    assert merged["max_tokens"] == 256 and merged["seed"] == 7
    assert merged["stop"] == []
    assert merged["response_format"] == preset.response_format
    assert merged["messages"] == [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hi"}]
    assert request["messages"] == [{"role": "user", "content": "hi"}]  # the request itself is left alone
    assert "max_tokens" not in request
    own_format = {"type": "text"}
    assert apply_preset(preset, {**request, "response_format": own_format})["response_format"] is own_format


@pytest.mark.parametrize("role", ["system", "developer"])
def test_own_system_message_wins(presets: Path, role: str) -> None:
    messages = [{"role": role, "content": "Mine."}, {"role": "user", "content": "hi"}]
    assert apply_preset(load_preset("focus", presets), {"messages": messages})["messages"] == messages


def test_preset_values_are_copies(presets: Path) -> None:
    preset = load_preset("focus", presets)
    merged = apply_preset(preset, {})
    merged["stop"].append("more")
    merged["response_format"]["json_schema"]["name"] = "changed"
    assert preset.sampling["stop"] == ["###"]
    assert preset.response_format is not None and preset.response_format["json_schema"]["name"] == "answer"


def test_unknown_preset_lists_the_available_ones(presets: Path, tmp_path: Path) -> None:
    error = error_of("@local:nope", presets)
    assert error.message == "Preset '@local:nope' not found. Available presets: My Focus, creative, focus."
    assert available_presets(presets) == ["My Focus", "creative", "focus"]
    assert error_of("x", tmp_path / "missing").message.endswith("Available presets: none.")


@pytest.mark.parametrize(
    "name", ["../secret", "..", "a/b", "/etc/passwd", "@local:../secret", ".hidden", "x\\..\\y", "", "a..b", 7]
)
def test_path_traversal_is_refused(presets: Path, name: Any) -> None:
    (presets.parent / "secret.yaml").write_text("system_prompt: leaked\n")
    error = error_of(name, presets)
    assert "Invalid preset name" in error.message
    assert "leaked" not in error.message


@pytest.mark.parametrize(
    ("filename", "content", "needle"),
    [
        ("bad.yaml", "system_prompt: [unclosed\n", "bad.yaml"),
        ("bad.json", "{not json", "bad.json"),
        ("bad.yaml", "- a list\n", "top level must be a mapping"),
        ("bad.yaml", "temperature: 0.5\n", "sampling settings go under 'sampling:'"),
        ("bad.yaml", "sampling: {warmth: 1}\n", "unknown sampling key(s) 'warmth'"),
        ("bad.yaml", "sampling: {temperature: hot}\n", "'temperature' must be a number"),
        ("bad.yaml", "sampling: {top_p: 1.5}\n", "'top_p' must be at most 1.0"),
        ("bad.yaml", "sampling: {max_tokens: 0}\n", "'max_tokens' must be at least 1"),
        ("bad.yaml", "sampling: {stop: [1, 2]}\n", "'stop' must be a string or a list of strings"),
        ("bad.yaml", "system_prompt: {a: 1}\n", "system prompt must be a string"),
        ("bad.yaml", "response_format: {type: json_object}\n", "must be 'json_schema' or 'text'"),
        ("bad.json", json.dumps({"identifier": "@local:bad", "operation": {"fields": "x"}}), "'operation.fields'"),
        ("bad.json", json.dumps({"operation": {"fields": [{"key": "llm.prediction.structured",
                                                            "value": {"type": "gbnf"}}]}}), "not supported"),
        ("bad.yaml", b"\xff\xfe\x00garbage", "bad.yaml"),
    ],
)
def test_malformed_files_are_400s_naming_file_and_problem(
    presets: Path, filename: str, content: str | bytes, needle: str
) -> None:
    path = presets / filename
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    error = error_of("bad", presets)
    assert error.message.startswith(f"Preset file '{filename}' is malformed: ")
    assert needle in error.message


def test_default_directory_is_under_lmkube_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMKUBE_HOME", str(tmp_path))
    assert default_presets_dir() == tmp_path / "presets"
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "home.yml").write_text("system_prompt: from home\n")
    assert load_preset("home").system_prompt == "from home"
