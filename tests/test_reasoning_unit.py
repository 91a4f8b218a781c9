"""Reasoning/content splitting on real output formats, fed whole, char by char and in random pieces."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from lmkube.server.chat.reasoning import (
    ReasoningSplitter,
    ReasoningStyle,
    detect_reasoning_style,
    prompt_opens_reasoning,
    template_kwargs_for_effort,
)
from lmkube.server.errors import APIError
from lmkube.server.runtime.chat_template import ChatTemplate

TEMPLATES = Path(__file__).parent / "templates"
THINK, HARMONY = ReasoningStyle.THINK_TAGS, ReasoningStyle.HARMONY
GPT_OSS_TOOL_CALL = (
    "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"
    '<|message|>{"city":"Paris"}<|call|>'
)


def template(name: str) -> str:
    return (TEMPLATES / f"{name}.jinja").read_text()


def chunkings(text: str) -> list[list[str]]:
    rng = random.Random(len(text))
    pieces = []
    i = 0
    while i < len(text):
        n = rng.randint(1, 5)
        pieces.append(text[i : i + n])
        i += n
    return [[text], list(text), pieces]


def split(style: ReasoningStyle | None, text: str, *, starts_in_reasoning: bool = False) -> tuple[str, str]:
    """(reasoning, content); asserts every way of feeding the text gives the same answer."""
    results = set()
    for pieces in chunkings(text):
        splitter = ReasoningSplitter(style, starts_in_reasoning=starts_in_reasoning)
        deltas = [splitter.feed(p) for p in pieces] + [splitter.finish()]
        assert all(not d.tool_calls for d in deltas)
        results.add(("".join(d.reasoning for d in deltas), "".join(d.content for d in deltas)))
    assert len(results) == 1, results
    return results.pop()


@pytest.mark.parametrize(
    ("name", "style"),
    [
        ("Qwen-Qwen3-0.6B", THINK),
        ("deepseek-ai-DeepSeek-R1-Distill-Qwen-32B", THINK),
        ("openai-gpt-oss-120b", HARMONY),
        ("Qwen-Qwen2.5-7B-Instruct", None),
        ("meta-llama-Llama-3.1-8B-Instruct", None),
        ("Mistral-Small-3.2-24B-Instruct-2506", None),
        ("google-gemma-2-2b-it", None),
        ("NousResearch-Hermes-3-Llama-3.1-8B-tool_use", None),
    ],
)
def test_detects_style_of_real_templates(name: str, style: ReasoningStyle | None) -> None:
    assert detect_reasoning_style(template(name)) is style


def test_detects_other_tag_pairs_and_nothing() -> None:
    assert detect_reasoning_style("{{ '<seed:think>' }}") is THINK
    assert detect_reasoning_style("{{ '[THINK]' }}") is THINK
    assert detect_reasoning_style(None) is None
    assert detect_reasoning_style("") is None


def render(name: str, effort: str | None = None, bos: str = "") -> str:
    messages = [{"role": "user", "content": "Hi"}]
    return ChatTemplate(template(name), bos_token=bos).render(messages, **template_kwargs_for_effort(effort))


def test_prompt_opens_reasoning_for_real_templates() -> None:
    deepseek = "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B"
    assert render(deepseek).endswith("<think>\n")
    assert prompt_opens_reasoning(render(deepseek), THINK)
    assert not prompt_opens_reasoning(render(deepseek, "none"), THINK)  # the template closes the block
    assert not prompt_opens_reasoning(render("Qwen-Qwen3-0.6B"), THINK)  # the model opens it itself
    assert render("Qwen-Qwen3-0.6B", "off").endswith("<think>\n\n</think>\n\n")
    assert not prompt_opens_reasoning(render("Qwen-Qwen3-0.6B", "off"), THINK)
    assert not prompt_opens_reasoning(render("openai-gpt-oss-120b"), HARMONY)
    assert "Reasoning: high" in render("openai-gpt-oss-120b", "high")


def test_prompt_opens_reasoning_only_at_the_end() -> None:
    assert prompt_opens_reasoning("<|im_start|>assistant\n<think>\n", None)
    assert prompt_opens_reasoning("x<seed:think>", THINK)
    assert not prompt_opens_reasoning("x<seed:think>", None)
    # A user quoting the tag earlier in the prompt does not open anything.
    assert not prompt_opens_reasoning("user: what is <think>?\n<|im_start|>assistant\n", THINK)
    assert prompt_opens_reasoning("<|start|>assistant<|channel|>analysis<|message|>", HARMONY)
    assert not prompt_opens_reasoning("<|start|>assistant", HARMONY)


def test_qwen3_output() -> None:
    text = "<think>\nThe user greets me.\n\nI should greet back.\n</think>\n\nHello! How can I help?"
    assert split(THINK, text) == ("The user greets me.\n\nI should greet back.", "Hello! How can I help?")


def test_tags_split_across_pieces() -> None:
    splitter = ReasoningSplitter(THINK)
    out = [splitter.feed(p) for p in ["<th", "ink>ab", "c</th", "ink", ">", "done"]] + [splitter.finish()]
    assert [(d.reasoning, d.content) for d in out] == [("", ""), ("ab", ""), ("c", ""), ("", ""), ("", ""),
                                                       ("", "done"), ("", "")]


def test_no_partial_tag_is_ever_given_out() -> None:
    splitter = ReasoningSplitter(THINK)
    for ch in "<think>reasoning</think>answer":
        delta = splitter.feed(ch)
        assert "<" not in delta.reasoning + delta.content


def test_unclosed_think_is_all_reasoning() -> None:
    assert split(THINK, "<think>\nStill going, cut off by max_tokens ") == ("Still going, cut off by max_tokens", "")
    assert split(THINK, "<think>half a tag </thi") == ("half a tag </thi", "")


def test_starts_in_reasoning() -> None:
    text = "Okay, 2+2.\nThat is 4.\n</think>\n\nThe answer is 4."
    assert split(THINK, text, starts_in_reasoning=True) == ("Okay, 2+2.\nThat is 4.", "The answer is 4.")
    assert split(THINK, "no end yet", starts_in_reasoning=True) == ("no end yet", "")
    assert split(THINK, "</think>\n\nDirect.", starts_in_reasoning=True) == ("", "Direct.")
    # A model that repeats the opening tag the prompt already wrote.
    assert split(THINK, "<think>\nhm</think>ok", starts_in_reasoning=True) == ("hm", "ok")


def test_tags_after_the_start_are_content() -> None:
    text = "Use <think> tags like <think>this</think>."
    assert split(THINK, text) == ("", text)
    assert split(THINK, "<thinking> is not a tag") == ("", "<thinking> is not a tag")
    assert split(THINK, "<b>bold</b>") == ("", "<b>bold</b>")


def test_other_tag_pairs() -> None:
    assert split(THINK, "<seed:think>plan</seed:think>go") == ("plan", "go")
    assert split(THINK, "[THINK]plan[/THINK]go") == ("plan", "go")
    # Only the closing tag that matches the opening one ends the block.
    assert split(THINK, "<think>a [/THINK] b</think>c") == ("a [/THINK] b", "c")


def test_no_style() -> None:
    assert split(None, "Just an answer.") == ("", "Just an answer.")
    assert split(None, "\n\n  Leading space kept.") == ("", "\n\n  Leading space kept.")
    assert split(None, "") == ("", "")
    # A plain leading <think> block is still split (LM Studio parses it for every model) ...
    assert split(None, "<think>hidden</think>shown") == ("hidden", "shown")
    # ... but no other tag pair.
    assert split(None, "[THINK]x[/THINK]y") == ("", "[THINK]x[/THINK]y")


def test_harmony_analysis_and_final() -> None:
    text = (
        "<|channel|>analysis<|message|>User says hi. Respond friendly.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>Hello! How can I help you today?"
    )
    expected = ("User says hi. Respond friendly.", "Hello! How can I help you today?")
    assert split(HARMONY, text) == expected
    # <|return|> is end-of-generation, but if rendered it is not content either.
    assert split(HARMONY, text + "<|return|>") == expected


def test_harmony_without_rendered_end_markers() -> None:
    # llama.cpp renders gpt-oss's <|channel|>/<|message|>/<|start|> as user-defined tokens even when
    # control tokens are not rendered, while <|end|> stays a control token: a body then ends at <|start|>.
    text = "<|channel|>analysis<|message|>Think.<|start|>assistant<|channel|>final<|message|>Answer."
    assert split(HARMONY, text) == ("Think.", "Answer.")


def test_harmony_markers_never_leak() -> None:
    text = "<|channel|>analysis<|message|>a<|end|><|start|>assistant<|channel|>final<|message|>b"
    splitter = ReasoningSplitter(HARMONY)
    for ch in text:
        delta = splitter.feed(ch)
        assert "<" not in delta.reasoning + delta.content and "|" not in delta.reasoning + delta.content


def test_harmony_tool_call_passes_through() -> None:
    text = "<|channel|>analysis<|message|>Need the weather tool.<|end|>" + GPT_OSS_TOOL_CALL
    assert split(HARMONY, text) == ("Need the weather tool.", GPT_OSS_TOOL_CALL)
    # As the first message (the prompt wrote `<|start|>assistant`), recipient before the channel, no <|call|>.
    first = ' to=functions.lookup<|channel|>commentary json<|message|>{"q": "x"}'
    assert split(HARMONY, first) == ("", first)


def test_harmony_preamble_and_starts_in_reasoning() -> None:
    text = "<|channel|>commentary<|message|>Checking that for you.<|end|>" + GPT_OSS_TOOL_CALL
    assert split(HARMONY, text) == ("", "Checking that for you." + GPT_OSS_TOOL_CALL)
    text = "thinking on<|end|><|start|>assistant<|channel|>final<|message|>Done."
    assert split(HARMONY, text, starts_in_reasoning=True) == ("thinking on", "Done.")


def test_harmony_unformatted_or_cut_off_output() -> None:
    assert split(HARMONY, "Plain text from a model ignoring the format.") == (
        "", "Plain text from a model ignoring the format.")
    assert split(HARMONY, "<|channel|>analysis<|message|>cut off") == ("cut off", "")
    assert split(HARMONY, "<|channel|>analysis<|message|>x<|end|><|start|>assistant<|channel|>fin") == ("x", "")


def test_template_kwargs_for_effort() -> None:
    assert template_kwargs_for_effort(None) == {"enable_thinking": True}
    assert template_kwargs_for_effort("on") == {"enable_thinking": True}
    assert template_kwargs_for_effort("High") == {"enable_thinking": True, "reasoning_effort": "high"}
    for off in ("none", "off", "minimal"):
        assert template_kwargs_for_effort(off) == {"enable_thinking": False, "reasoning_effort": "low"}


@pytest.mark.parametrize("value", ["extreme", "", 3, ["low"]])
def test_template_kwargs_for_bad_effort(value: object) -> None:
    with pytest.raises(APIError) as caught:
        template_kwargs_for_effort(value, param="reasoning.effort")
    assert caught.value.status == 400
    assert caught.value.param == "reasoning.effort"
    assert "'reasoning.effort'" in caught.value.message


FUZZ_PIECES = [
    "<think>", "</think>", "<th", "ink>", "</", "\n", " ", "abc", "[THINK]", "[/THINK]", "<", "|", ">",
    "<|channel|>", "analysis", "final", "commentary", " to=functions.f", "<|constrain|>json", "<|message|>",
    "<|end|>", "<|start|>", "assistant", "<|call|>", "<|return|>",
]  # fmt: skip


@pytest.mark.parametrize("style", [None, THINK, HARMONY])
@pytest.mark.parametrize("starts_in_reasoning", [False, True])
def test_fuzz_any_feeding_gives_the_same_split(style: ReasoningStyle | None, starts_in_reasoning: bool) -> None:
    rng = random.Random(f"{style}-{starts_in_reasoning}")
    for _ in range(300):
        text = "".join(rng.choice(FUZZ_PIECES) for _ in range(rng.randint(0, 14)))
        reasoning, content = split(style, text, starts_in_reasoning=starts_in_reasoning)  # same for all feedings
        assert len(reasoning) + len(content) <= len(text)  # nothing invented
        if style is HARMONY:
            assert not any(m in reasoning for m in ("<|end|>", "<|start|>", "<|channel|>", "<|call|>")), text
