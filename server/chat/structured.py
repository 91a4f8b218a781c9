"""Structured output: `response_format` becomes a GBNF grammar that llama.cpp enforces while sampling.

Accepted, as LM Studio does: None, `{"type": "text"}` (no grammar) and
`{"type": "json_schema", "json_schema": {"name", "schema", "strict"?}}`. Everything else, `json_object`
included, is a 400 with LM Studio's message. Schemas go through llama-cpp-python's converter
(`llama_cpp.llama_grammar.SchemaConverter`, what `json_schema_to_gbnf` runs) with three changes:

- string characters are Unicode scalar values other than raw control characters, as JSON requires (the
  converter's `char` allows control characters, surrogates and, through llama.cpp's lenient UTF-8
  decoding of byte tokens, code points above U+10FFFF);
- `minimum`/`maximum`/`exclusiveMinimum`/`exclusiveMaximum` on integers are enforced (the converter
  ignores them);
- `$ref`s must be local (`#/...`): nothing is fetched or read.

Limits (400 where they apply, never a 500):
- llama.cpp's grammar parser gives up on optional repetition nested more than ~1000 deep, which is how
  the converter writes `maxLength`/`maxItems`/pattern `{m,n}`; counts above `MAX_REPETITION` are
  refused up front (they also cost memory linear in the count). `check_grammar` asks llama.cpp itself.
- Not enforced (generated JSON may not validate): bounds on `number`, `multipleOf`, `uniqueItems`,
  `not`, `if`/`then`/`else`, `patternProperties`, `propertyNames`, `contains`, formats other than
  date/time/date-time/uuid, bounds on integers inside a `type` list, `required` names missing from
  `properties`.
- llama.cpp's grammar decodes overlong UTF-8 (e.g. F0 8E BE BE) from byte tokens as a valid character,
  so a model that emits such bytes produces U+FFFD replacement characters in the text, which can then
  exceed `maxLength`. Pattern (`pattern`) classes keep the converter's negated classes.
- Unbounded constructs can run to `max_tokens` when the model never closes them: strings without
  `maxLength`, arrays without `maxItems`, objects with `additionalProperties` or no `properties` (free
  JSON), recursive `$ref`s. A capable model closes them; a random-weight test model may not. Numbers
  and integers are bounded (16 digits), as are enums, consts, booleans and nulls.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Mapping
from typing import Any

from llama_cpp.llama_grammar import (
    INVALID_RULE_CHARS_RE,
    PRIMITIVE_RULES,
    RESERVED_NAMES,
    BuiltinRule,
    SchemaConverter,
)

from ..engine import llama_lib as lib
from ..errors import bad_request

TYPE_MESSAGE = "'response_format.type' must be 'json_schema' or 'text'"
MAX_REPETITION = 1000
_COUNT_KEYS = ("minLength", "maxLength", "minItems", "maxItems")
_QUANTIFIER_RE = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")
_INT_LIMIT = 10**16 - 1  # the converter's integers have at most 16 digits
_DATA_KEYS = frozenset({"enum", "const", "default", "examples"})  # JSON values, not schemas
_BOUND_KEYS = frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"})
_HANDLED_FIRST = frozenset({"$ref", "oneOf", "anyOf", "const", "enum"})  # the converter looks at these first
# JSON strings may not hold raw control characters, and the converter's negated class `[^"\\]` also lets
# llama.cpp accept byte sequences it decodes to surrogates or to code points above U+10FFFF, which are
# not UTF-8 at all. A positive class of Unicode scalar values keeps both out.
_JSON_CHAR = BuiltinRule(
    r'[\x20-\x21\x23-\x5B\x5D-\x7E\u0080-\uD7FF\uE000-\U0010FFFF]'
    r' | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])',
    [],
)
_PARAM = "response_format"


def json_schema_of(response_format: Any) -> dict[str, Any] | None:
    """The JSON schema a `response_format` asks for (for validators), None for free text; 400 if malformed."""
    if response_format is None:
        return None
    if not isinstance(response_format, Mapping):
        raise bad_request("'response_format' must be an object.", param=_PARAM)
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind != "json_schema":
        raise bad_request(TYPE_MESSAGE, param="response_format.type")
    spec = response_format.get("json_schema")
    if not isinstance(spec, Mapping):
        raise bad_request("'response_format.json_schema' must be an object holding a 'schema'.", param=_PARAM)
    schema = spec.get("schema")
    if not isinstance(schema, Mapping):
        raise bad_request("'response_format.json_schema.schema' must be a JSON schema object.", param=_PARAM)
    return dict(schema)


def response_format_grammar(response_format: Any, *, model: lib.LlamaModel | None = None) -> str | None:
    """GBNF for a `response_format`, None for free text; 400 for anything malformed or unsupported.

    With `model`, also checks that llama.cpp accepts the grammar (see `check_grammar`).
    """
    schema = json_schema_of(response_format)
    if schema is None:
        return None
    grammar = schema_grammar(schema)
    if model is not None:
        check_grammar(model, grammar)
    return grammar


def schema_grammar(schema: Mapping[str, Any]) -> str:
    _check_limits(schema)
    converter = JsonSchemaConverter()
    try:
        # resolve_refs rewrites `$ref`s in place: work on a copy, the caller may validate with the original.
        resolved = converter.resolve_refs(copy.deepcopy(dict(schema)), "input")
        converter.visit(resolved, "")
        return converter.format_grammar()
    except _SchemaError as exc:
        raise bad_request(f"Invalid JSON schema in 'response_format': {exc}", param=_PARAM) from exc
    # The converter reports what it cannot handle with asserts and assorted exceptions.
    except (AssertionError, ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError) as exc:
        detail = str(exc) or type(exc).__name__
        raise bad_request(f"Unsupported JSON schema in 'response_format': {detail}", param=_PARAM) from exc


def check_grammar(model: lib.LlamaModel, grammar: str, *, param: str = _PARAM) -> None:
    """400 unless llama.cpp can build a sampler for `grammar` (it refuses some, e.g. too deep repetition).

    Building one only parses the grammar (about a millisecond); the vocabulary is read-only, so this is
    safe beside the engine thread. llama.cpp prints its reason to stderr.
    """
    chain = lib.SamplerChain()
    try:
        chain.add(lib.grammar_sampler(model, grammar))
    except ValueError as exc:
        raise bad_request(
            f"The schema in '{param}' produced a grammar llama.cpp cannot use (too large or too deeply nested).",
            param=param,
        ) from exc
    finally:
        chain.close()


class _SchemaError(ValueError):
    pass


def _check_limits(schema: Mapping[str, Any]) -> None:
    """Refuses remote refs and repetition counts the converter would expand into huge grammars."""
    stack: list[Any] = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, Mapping):
            continue
        ref = node.get("$ref")
        if isinstance(ref, str) and not ref.startswith("#"):
            raise bad_request(f"Only local '$ref's (starting with '#') are supported, not {ref!r}.", param=_PARAM)
        for key in _COUNT_KEYS:
            value = node.get(key)
            # A property *named* like a keyword has a schema (a dict) as its value: not a count.
            if value is not None and not isinstance(value, Mapping):
                _check_count(key, value)
        pattern = node.get("pattern")
        if isinstance(pattern, str):
            for match in _QUANTIFIER_RE.finditer(pattern):
                for number in filter(None, match.groups()):
                    _check_count("pattern quantifier", int(number))
        stack.extend(v for k, v in node.items() if k not in _DATA_KEYS)


def _check_count(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise bad_request(f"'{key}' in 'response_format' must be a non-negative integer, not {value!r}.", param=_PARAM)
    if value > MAX_REPETITION:
        raise bad_request(
            f"'{key}' of {value} in 'response_format' is above the supported maximum of {MAX_REPETITION}.",
            param=_PARAM,
        )


class JsonSchemaConverter(SchemaConverter):
    """llama-cpp-python's converter, plus integer bounds, valid-Unicode string characters, and `$ref`
    rules named after the schema's base (so several tools' `$defs` can share one grammar)."""

    def __init__(self) -> None:
        super().__init__(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)

    def _resolve_ref(self, ref: str) -> str:
        base, _, path = ref.partition("#")
        ref_name = INVALID_RULE_CHARS_RE.sub("-", f"{base}-def-{path.rsplit('/', 1)[-1]}")
        if ref_name not in self._rules and ref not in self._refs_being_resolved:
            self._refs_being_resolved.add(ref)
            ref_name = self.visit(self._refs[ref], ref_name)
            self._refs_being_resolved.remove(ref)
        return ref_name

    def visit(self, schema: Any, name: str) -> str:
        if (
            isinstance(schema, dict)
            and schema.get("type") == "integer"
            and _BOUND_KEYS.intersection(schema)
            and not _HANDLED_FIRST.intersection(schema)
        ):
            lo, hi = _integer_bounds(schema)
            rule_name = f"{name}-" if name in RESERVED_NAMES else (name or "root")
            return self._add_rule(rule_name, f"({integer_range_gbnf(lo, hi)}) space")
        return super().visit(schema, name)

    def _add_primitive(self, name: str, rule: BuiltinRule) -> str:
        return super()._add_primitive(name, _JSON_CHAR if rule is PRIMITIVE_RULES["char"] else rule)


def _integer_bounds(schema: Mapping[str, Any]) -> tuple[int, int]:
    """Inclusive integer bounds from JSON Schema's (draft 4 boolean or draft 6+ numeric) keywords."""
    lo, hi = -_INT_LIMIT, _INT_LIMIT
    minimum, maximum = _bound(schema, "minimum"), _bound(schema, "maximum")
    ex_min, ex_max = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    if minimum is not None:
        lo = max(lo, math.floor(minimum) + 1 if ex_min is True else math.ceil(minimum))
    if maximum is not None:
        hi = min(hi, math.ceil(maximum) - 1 if ex_max is True else math.floor(maximum))
    if not isinstance(ex_min, bool) and (value := _bound(schema, "exclusiveMinimum")) is not None:
        lo = max(lo, math.floor(value) + 1)
    if not isinstance(ex_max, bool) and (value := _bound(schema, "exclusiveMaximum")) is not None:
        hi = min(hi, math.ceil(value) - 1)
    lo, hi = max(lo, -_INT_LIMIT), min(hi, _INT_LIMIT)
    if lo > hi:
        raise _SchemaError("no integer satisfies the bounds of an integer schema")
    return lo, hi


def _bound(schema: Mapping[str, Any], key: str) -> float | None:
    value = schema.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _SchemaError(f"'{key}' must be a number, not {value!r}")
    if not math.isfinite(value):
        return math.copysign(_INT_LIMIT + 1, value)
    # Beyond 16 digits nothing can be generated anyway: clamping keeps the digit arithmetic small.
    return max(-_INT_LIMIT - 1, min(_INT_LIMIT + 1, value))


def integer_range_gbnf(lo: int, hi: int) -> str:
    """A GBNF expression matching exactly the decimal integers in [lo, hi] (no leading zeros, no "-0")."""
    alternatives = []
    if lo < 0:
        magnitudes = _non_negative_range(max(1, -hi), -lo)
        alternatives.append(f'"-" ({" | ".join(magnitudes)})')
    if hi >= 0:
        alternatives.extend(_non_negative_range(max(lo, 0), hi))
    return " | ".join(alternatives)


def _non_negative_range(lo: int, hi: int) -> list[str]:
    # One alternative per digit count: within one count the range is a plain digit-by-digit range.
    out = []
    for width in range(len(str(lo)), len(str(hi)) + 1):
        start = max(lo, 10 ** (width - 1) if width > 1 else 0)
        end = min(hi, 10**width - 1)
        if start <= end:
            out.append(_same_width_range(str(start), str(end)))
    return out


def _same_width_range(low: str, high: str) -> str:
    """GBNF for the digit strings from `low` to `high`, which have the same length."""
    i = 0
    while i < len(low) and low[i] == high[i]:
        i += 1
    if i == len(low):
        return f'"{low}"'
    prefix = f'"{low[:i]}" ' if i else ""
    rest = len(low) - i - 1
    first, last = low[i], high[i]
    if rest == 0:
        return f"{prefix}[{first}-{last}]"
    zeros, nines = "0" * rest, "9" * rest
    any_tail = "[0-9]" if rest == 1 else f"[0-9]{{{rest}}}"
    parts = []
    full_from, full_to = first, last  # leading digits followed by any tail
    if low[i + 1 :] != zeros:
        parts.append(f'"{first}" ({_same_width_range(low[i + 1 :], nines)})')
        full_from = chr(ord(first) + 1)
    if high[i + 1 :] != nines:
        full_to = chr(ord(last) - 1)
    if full_from <= full_to:
        parts.append(f"[{full_from}-{full_to}] {any_tail}")
    if high[i + 1 :] != nines:
        parts.append(f'"{last}" ({_same_width_range(zeros, high[i + 1 :])})')
    return f"{prefix}({' | '.join(parts)})"
