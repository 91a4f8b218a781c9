"""Prefix-cache demo: time to first token of a request whose long prefix a previous request already
prefilled, against a cold one of the same length (fresh random prefix, so nothing can be reused).
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import Any

from oai_load import PROMPT_WORDS, completion_request, stream_completion
from servers import Server


def long_prefix(seed: int, words: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(PROMPT_WORDS) for _ in range(words))


@dataclass
class PrefixTrial:
    cold_s: float  # TTFT of prefix + tail A, prefix never seen before
    warm_s: float  # TTFT of prefix + tail B right after it
    prompt_tokens: int | None


async def _ttft(server: Server, prompt: str, extra: dict[str, Any] | None) -> tuple[float, int | None]:
    stream = await stream_completion(server, completion_request(server, 2, prompt=prompt, extra=extra))
    if stream.error or not stream.token_times:
        raise RuntimeError(f"{server.name}: prefix-cache request failed: {stream.error}")
    return stream.token_times[0] - stream.sent, stream.prompt_tokens


def prefix_demo(server: Server, *, trials: int, words: int, seed: int,
                extra: dict[str, Any] | None = None) -> list[PrefixTrial]:
    results = []
    for i in range(trials):
        prefix = long_prefix(seed + i, words)
        cold, tokens = asyncio.run(_ttft(server, prefix + " the end of it", extra))
        warm, _ = asyncio.run(_ttft(server, prefix + " what time is new", extra))
        results.append(PrefixTrial(cold, warm, tokens))
    return results
