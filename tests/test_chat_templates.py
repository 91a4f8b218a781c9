"""Real chat templates of the main model families render in the sandbox with real variables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from lmkube.server.runtime.chat_template import CHATML_TEMPLATE, ChatTemplate, ChatTemplateError

TEMPLATES = Path(__file__).parent / "templates"

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": "",
     "tool_calls": [{"id": "call_0123456789", "type": "function",
                     "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "tool_call_id": "call_0123456789", "content": "{\"temp_c\": 21}"},
    {"role": "assistant", "content": "It is 21 degrees in Paris."},
    {"role": "user", "content": "Thanks ✓"},
]


def load(name: str, bos: str = "<s>", eos: str = "</s>") -> ChatTemplate:
    return ChatTemplate((TEMPLATES / f"{name}.jinja").read_text(), bos_token=bos, eos_token=eos)


# (template, markers the rendered prompt must contain, the text the generation prompt must end with)
FAMILIES = [
    ("Qwen-Qwen2.5-7B-Instruct", ["<|im_start|>system\nYou are a helpful assistant.", "<tool_call>",
                                  "<tool_response>", "get_weather"], "<|im_start|>assistant\n"),
    ("Qwen-Qwen3-0.6B", ["<|im_start|>user\nThanks ✓<|im_end|>", "<tool_call>"], "<|im_start|>assistant\n"),
    ("meta-llama-Llama-3.1-8B-Instruct", ["<|start_header_id|>system<|end_header_id|>", "<|eot_id|>",
                                          "get_weather", "ipython"],
     "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    ("meta-llama-Llama-3.2-3B-Instruct", ["Cutting Knowledge Date", "get_weather"],
     "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    ("NousResearch-Hermes-3-Llama-3.1-8B-tool_use", ["<tools>", "<tool_call>", "get_weather"],
     "<|im_start|>assistant\n"),
    ("mistralai-Mistral-Nemo-Instruct-2407", ["[AVAILABLE_TOOLS]", "[TOOL_CALLS]", "[TOOL_RESULTS]", "[INST]"],
     "[/INST]"),
    ("Mistral-Small-3.2-24B-Instruct-2506", ["[SYSTEM_PROMPT]", "[TOOL_CALLS]", "[INST]"], "[/INST]"),
    ("openai-gpt-oss-120b", ["<|start|>system<|message|>", "Reasoning: high", "functions.get_weather",
                             "<|channel|>"], "<|start|>assistant"),
]


@pytest.mark.parametrize(("name", "markers", "ending"), FAMILIES, ids=[f[0] for f in FAMILIES])
def test_family_renders_tool_conversation(name: str, markers: list[str], ending: str) -> None:
    template = load(name)
    kwargs = {"reasoning_effort": "high"} if "gpt-oss" in name else {}
    messages = CONVERSATION
    if "Mistral" in name:  # Mistral templates want 9-character alphanumeric tool-call ids
        messages = json.loads(json.dumps(CONVERSATION).replace("call_0123456789", "abc123XYZ"))
    text = template.render(messages, tools=[WEATHER_TOOL], add_generation_prompt=True, **kwargs)
    for marker in markers:
        assert marker in text, f"{marker!r} missing from {name}"
    assert text.endswith(ending)
    assert "Thanks ✓" in text


def test_gemma_folds_system_into_first_user_turn_and_rejects_bad_roles() -> None:
    template = load("google-gemma-2-2b-it", bos="<bos>")
    text = template.render(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
         {"role": "user", "content": "Bye"}],
    )
    assert text.startswith("<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello")
    assert text.endswith("<start_of_turn>model\n")
    with pytest.raises(ChatTemplateError, match="System role not supported"):
        template.render([{"role": "system", "content": "x"}, {"role": "user", "content": "y"}])


def test_deepseek_r1_opens_a_think_block_when_thinking_is_enabled() -> None:
    template = load("deepseek-ai-DeepSeek-R1-Distill-Qwen-32B", bos="<｜begin▁of▁sentence｜>")
    messages = [{"role": "user", "content": "2+2?"}]
    assert template.render(messages, enable_thinking=True).endswith("<｜Assistant｜><think>\n")
    assert template.render(messages, enable_thinking=False).endswith("<think>\n</think>")


def test_qwen3_enable_thinking_reaches_the_template() -> None:
    template = load("Qwen-Qwen3-0.6B")
    thinking = template.render([{"role": "user", "content": "hi"}], enable_thinking=True)
    silent = template.render([{"role": "user", "content": "hi"}], enable_thinking=False)
    assert "<think>" not in thinking
    assert silent.endswith("<think>\n\n</think>\n\n")


def test_strftime_now_and_raise_exception_are_available() -> None:
    template = ChatTemplate("{{ strftime_now('%Y') }}{% if messages|length > 1 %}"
                            "{{ raise_exception('only one message, please') }}{% endif %}")
    assert template.render([{"role": "user", "content": "a"}]).isdigit()
    with pytest.raises(ChatTemplateError, match="only one message, please"):
        template.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_sandbox_blocks_attribute_escapes() -> None:
    template = ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(ChatTemplateError):
        template.render([{"role": "user", "content": "a"}])


def test_template_cannot_mutate_inputs() -> None:
    template = ChatTemplate("{% set _ = messages.append({'role': 'user'}) %}ok")
    with pytest.raises(ChatTemplateError):
        template.render([{"role": "user", "content": "a"}])


def test_broken_template_is_a_template_error() -> None:
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate("{% for %}")


def test_tojson_keeps_unicode_and_supports_indent() -> None:
    template = ChatTemplate("{{ tools[0] | tojson(indent=2) }}")
    text = template.render([{"role": "user", "content": "a"}], tools=[{"name": "météo"}])
    assert json.loads(text) == {"name": "météo"} and "météo" in text and "\n  " in text


def test_chatml_fallback() -> None:
    template = ChatTemplate(None)
    assert template.source == CHATML_TEMPLATE and template.is_fallback
    text = template.render([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
