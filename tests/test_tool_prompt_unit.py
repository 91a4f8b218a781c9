"""What the chat layer writes into the prompt when a template leaves tools, tool history or late system
messages out (server/chat/tool_prompt.py), on real templates."""

from __future__ import annotations

from pathlib import Path

import pytest
from lmkube.server.chat.tool_prompt import fold_late_system, inline_tool_history, template_polyfills
from lmkube.server.chat.tools import ToolFormat, detect_tool_format
from lmkube.server.runtime.chat_template import CHATML_TEMPLATE, ChatTemplate, ChatTemplateError

TEMPLATES = Path(__file__).parent / "templates"
# SmolLM2-135M-Instruct's own template (from its GGUF): ChatML with a default system prompt, no tools.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
COMMAND = {"type": "object", "properties": {"command": {"type": "string"}}}
BASH = {"type": "function", "function": {"name": "Bash", "description": "Run a shell command", "parameters": COMMAND}}
HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "List files"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "Bash", "arguments": '{"command": "ls"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "a.txt"},
    {"role": "tool", "tool_call_id": "call_2", "content": "b.txt"},
]


def template(name: str) -> ChatTemplate:
    return ChatTemplate((TEMPLATES / f"{name}.jinja").read_text(), bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("source", [None, CHATML_TEMPLATE, SMOLLM2_TEMPLATE])
def test_templates_without_tool_support_are_detected(source: str | None) -> None:
    chat = ChatTemplate(source)
    assert not chat.renders_tools and not chat.renders_tool_calls
    assert chat.renders_tool_results  # ChatML writes a `tool` turn like any other


@pytest.mark.parametrize("name", ["Qwen-Qwen2.5-7B-Instruct", "meta-llama-Llama-3.1-8B-Instruct",
                                  "NousResearch-Hermes-3-Llama-3.1-8B-tool_use"])
def test_templates_with_tool_support_are_left_alone(name: str) -> None:
    chat = template(name)
    assert chat.renders_tools and chat.renders_tool_calls and chat.renders_tool_results
    messages = [dict(m) for m in HISTORY]
    assert template_polyfills(chat, messages, [BASH], detect_tool_format(chat.source)) == messages


def test_tool_section_call_format_and_history_are_written_for_a_template_that_ignores_them() -> None:
    chat = ChatTemplate(SMOLLM2_TEMPLATE)
    fmt = detect_tool_format(chat.source)
    assert fmt is ToolFormat.HERMES
    messages = template_polyfills(chat, [dict(m) for m in HISTORY], [BASH], fmt)
    prompt = chat.render(messages)
    system = messages[0]["content"]
    assert system.startswith("Be brief.\n\n# Tools") and '"name": "Bash"' in system
    assert '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>' in system
    assert '<tool_call>\n{"name": "Bash", "arguments": {"command": "ls"}}\n</tool_call>' in prompt
    assert "a.txt" in prompt and "b.txt" in prompt
    # Without a system message, the section becomes one (in place of the template's default prompt).
    bare = template_polyfills(chat, [{"role": "user", "content": "hi"}], [BASH], fmt)
    assert bare[0]["role"] == "system" and bare[0]["content"].startswith("# Tools")
    assert "named SmolLM" not in chat.render(bare)


def test_tool_results_become_one_user_turn_where_the_template_drops_them() -> None:
    messages = inline_tool_history([dict(m) for m in HISTORY], ToolFormat.HERMES, calls=True, results=True)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[3]["content"] == \
        "<tool_response>\na.txt\n</tool_response>\n<tool_response>\nb.txt\n</tool_response>"
    assert "tool_calls" not in messages[2]


@pytest.mark.parametrize(("fmt", "call"), [
    (ToolFormat.LLAMA3, '{"name": "Bash", "parameters": {"command": "ls"}}'),
    (ToolFormat.MISTRAL, '[TOOL_CALLS][{"name": "Bash", "arguments": {"command": "ls"}}]'),
])
def test_past_calls_use_the_format_the_parser_reads(fmt: ToolFormat, call: str) -> None:
    messages = inline_tool_history([dict(m) for m in HISTORY[:3]], fmt, calls=True, results=False)
    assert messages[2]["content"] == call


def test_late_system_messages_fold_into_the_next_user_turn() -> None:
    late = [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
            {"role": "assistant", "content": "A"}, {"role": "system", "content": "Env"},
            {"role": "user", "content": "U2"}, {"role": "system", "content": "Tail"}]
    assert fold_late_system(late) == [
        {"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
        {"role": "assistant", "content": "A"}, {"role": "user", "content": "Env\n\nU2\n\nTail"}]
    mistral = template("mistralai-Mistral-Nemo-Instruct-2407")
    with pytest.raises(ChatTemplateError):
        mistral.render(late)
    assert "Env\n\nU2\n\nTail" in mistral.render(fold_late_system(late))
