"""Per-request sampling parameters and the llama.cpp sampler chain built from them."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..config import SamplingDefaults
from . import llama_lib as lib

_DEFAULTS = SamplingDefaults()

# A large negative bias rather than -inf: llama.cpp's logit-bias sampler adds it to the logit.
BANNED = -1e30


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int | None = None  # None: until the context is full
    temperature: float = _DEFAULTS.temperature
    top_k: int = _DEFAULTS.top_k
    top_p: float = _DEFAULTS.top_p
    min_p: float = _DEFAULTS.min_p
    repeat_penalty: float = _DEFAULTS.repeat_penalty
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    stop: Sequence[str] = ()
    ignore_eos: bool = False
    grammar: str | None = None  # GBNF, enforced while sampling
    render_special: bool = False  # emit the text of control tokens (chat-template markers)
    # Speculative decoding (speculative.py): the draft model's key and lmkube's knobs (None: the defaults).
    draft_model: str | None = None
    draft_max: int | None = None
    draft_min: int | None = None
    draft_p_min: float | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def uses_penalties(self) -> bool:
        return self.repeat_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def build_sampler_chain(
    model: lib.LlamaModel, params: SamplingParams, prompt: Sequence[int]
) -> lib.SamplerChain:
    """Order follows llama.cpp's defaults: bias and penalties, grammar, truncation, then the draw."""
    chain = lib.SamplerChain()
    try:
        bias = dict(params.logit_bias)
        if params.ignore_eos:
            bias.update(dict.fromkeys(model.eog_ids, BANNED))
        if bias:
            chain.add(lib.logit_bias_sampler(model.n_vocab, bias))
        if params.uses_penalties():
            chain.add(
                lib.penalties_sampler(
                    model.n_vocab,
                    params.repeat_last_n,
                    params.repeat_penalty,
                    params.frequency_penalty,
                    params.presence_penalty,
                    [t for t in prompt if t >= 0],  # image placeholders are no vocabulary tokens
                )
            )
        if params.grammar:
            chain.add(lib.grammar_sampler(model, params.grammar))
        if params.greedy:
            chain.add(lib.greedy_sampler())
            return chain
        if params.top_k > 0:
            chain.add(lib.top_k_sampler(params.top_k))
        if params.top_p < 1.0:
            chain.add(lib.top_p_sampler(params.top_p, 1))
        if params.min_p > 0.0:
            chain.add(lib.min_p_sampler(params.min_p, 1))
        chain.add(lib.temperature_sampler(params.temperature))
        seed = params.seed if params.seed is not None else random.getrandbits(32)
        chain.add(lib.distribution_sampler(seed & 0xFFFFFFFF))
        return chain
    except BaseException:
        chain.close()
        raise
