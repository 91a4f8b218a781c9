"""response_format → GBNF: the 400s, llama.cpp's acceptance, and greedy generations that validate."""

from __future__ import annotations

import asyncio
import copy
import json
import re
from collections.abc import Iterator
from typing import Any

import jsonschema
import llama_cpp
import pytest
from lmkube.server.chat.structured import (
    MAX_REPETITION,
    TYPE_MESSAGE,
    check_grammar,
    integer_range_gbnf,
    json_schema_of,
    response_format_grammar,
)
from lmkube.server.engine.events import Finish, TextDelta
from lmkube.server.engine.generation import GenerationEngine
from lmkube.server.engine.llama_lib import ContextConfig, LlamaContext, LlamaModel
from lmkube.server.engine.sampling import SamplingParams
from lmkube.server.errors import APIError

from lmkube.synthetic_gguf import write_llama_model

PROMPT = "<|im_start|>user\nReply in JSON.<|im_end|>\n<|im_start|>assistant\n"


def rf(schema: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "out", "strict": True, "schema": schema}}


# Bounded schemas: a random-weight model must finish each of them well within max_tokens.
SCHEMAS: dict[str, dict[str, Any]] = {
    "scalars": {
        "type": "object",
        "properties": {
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "ok": {"type": "boolean"},
            "color": {"enum": ["red", "green", "blue"]},
            "nothing": {"type": "null"},
        },
        "required": ["age", "ok", "color", "nothing"],
        "additionalProperties": False,
    },
    "short_strings": {
        "type": "object",
        "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 12}, "code": {"const": "X-1"}},
        "required": ["name", "code"],
    },
    "bounded_array": {
        "type": "array",
        "items": {"type": "integer", "minimum": -5, "exclusiveMaximum": 6},
        "minItems": 1,
        "maxItems": 4,
    },
    "nested_refs": {
        "$defs": {
            "point": {
                "type": "object",
                "properties": {"x": {"type": "integer"}, "y": {"type": "number"}},
                "required": ["x", "y"],
            }
        },
        "type": "object",
        "properties": {
            "a": {"$ref": "#/$defs/point"},
            "b": {"$ref": "#/$defs/point"},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
            "meta": {"type": "object", "properties": {"when": {"type": "string", "format": "date"}}},
        },
        "required": ["a", "b", "tags", "meta"],
    },
    "one_of": {
        "oneOf": [
            {
                "type": "object",
                "properties": {"kind": {"const": "circle"}, "r": {"type": "integer", "exclusiveMinimum": 0,
                                                                  "maximum": 99}},
                "required": ["kind", "r"],
            },
            {
                "type": "object",
                "properties": {"kind": {"const": "square"}, "side": {"type": "integer", "minimum": 1,
                                                                     "maximum": 9}},
                "required": ["kind", "side"],
            },
        ]
    },
    "nullable": {
        "type": "object",
        "properties": {"v": {"anyOf": [{"type": "number"}, {"type": "null"}]}, "n": {"type": ["integer", "null"]}},
        "required": ["v", "n"],
    },
}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaModel]:
    path = write_llama_model(tmp_path_factory.mktemp("structured") / "tiny.gguf", seed=7)
    loaded = LlamaModel(path)
    yield loaded
    loaded.close()


@pytest.fixture(scope="module")
def engine(model: LlamaModel) -> Iterator[GenerationEngine]:
    context = LlamaContext(model, ContextConfig(n_ctx=1024, n_seq_max=1, n_threads=1))
    running = GenerationEngine(model, context, name="structured-test")
    yield running
    running.close()


def generate(engine: GenerationEngine, prompt: str, grammar: str, max_tokens: int = 256) -> tuple[str, Finish]:
    async def run() -> tuple[str, Finish]:
        tokens = engine.model.tokenize(prompt)
        request = engine.submit(tokens, SamplingParams(temperature=0.0, max_tokens=max_tokens, grammar=grammar))
        text, finish = "", None
        async for events in request:
            for event in events:
                if isinstance(event, TextDelta):
                    text += event.text
                elif isinstance(event, Finish):
                    finish = event
        assert finish is not None
        return text, finish

    return asyncio.run(run())


def api_error(response_format: Any) -> APIError:
    with pytest.raises(APIError) as caught:
        response_format_grammar(response_format)
    assert caught.value.status == 400
    return caught.value


def test_text_and_none_need_no_grammar() -> None:
    assert response_format_grammar(None) is None
    assert response_format_grammar({"type": "text"}) is None
    assert json_schema_of({"type": "text"}) is None


@pytest.mark.parametrize("bad", [{"type": "json_object"}, {"type": "xml"}, {}, {"type": None}, {"json_schema": {}}])
def test_other_types_are_rejected_with_lm_studios_message(bad: dict[str, Any]) -> None:
    error = api_error(bad)
    assert error.message == TYPE_MESSAGE == "'response_format.type' must be 'json_schema' or 'text'"
    assert error.param == "response_format.type"


@pytest.mark.parametrize(
    "bad",
    [
        "json",
        ["json_schema"],
        {"type": "json_schema"},
        {"type": "json_schema", "json_schema": "{}"},
        {"type": "json_schema", "json_schema": {"name": "x"}},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": "not a schema"}},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": True}},
    ],
)
def test_missing_or_invalid_schema(bad: Any) -> None:
    assert api_error(bad).param == "response_format"


@pytest.mark.parametrize(
    ("schema", "needle"),
    [
        ({"type": "frobnicate"}, "Unrecognized schema"),
        ({"type": "string", "pattern": "no-anchors"}, "Pattern must start"),
        ({"type": "string", "pattern": "^(?=lookahead)$"}, "Unsupported pattern"),
        ({"$ref": "https://example.com/schema.json"}, "Only local"),
        ({"$ref": "other.json#/x"}, "Only local"),
        ({"$ref": "#/$defs/missing"}, "Unsupported JSON schema"),
        ({"type": "string", "maxLength": MAX_REPETITION + 1}, "supported maximum"),
        ({"type": "array", "items": {"type": "integer"}, "minItems": 10**9}, "supported maximum"),
        ({"type": "string", "pattern": "^a{5000}$"}, "supported maximum"),
        ({"type": "string", "maxLength": -1}, "non-negative integer"),
        ({"type": "string", "maxLength": "10"}, "non-negative integer"),
        ({"type": "integer", "minimum": 5, "maximum": 4}, "no integer satisfies"),
        ({"type": "integer", "minimum": "zero"}, "must be a number"),
    ],
)
def test_unsupported_schemas_are_400s(schema: dict[str, Any], needle: str) -> None:
    error = api_error(rf(schema))
    assert error.param == "response_format"
    assert needle in error.message


def test_deeply_nested_schema_is_a_400_not_a_crash() -> None:
    schema: dict[str, Any] = {"type": "integer"}
    for _ in range(5000):
        schema = {"type": "array", "items": schema}
    assert api_error(rf(schema)).param == "response_format"


def test_keyword_named_properties_and_data_are_not_counts() -> None:
    schema = {
        "type": "object",
        "properties": {"maxLength": {"type": "integer"}, "pattern": {"type": "string", "maxLength": 3}},
        "default": {"maxLength": "not a count"},
    }
    assert response_format_grammar(rf(schema))


def test_schema_of_request_is_not_mutated() -> None:
    schema = SCHEMAS["nested_refs"]
    request = rf(copy.deepcopy(schema))
    assert response_format_grammar(request)
    assert json_schema_of(request) == schema


def test_string_characters_are_unicode_scalar_values_but_not_controls() -> None:
    grammar = response_format_grammar(rf({"type": "object", "properties": {"s": {"type": "string"}}}))
    assert grammar is not None
    char = next(line for line in grammar.splitlines() if line.startswith("char ::="))
    assert r"[\x20-\x21\x23-\x5B\x5D-\x7E\u0080-\uD7FF\uE000-\U0010FFFF]" in char
    assert "[^" not in char


def gbnf_to_regex(expression: str) -> re.Pattern[str]:
    # integer_range_gbnf only writes quoted digit literals, classes, {n}, groups and alternation.
    return re.compile(re.sub(r'"([0-9-]*)"', lambda m: re.escape(m.group(1)), expression).replace(" ", ""))


@pytest.mark.parametrize(("lo", "hi"), [(0, 9), (5, 123), (-50, 50), (-1000, -7), (19, 20), (0, 0), (37, 5021),
                                        (-3, 0), (100, 100)])
def test_integer_ranges_are_exact(lo: int, hi: int) -> None:
    pattern = gbnf_to_regex(integer_range_gbnf(lo, hi))
    for value in range(lo - 150, hi + 150):
        assert bool(pattern.fullmatch(str(value))) == (lo <= value <= hi), value
    assert not pattern.fullmatch("-0")
    assert not pattern.fullmatch("0" + str(abs(hi)))


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_llama_cpp_accepts_the_grammars(model: LlamaModel, name: str) -> None:
    grammar = response_format_grammar(rf(SCHEMAS[name]), model=model)
    assert grammar and "root ::=" in grammar
    sampler = llama_cpp.llama_sampler_init_grammar(model.vocab, grammar.encode(), b"root")
    assert sampler
    llama_cpp.llama_sampler_free(sampler)


def test_llama_cpp_accepts_the_largest_repetition(model: LlamaModel) -> None:
    for schema in (
        {"type": "string", "maxLength": MAX_REPETITION},
        {"type": "array", "items": {"type": "object", "properties": {"a": {"type": "integer"}}},
         "maxItems": MAX_REPETITION},
        {"type": "string", "pattern": f"^[a-z]{{0,{MAX_REPETITION}}}$"},
    ):
        response_format_grammar(rf(schema), model=model)


def test_grammar_llama_cpp_rejects_is_a_400(model: LlamaModel) -> None:
    with pytest.raises(APIError) as caught:
        check_grammar(model, "root ::= (")
    assert caught.value.status == 400
    assert caught.value.param == "response_format"


@pytest.mark.parametrize("name", sorted(SCHEMAS))
@pytest.mark.parametrize("prompt", [PROMPT, "<|im_start|>user\nanother prompt<|im_end|>\n<|im_start|>assistant\n"])
def test_greedy_generation_validates(engine: GenerationEngine, name: str, prompt: str) -> None:
    schema = SCHEMAS[name]
    grammar = response_format_grammar(rf(schema))
    assert grammar is not None
    text, finish = generate(engine, prompt, grammar)
    assert finish.reason == "stop", (finish, text)  # the grammar completed and forced end-of-generation
    jsonschema.validate(json.loads(text), schema)


def test_free_strings_stay_within_the_grammar_even_when_cut_off(engine: GenerationEngine) -> None:
    # An unbounded string may not finish on a random model: the output is then a JSON prefix.
    text, finish = generate(engine, PROMPT, response_format_grammar(rf({"type": "string"})) or "", max_tokens=24)
    assert text.startswith('"')
    if finish.reason == "stop":
        assert isinstance(json.loads(text), str)

