"""Quantization names, their approximate bits per weight, and which variant of a model is the default.

The default variant of a model is Q4_K_M when present, otherwise the variant whose bits per weight is
closest to Q4_K_M's (4.89), with ties going to the smaller bits per weight (the smaller download).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")

DEFAULT_QUANT = "Q4_K_M"

# general.file_type values (llama.h's enum llama_ftype, LLAMA_FTYPE_ALL_F32 / LLAMA_FTYPE_MOSTLY_*).
# 4-6 (Q4_1_SOME_F16, Q4_2, Q4_3) and 33-35 (Q4_0_4_4 ...) were removed from llama.cpp and are absent.
FILE_TYPES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M",
    18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S",
    25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M",
    32: "BF16", 36: "TQ1_0", 37: "TQ2_0",
    38: "MXFP4",  # llama.h: LLAMA_FTYPE_MOSTLY_MXFP4_MOE; files are named plain "MXFP4"
    39: "NVFP4", 40: "Q1_0",
}
_FTYPE_GUESSED = 1024  # llama.h ORs this in when the type was inferred rather than stored

# Whole-model bits per weight (embeddings and output tensors included), all for one model so that they
# compare: the bits/weight column of llama.cpp's tools/quantize/README.md (Llama-3.1-8B); for the types
# that table omits (Q3_K_M, Q4_0..Q5_1), the sizes llama-quantize prints for Llama-3-8B scaled by that
# table's Q4_K_M ratio; for ternary/FP4/Q1_0 types, the bpw llama-quantize prints or their block layout.
BITS_PER_WEIGHT: dict[str, float] = {
    "F32": 32.0, "F16": 16.0, "BF16": 16.0, "Q8_0": 8.50, "Q6_K": 6.56, "Q5_1": 6.04, "Q5_K_M": 5.70,
    "Q5_K_S": 5.57, "Q5_0": 5.57, "Q4_1": 5.11, "Q4_K_M": 4.89, "IQ4_NL": 4.68, "Q4_K_S": 4.67,
    "Q4_0": 4.64, "NVFP4": 4.5, "IQ4_XS": 4.46, "Q3_K_L": 4.30, "MXFP4": 4.25, "Q3_K_M": 4.00,
    "IQ3_M": 3.76, "IQ3_S": 3.66, "Q3_K_S": 3.64, "IQ3_XS": 3.50, "IQ3_XXS": 3.25, "Q2_K": 3.16,
    "Q2_K_S": 2.97, "IQ2_M": 2.93, "IQ2_S": 2.74, "IQ2_XS": 2.59, "IQ2_XXS": 2.38, "IQ1_M": 2.15,
    "TQ2_0": 2.06, "IQ1_S": 2.00, "TQ1_0": 1.69, "Q1_0": 1.125,
}

# Spellings that name a known type; llama-quantize itself takes Q3_K/Q4_K/Q5_K as the _M mixes.
_ALIASES: dict[str, str] = {
    "FP16": "F16", "FP32": "F32", "Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M",
    "MXFP4_MOE": "MXFP4",
}

# Where a name that is not in the table (Q4_K_XL, Q4_0_4_4, IQ2_XXS_R4, ...) takes its bits per weight:
# the family it extends, i.e. its longest prefix (in "_" segments) found here or in the table.
_FAMILIES: dict[str, str] = {
    "Q2_K": "Q2_K", "Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M", "Q6_K": "Q6_K",
    "Q8_K": "Q8_0",  # "Q8_K_XL" files are Q8_0 with some tensors kept at 16 bits
}

_SIZES = "XXS|XS|S|M|L|XL|XXL"
_QUANT_RE = re.compile(
    r"(?<![A-Z0-9])("
    r"(?:UD[-_])?"  # unsloth "dynamic" quants: UD-Q4_K_XL, UD-IQ1_S
    r"(?:BF16|FP?16|FP?32|MXFP4(?:_MOE)?|NVFP4|TQ[12]_0"
    rf"|I?Q[1-8](?:_(?:K|NL|\d)(?:_(?:{_SIZES}))?|_(?:{_SIZES}))(?:_\d_\d|_R\d+)?)"
    r")(?![A-Z0-9])",
    re.IGNORECASE,
)
_SHARD_RE = re.compile(r"-\d{5}-of-\d{5}$", re.IGNORECASE)


def normalize_quant(name: str) -> str | None:
    """Canonical upper-case spelling of a quantization name, or None if it does not look like one."""
    match = _QUANT_RE.fullmatch(name.strip())
    if match is None:
        return None
    token = match.group(1).upper().replace("UD_", "UD-")
    prefix, _, base = token.rpartition("-")
    base = _ALIASES.get(base, base)
    return f"{prefix}-{base}" if prefix else base


def quant_from_filename(filename: str) -> str | None:
    """The quantization a GGUF file name states (`Qwen2.5-7B-Instruct-Q4_K_M.gguf` -> "Q4_K_M"), if any.

    The last match wins because publishers put the quantization after the model name, which may itself
    contain quant-like text; a split-file suffix (-00001-of-00003) is ignored.
    """
    stem = filename.rsplit("/", 1)[-1]
    if stem.lower().endswith(".gguf"):
        stem = stem[: -len(".gguf")]
    stem = _SHARD_RE.sub("", stem)
    matches = _QUANT_RE.findall(stem)
    return normalize_quant(matches[-1]) if matches else None


def quant_from_file_type(file_type: int | None) -> str | None:
    """The quantization named by a GGUF `general.file_type` value, or None for absent/unknown values."""
    if file_type is None or isinstance(file_type, bool):
        return None
    return FILE_TYPES.get(file_type & ~_FTYPE_GUESSED)


def bits_per_weight(quant: str) -> float | None:
    """Approximate bits per weight of a quantization name, known or plausible (from its family)."""
    canonical = normalize_quant(quant)
    if canonical is None:
        return None
    parts = canonical.rpartition("-")[2].split("_")
    for n in range(len(parts), 0, -1):
        prefix = "_".join(parts[:n])
        if prefix in BITS_PER_WEIGHT:
            return BITS_PER_WEIGHT[prefix]
        if prefix in _FAMILIES:
            return BITS_PER_WEIGHT[_FAMILIES[prefix]]
    digits = re.search(r"\d", canonical)
    # A plausible but unknown family (Q7_X): its nominal bits plus typical scale overhead.
    return int(digits.group()) + 0.5 if digits else None


def pick_default(items: Iterable[T], quant: Callable[[T], str] = str) -> T | None:
    """The default among `items` by the rule in this module's docstring; `quant` gives an item's name.

    Items of unknown bits per weight come last; equal candidates keep a stable order by name.
    """
    target = BITS_PER_WEIGHT[DEFAULT_QUANT]

    def rank(item: T) -> tuple[bool, float, float, str]:
        name = quant(item)
        bpw = bits_per_weight(name)
        if bpw is None:
            return (True, float("inf"), float("inf"), name)
        # Rounded so that 4.55 and 5.23 tie at 0.34 despite binary floating point.
        return (normalize_quant(name) != DEFAULT_QUANT, round(abs(bpw - target), 6), bpw, name)

    return min(items, key=rank, default=None)
