"""Tool calling: the tool registry, grammars that force calls, and the streaming call parsers."""

from __future__ import annotations

import asyncio
import json
import random
import re
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import llama_cpp
import pytest
from lmkube.server.chat.deltas import ChatDelta, ToolCallDelta
from lmkube.server.chat.tool_parsers import ToolCallParser
from lmkube.server.chat.tools import (
    ToolFormat,
    ToolRegistry,
    detect_tool_format,
    mistral_call_id,
    new_call_id,
    rewrite_history_tool_names,
    tool_call_grammar,
)
from lmkube.server.engine.events import TextDelta
from lmkube.server.engine.generation import GenerationEngine
from lmkube.server.engine.llama_lib import ContextConfig, LlamaContext, LlamaModel
from lmkube.server.engine.sampling import SamplingParams
from lmkube.server.runtime.chat_template import ChatTemplate

from lmkube.synthetic_gguf import write_llama_model

TEMPLATES = Path(__file__).parent / "templates"
HERMES, LLAMA3, MISTRAL, GPT_OSS = ToolFormat.HERMES, ToolFormat.LLAMA3, ToolFormat.MISTRAL, ToolFormat.GPT_OSS

# Bounded schemas (maxLength, enums, integers): random-weight models never end an unbounded string.
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["c", "f"]},
        "where": {"$ref": "#/$defs/Point"},
    },
    "required": ["city", "where"],
    "$defs": {"Point": {"type": "object", "properties": {"lat": {"type": "integer"}, "north": {"type": "boolean"}},
                        "required": ["lat", "north"]}},
}
SEARCH = {  # the same $defs name as WEATHER with other content: the grammar must keep them apart
    "type": "object",
    "properties": {"q": {"type": "string", "maxLength": 10}, "k": {"$ref": "#/$defs/Point"}},
    "required": ["q", "k"],
    "additionalProperties": False,
    "$defs": {"Point": {"type": "integer"}},
}
TOOLS = [
    {"type": "function", "function": {"name": "get-weather.now", "description": "Weather now.", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time"}},  # no parameters
    {"type": "function", "function": {"name": "search", "parameters": SEARCH, "strict": True}},
]


@pytest.fixture(scope="module")
def registry() -> ToolRegistry:
    return ToolRegistry(TOOLS)


# -- registry, detection, history -----------------------------------------------------------------


def test_registry_normalizes_names_and_maps_them_back(registry: ToolRegistry) -> None:
    assert registry.names == ["get_weather_now", "get_time", "search"]
    assert registry.caller_name("get_weather_now") == "get-weather.now"
    assert registry.caller_name("get-weather.now") == "get-weather.now"  # models sometimes copy the original
    assert registry.caller_name("nope") is None
    assert registry.model_name("get-weather.now") == "get_weather_now"
    assert registry.model_name("gone-tool") == "gone_tool"  # history may name tools no longer offered
    assert registry.schema("get_time") == {"type": "object", "properties": {}}
    first, second, _ = registry.for_template()
    assert first == {"type": "function", "function": {"name": "get_weather_now", "description": "Weather now.",
                                                      "parameters": WEATHER}}
    assert second["function"]["description"] == ""  # templates concatenate it unconditionally


def test_registry_accepts_flat_tools() -> None:
    flat = ToolRegistry([{"type": "function", "name": "a.b", "parameters": {"type": "object"}},
                         {"name": "c", "input_schema": {"type": "object", "properties": {}}}])
    assert flat.names == ["a_b", "c"]


@pytest.mark.parametrize(("tools", "message"), [
    ({"type": "function"}, "must be a list"),
    ([{"type": "web_search"}], "unsupported tool type 'web_search'"),
    ([{"type": "function", "function": {"description": "x"}}], "non-empty string 'name'"),
    ([{"type": "function", "function": {"name": "a", "parameters": "{}"}}], "'parameters' must be a JSON Schema"),
    ([{"type": "function", "function": {"name": "a-b"}}, {"type": "function", "function": {"name": "a.b"}}],
     "'a.b' and 'a-b' both become 'a_b'"),
    ([{"type": "function", "function": {"name": "a"}}, {"type": "function", "function": {"name": "a"}}],
     "appears twice"),
    (["x"], "tools[0] must be an object"),
])
def test_registry_rejects_bad_tools(tools: object, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        ToolRegistry(tools)  # type: ignore[arg-type]


@pytest.mark.parametrize(("template", "fmt"), [
    ("Qwen-Qwen2.5-7B-Instruct.jinja", HERMES),
    ("Qwen-Qwen3-0.6B.jinja", HERMES),
    ("NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja", HERMES),
    ("meta-llama-Llama-3.1-8B-Instruct.jinja", LLAMA3),
    ("meta-llama-Llama-3.2-3B-Instruct.jinja", LLAMA3),
    ("mistralai-Mistral-Nemo-Instruct-2407.jinja", MISTRAL),
    ("Mistral-Small-3.2-24B-Instruct-2506.jinja", MISTRAL),
    ("openai-gpt-oss-120b.jinja", GPT_OSS),
    ("google-gemma-2-2b-it.jinja", HERMES),
])
def test_detect_tool_format(template: str, fmt: ToolFormat) -> None:
    assert detect_tool_format((TEMPLATES / template).read_text()) is fmt


def test_detect_tool_format_defaults_to_hermes() -> None:
    assert detect_tool_format(None) is HERMES


def test_call_ids() -> None:
    ids = {new_call_id() for _ in range(100)}
    assert len(ids) == 100 and all(i.startswith("call_") and len(i) == 29 and i[5:].isalnum() for i in ids)
    assert mistral_call_id("a1b2c3d4e") == "a1b2c3d4e"
    mapped = mistral_call_id("call_abc")
    assert len(mapped) == 9 and mapped.isalnum() and mapped == mistral_call_id("call_abc")


def history(call_id: str = "call_abc123", arguments: object = '{"city": "Paris"}') -> list[dict]:
    return [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": "get-weather.now", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": call_id, "name": "get-weather.now", "content": "sunny"},
    ]


def test_rewrite_history_tool_names(registry: ToolRegistry) -> None:
    messages = history()
    rewritten = rewrite_history_tool_names(messages, registry)
    call = rewritten[1]["tool_calls"][0]
    assert call["function"] == {"name": "get_weather_now", "arguments": {"city": "Paris"}}
    assert call["id"] == "call_abc123" and rewritten[2]["name"] == "get_weather_now"
    assert messages == history()  # the input is left alone
    mistral = rewrite_history_tool_names(messages, registry, fmt=MISTRAL)
    assert mistral[1]["tool_calls"][0]["id"] == mistral[2]["tool_call_id"] == mistral_call_id("call_abc123")
    odd = rewrite_history_tool_names(history(arguments="not json"), registry)
    assert odd[1]["tool_calls"][0]["function"]["arguments"] == "not json"


ROUND_TRIP = [
    ("Qwen-Qwen2.5-7B-Instruct.jinja", "<|im_end|>"),
    ("Qwen-Qwen3-0.6B.jinja", "<|im_end|>"),
    ("NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja", "<|im_end|>"),
    ("meta-llama-Llama-3.1-8B-Instruct.jinja", "<|eot_id|>"),
    ("meta-llama-Llama-3.2-3B-Instruct.jinja", "<|eot_id|>"),
    ("mistralai-Mistral-Nemo-Instruct-2407.jinja", "</s>"),
    ("Mistral-Small-3.2-24B-Instruct-2506.jinja", "</s>"),
    ("openai-gpt-oss-120b.jinja", None),
]


@pytest.mark.parametrize(("template", "end"), ROUND_TRIP)
def test_template_history_parses_back(registry: ToolRegistry, template: str, end: str | None) -> None:
    """What each real template renders for an assistant tool call is what its format's parser reads."""
    source = (TEMPLATES / template).read_text()
    fmt = detect_tool_format(source)
    chat = ChatTemplate(source, bos_token="<s>", eos_token="</s>")
    messages = rewrite_history_tool_names(history(arguments='{"city": "Paris", "unit": "c"}')[:2], registry, fmt=fmt)
    tools = registry.for_template()
    prompt = chat.render(messages[:1], tools=tools, add_generation_prompt=True)
    full = chat.render(messages, tools=tools, add_generation_prompt=False)
    assert full.startswith(prompt.rstrip()), "the template's history must extend its generation prompt"
    turn = full[len(prompt.rstrip()):]
    if turn.startswith(prompt[len(prompt.rstrip()):]):
        turn = turn[len(prompt) - len(prompt.rstrip()):]
    turn = turn.rstrip()
    if end is not None:
        assert turn.endswith(end)
        turn = turn[: -len(end)]
    content, calls, *_ = run(fmt, registry, turn)
    assert content.replace("<think>\n\n</think>", "").strip() == ""  # Qwen3 writes an empty think block
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get-weather.now", {"city": "Paris", "unit": "c"})]


# -- parsing ----------------------------------------------------------------------------------------


def run(fmt: ToolFormat, registry: ToolRegistry, text: str, sizes: Iterator[int] | None = None):
    """Feeds `text` in chunks (all at once by default); returns content, calls, all deltas, abandoned."""
    parser = ToolCallParser(fmt, registry)
    deltas: list[ChatDelta] = []
    pos = 0
    while pos < len(text):
        size = len(text) if sizes is None else next(sizes)
        deltas.append(parser.feed(text[pos : pos + size]))
        pos += size
    deltas.append(parser.finish())
    return "".join(d.content for d in deltas), parser.calls, [t for d in deltas for t in d.tool_calls], parser.abandoned


def ones() -> Iterator[int]:
    while True:
        yield 1


def random_sizes(seed: int) -> Iterator[int]:
    rng = random.Random(seed)
    while True:
        yield rng.randint(1, 7)


PARIS = {"city": "Paris", "unit": "c"}
WEATHER_CALL = '{"name": "get_weather_now", "arguments": {"city": "Paris", "unit": "c"}}'
NEMO_ITEM = '{"name": "get_weather_now", "arguments": {"city": "Paris", "unit": "c"}, "id": "a1b2c3d4e"}'
HARMONY = (
    "<|channel|>commentary to=functions.get_weather_now <|constrain|>json<|message|>"
    '{"city": "Paris", "unit": "c"}'
)
TIME_CALL = '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
# name: (format, generated text, expected content, expected calls)
CASES = {
    "hermes-single": (HERMES, f"<tool_call>\n{WEATHER_CALL}\n</tool_call>", "", [("get-weather.now", PARIS)]),
    "hermes-parallel": (
        HERMES,
        f'{TIME_CALL}\n<tool_call>\n{{"name": "search", "arguments": {{"q": "a", "k": 2}}}}\n</tool_call>',
        "",
        [("get_time", {}), ("search", {"q": "a", "k": 2})],
    ),
    "hermes-content-around": (HERMES, f"Let me check.\n{TIME_CALL}\nDone.", "Let me check.\n\nDone.",
                              [("get_time", {})]),
    "hermes-tricky-strings": (
        HERMES,
        '<tool_call>{"arguments": {"q": "} \\" </tool_call> {", "k": -1.5e3}, "name": "search"}</tool_call>',
        "",
        [("search", {"q": '} " </tool_call> {', "k": -1500.0})],
    ),
    "hermes-arguments-as-string": (
        HERMES,
        '<tool_call>{"name": "search", "arguments": "{\\"q\\": \\"x\\", \\"k\\": 2}"}</tool_call>',
        "",
        [("search", {"q": "x", "k": 2})],
    ),
    "hermes-caller-name-no-arguments": (HERMES, '<tool_call>{"name": "get-weather.now"}</tool_call>', "",
                                        [("get-weather.now", {})]),
    "hermes-no-closing-tag": (HERMES, '<tool_call>{"name": "get_time", "arguments": {}}', "", [("get_time", {})]),
    "llama3-bare": (LLAMA3, ' {"name": "get_weather_now", "parameters": {"city": "Paris", "unit": "c"}}', "",
                    [("get-weather.now", PARIS)]),
    "llama3-type-and-arguments": (LLAMA3, '{"type": "function", "name": "get_time", "arguments": {}}', "",
                                  [("get_time", {})]),
    "llama3-openai-shape": (LLAMA3, '{"type": "function", "function": {"name": "get_time", "parameters": {}}}', "",
                            [("get_time", {})]),
    "llama3-python-tag": (LLAMA3, 'Searching.<|python_tag|>{"name": "search", "parameters": {"q": "x", "k": 3}}',
                          "Searching.", [("search", {"q": "x", "k": 3})]),
    "llama3-parallel": (
        LLAMA3,
        '{"name": "get_time", "parameters": {}};\n{"name": "search", "parameters": {"q": "", "k": 0}}',
        "",
        [("get_time", {}), ("search", {"q": "", "k": 0})],
    ),
    "llama3-json-answer": (LLAMA3, '{"answer": 42, "name": "get_time"}', '{"answer": 42, "name": "get_time"}', []),
    "llama3-json-later": (LLAMA3, 'Use {"name": "get_time"}', 'Use {"name": "get_time"}', []),
    "mistral-nemo": (MISTRAL, f"[TOOL_CALLS][{NEMO_ITEM}]", "", [("get-weather.now", PARIS)]),
    "mistral-nemo-parallel": (MISTRAL, f'[TOOL_CALLS] [{NEMO_ITEM}, {{"name": "get_time", "arguments": {{}}}}]', "",
                              [("get-weather.now", PARIS), ("get_time", {})]),
    "mistral-small": (MISTRAL, 'On it.[TOOL_CALLS]get_weather_now[ARGS]{"city": "Paris", "unit": "c"}', "On it.",
                      [("get-weather.now", PARIS)]),
    "mistral-small-parallel": (
        MISTRAL,
        '[TOOL_CALLS]get_weather_now[CALL_ID]a1b2c3d4e[ARGS]{"city": "Paris", "unit": "c"}[TOOL_CALLS]get_time[ARGS]{}',
        "",
        [("get-weather.now", PARIS), ("get_time", {})],
    ),
    "gpt-oss": (GPT_OSS, HARMONY, "", [("get-weather.now", PARIS)]),
    "gpt-oss-call-token": (GPT_OSS, HARMONY + "<|call|>", "", [("get-weather.now", PARIS)]),
    "gpt-oss-after-analysis": (
        GPT_OSS,
        "<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant" + HARMONY,
        "<|channel|>analysis<|message|>Need the weather.<|end|>",
        [("get-weather.now", PARIS)],
    ),
    "gpt-oss-recipient-first": (GPT_OSS, " to=functions.get_time<|channel|>commentary json<|message|>{}<|call|>", "",
                                [("get_time", {})]),
    "gpt-oss-final": (GPT_OSS, "<|channel|>final<|message|>Sunny, go to=the park.",
                      "<|channel|>final<|message|>Sunny, go to=the park.", []),
}


def stream_shape(deltas: list[ToolCallDelta]) -> dict[int, str]:
    """Checks OpenAI's streaming shape and returns each call's concatenated argument text."""
    arguments: dict[int, str] = {}
    for delta in deltas:
        if delta.index not in arguments:
            assert delta.id and delta.name and delta.arguments == "", "a call opens with its id and name"
            assert delta.index == len(arguments), "calls are numbered in order"
            arguments[delta.index] = ""
        else:
            assert delta.id is None and delta.name is None
            arguments[delta.index] += delta.arguments
    return arguments


@pytest.mark.parametrize("case", CASES)
def test_parse_real_formats(registry: ToolRegistry, case: str) -> None:
    fmt, text, content, expected = CASES[case]
    got_content, calls, deltas, abandoned = run(fmt, registry, text)
    assert got_content == content and abandoned == []
    assert [(c.name, json.loads(c.arguments)) for c in calls] == expected
    assert all(c.arguments == json.dumps(json.loads(c.arguments), separators=(",", ":")) for c in calls)
    streamed = stream_shape(deltas)
    assert [d.id for d in deltas if d.id] == [c.id for c in calls]
    assert [json.loads(a) for a in streamed.values()] == [json.loads(c.arguments) for c in calls]


@pytest.mark.parametrize("case", CASES)
def test_streaming_matches_one_shot(registry: ToolRegistry, case: str) -> None:
    fmt, text, content, expected = CASES[case]
    _, _, whole, _ = run(fmt, registry, text)
    for sizes in (ones(), random_sizes(1), random_sizes(2)):
        got_content, calls, deltas, abandoned = run(fmt, registry, text, sizes)
        assert got_content == content and abandoned == []
        assert [(c.name, json.loads(c.arguments)) for c in calls] == expected
        assert stream_shape(deltas) == stream_shape(whole), "the same argument text, however it is chunked"


def test_arguments_stream_as_they_arrive(registry: ToolRegistry) -> None:
    parser = ToolCallParser(HERMES, registry)
    head = '<tool_call>\n{"name": "search", "arguments": {"q": "hel'
    assert parser.feed("<tool_") == ChatDelta()  # could be a marker: held back
    first = parser.feed(head[6:])
    assert [(d.index, d.name, d.arguments) for d in first.tool_calls] == [(0, "search", ""), (0, None, '{"q": "hel')]
    assert parser.feed('lo", "k"').tool_calls == [ToolCallDelta(0, arguments='lo", "k"')]
    last = parser.feed(": 1}}\n</tool_call>")
    assert last.tool_calls == [ToolCallDelta(0, arguments=": 1}")] and not parser.finish()
    assert [(c.name, c.arguments) for c in parser.calls] == [("search", '{"q":"hello","k":1}')]


def test_split_marker_is_held_back_then_released(registry: ToolRegistry) -> None:
    parser = ToolCallParser(MISTRAL, registry)
    assert parser.feed("Hi [TOOL").content == "Hi "
    assert parser.feed("BOX]").content == "[TOOLBOX]"
    assert parser.finish() == ChatDelta()


BROKEN = {  # (format, text): none of these is a call
    "hermes-bad-json": (HERMES, '<tool_call>{"name": "get_time", "arguments": {"a": }}</tool_call>'),
    "hermes-unknown-tool": (HERMES, '<tool_call>{"name": "launch", "arguments": {}}</tool_call> ok'),
    "hermes-not-json": (HERMES, "<tool_call>launch()</tool_call>"),
    "hermes-arguments-not-object": (HERMES, '<tool_call>{"name": "get_time", "arguments": [1]}</tool_call>'),
    "hermes-unterminated": (HERMES, '<tool_call>{"name": "search", "arguments": {"q": "unfinish'),
    "hermes-marker-only": (HERMES, "text <tool_call>"),
    "llama3-bad-json": (LLAMA3, '{"name": "get_time", "parameters": {]}'),
    "llama3-unknown-tool": (LLAMA3, '{"name": "launch", "parameters": {}}'),
    "llama3-unterminated": (LLAMA3, '<|python_tag|>{"name": "search", "parameters": {"q"'),
    "mistral-bad-json": (MISTRAL, '[TOOL_CALLS]get_time[ARGS]{"a": tru}'),
    "mistral-unknown-tool": (MISTRAL, '[TOOL_CALLS][{"name": "launch", "arguments": {}}]'),
    "mistral-unterminated": (MISTRAL, '[TOOL_CALLS]search[ARGS]{"q": "x", "k": 1'),
    "mistral-no-args-marker": (MISTRAL, "[TOOL_CALLS] is how I call tools."),
    "gpt-oss-bad-json": (GPT_OSS, "<|channel|>commentary to=functions.get_time <|constrain|>json<|message|>{'a': 1}"),
    "gpt-oss-unknown-tool": (GPT_OSS, "<|channel|>commentary to=functions.launch <|constrain|>json<|message|>{}"),
    "gpt-oss-unterminated": (GPT_OSS, '<|channel|>commentary to=functions.search json<|message|>{"q": "x"'),
}


@pytest.mark.parametrize("case", BROKEN)
def test_malformed_calls_come_back_as_content(registry: ToolRegistry, case: str) -> None:
    fmt, text = BROKEN[case]
    for sizes in (None, ones(), random_sizes(3)):
        content, calls, deltas, abandoned = run(fmt, registry, text, sizes)
        assert (content, calls) == (text, [])
        # Only a call cut off at the end can have been announced (at the end of a chunk) before it broke.
        assert sorted({d.index for d in deltas}) == abandoned, "announced calls that broke are reported"
        assert abandoned == [] or "unterminated" in case or sizes is not None


def test_calls_before_a_malformed_one_stand(registry: ToolRegistry) -> None:
    text = '[TOOL_CALLS][{"name": "get_time", "arguments": {}}, {"name": "launch", "arguments": {}}]'
    content, calls, *_ = run(MISTRAL, registry, text)
    assert [c.name for c in calls] == ["get_time"]
    assert content == ', {"name": "launch", "arguments": {}}]'


# -- grammars ---------------------------------------------------------------------------------------

SPECIALS = ("<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>", "<|python_tag|>", "[TOOL_CALLS]", "[ARGS]",
            "[CALL_ID]", "<|start|>", "<|channel|>", "<|message|>", "<|constrain|>", "<|call|>")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaModel]:
    path = write_llama_model(tmp_path_factory.mktemp("tools") / "tools.gguf", seed=7, extra_special_tokens=SPECIALS)
    model = LlamaModel(path)
    yield model
    model.close()


GRAMMAR_VARIANTS = [{}, {"parallel": False}, {"only": "get-weather.now"}, {"only": "get_time"}, {"reasoning": True}]


@pytest.mark.parametrize("fmt", list(ToolFormat))
def test_grammars_compile_in_llama_cpp(registry: ToolRegistry, model: LlamaModel, fmt: ToolFormat) -> None:
    for variant in GRAMMAR_VARIANTS:
        grammar = tool_call_grammar(fmt, registry, **variant)  # type: ignore[arg-type]
        sampler = llama_cpp.llama_sampler_init_grammar(model.vocab, grammar.encode(), b"root")
        assert sampler, f"llama.cpp rejected the {fmt} grammar {variant}:\n{grammar}"
        llama_cpp.llama_sampler_free(sampler)


def test_grammar_survives_schemas_the_converter_cannot_express(model: LlamaModel) -> None:
    odd = ToolRegistry([{"type": "function", "function": {"name": "odd", "parameters": {"not": {"type": "string"}}}},
                        {"type": "function", "function": {"name": "ref", "parameters": {"$ref": "https://x/y"}}}])
    sampler = llama_cpp.llama_sampler_init_grammar(model.vocab, tool_call_grammar(HERMES, odd).encode(), b"root")
    assert sampler
    llama_cpp.llama_sampler_free(sampler)


def test_grammar_rejects_unknown_named_tool(registry: ToolRegistry) -> None:
    with pytest.raises(ValueError, match="'launch'"):
        tool_call_grammar(HERMES, registry, only="launch")
    with pytest.raises(ValueError, match="at least one tool"):
        tool_call_grammar(HERMES, ToolRegistry([]))


@pytest.fixture(scope="module")
def engine(model: LlamaModel) -> Iterator[GenerationEngine]:
    engine = GenerationEngine(model, LlamaContext(model, ContextConfig(n_ctx=2048, n_seq_max=1, n_threads=2)))
    yield engine
    engine.close()


def generate(engine: GenerationEngine, grammar: str) -> str:
    async def collect() -> str:
        prompt = engine.model.tokenize("<|im_start|>user\nWhat is the weather?<|im_end|>\n<|im_start|>assistant\n")
        params = SamplingParams(temperature=0, grammar=grammar, max_tokens=1500, render_special=True)
        text, finish = [], None
        async for events in engine.submit(prompt, params):
            for event in events:
                if isinstance(event, TextDelta):
                    text.append(event.text)
                else:
                    finish = event
        assert finish is not None and finish.reason == "stop", f"the grammar did not end: {finish}"
        return "".join(text)

    return asyncio.run(collect())


@pytest.mark.parametrize("fmt", list(ToolFormat))
@pytest.mark.parametrize("variant", [{}, {"parallel": False}, {"only": "search"}])
def test_forced_generation_parses_to_valid_calls(
    registry: ToolRegistry, engine: GenerationEngine, fmt: ToolFormat, variant: dict
) -> None:
    """Greedy decoding of a random-weight model under each `required` grammar yields valid calls."""
    text = generate(engine, tool_call_grammar(fmt, registry, **variant))
    content, calls, *_ = run(fmt, registry, text)
    assert calls, f"no call parsed from {text!r}"
    assert content == ""
    if variant or fmt is GPT_OSS:
        assert len(calls) == 1
    for call in calls:
        model_name = registry.model_name(call.name)
        jsonschema.validate(json.loads(call.arguments), registry.schema(model_name))
        if "only" in variant:
            assert call.name == variant["only"]


def test_tool_choice_header_forces_the_users_turn_and_lets_the_tool_results_turn_end_the_loop() -> None:
    from lmkube.server.chat.session import ChatSpec, with_header_tool_choice

    tools = [{"type": "function", "function": {"name": "Bash", "parameters": {"type": "object"}}}]
    user = [{"role": "user", "content": "run it"}]
    after_result = [*user, {"role": "assistant", "content": None, "tool_calls": [{"id": "c1"}]},
                    {"role": "tool", "tool_call_id": "c1", "content": "ok"}]
    named = {"type": "function", "function": {"name": "Bash"}}
    assert with_header_tool_choice(ChatSpec(user, tools), "Bash").tool_choice == named
    assert with_header_tool_choice(ChatSpec(user, tools), "required").tool_choice == "required"
    assert with_header_tool_choice(ChatSpec(after_result, tools), "Bash").tool_choice == "none"
    assert with_header_tool_choice(ChatSpec(after_result, tools), "required").tool_choice == "none"
    assert with_header_tool_choice(ChatSpec(after_result, tools), "auto").tool_choice is None
    # The request's own choice wins, and without tools there is nothing to force.
    assert with_header_tool_choice(ChatSpec(user, tools, tool_choice="none"), "Bash").tool_choice == "none"
    assert with_header_tool_choice(ChatSpec(user, None), "Bash").tool_choice is None
