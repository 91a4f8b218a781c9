"""Prompt prefixes shared across sequences of one unified KV cache.

A request takes the longest run of its prompt that any other sequence holds (a running request, an idle
cache), and a prompt behind another one that is computing their common prefix in the same batch waits a
step and takes it instead of computing it twice. Checked against one-at-a-time runs on fresh engines
(F32 weights, flash attention off: see tests/test_engine.py for why) and through the prompt tokens the
engine really evaluated.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from engine_support import Result, collect, common_prefix, filler, first_text, greedy, load_model, running
from lmkube.server.engine import llama_lib as lib
from lmkube.server.engine.host_cache import CachedPrompt, HostPromptCache

from lmkube.synthetic_gguf import write_llama_model


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[lib.LlamaModel]:
    path = write_llama_model(tmp_path_factory.mktemp("sharing") / "chat-F32.gguf", dtype="f32", seed=1)
    model = load_model(Path(path))
    yield model
    model.close()


def alone(model: lib.LlamaModel, prompts: list[list[int]], max_tokens: int) -> list[Result]:
    async def main() -> list[Result]:
        results = []
        for prompt in prompts:
            with running(model, parallel=1) as fresh:
                results.append(await collect(fresh.submit(prompt, greedy(max_tokens))))
        return results

    return asyncio.run(main())


def test_identical_concurrent_prompts_are_computed_once(chat_model: lib.LlamaModel) -> None:
    # Three 64-token chunks and the last token: the followers trail the leader chunk by chunk.
    prompt = filler(193)

    async def main() -> tuple[list[Result], int]:
        with running(chat_model, parallel=4, n_batch=64) as engine:
            results = await asyncio.gather(*(collect(engine.submit(prompt, greedy(12))) for _ in range(4)))
            return results, engine.stats.prompt_tokens

    results, evaluated = asyncio.run(main())
    [reference] = alone(chat_model, [prompt], 12)
    assert [r.text for r in results] == [reference.text] * 4
    assert sorted(r.finish.cached_tokens for r in results) == [0, 192, 192, 192]
    assert all(r.finish.prompt_tokens == 193 for r in results)
    assert evaluated == 193 + 3  # the leader's prompt, then each follower's last token for its own logits


def test_concurrent_prompts_behind_one_system_prompt_share_it(chat_model: lib.LlamaModel) -> None:
    system = chat_model.tokenize("You are a careful assistant who answers questions about the sea. " * 6)
    questions = ["What is a wave?", "Why is it salty?", "How deep does it go, and what lives there?"]
    prompts = [system + chat_model.tokenize(q, add_special=False) for q in questions]
    assert len(system) > 80

    async def main() -> tuple[list[Result], int]:
        with running(chat_model, parallel=3) as engine:
            results = await asyncio.gather(*(collect(engine.submit(p, greedy(16))) for p in prompts))
            return results, engine.stats.prompt_tokens

    results, evaluated = asyncio.run(main())
    assert [r.text for r in results] == [r.text for r in alone(chat_model, prompts, 16)]
    shared = [r.finish.cached_tokens for r in results]
    assert sorted(shared)[0] == 0 and all(n >= len(system) for n in sorted(shared)[1:])
    assert evaluated == sum(len(p) for p in prompts) - sum(shared)
    assert evaluated < sum(len(p) for p in prompts) - 2 * len(system) + 3 * 4


def test_a_request_borrows_the_prefix_a_running_request_holds(chat_model: lib.LlamaModel) -> None:
    document = filler(150, start=7)
    first = document + chat_model.tokenize(" Summarise it.", add_special=False)
    second = document + chat_model.tokenize(" Translate it.", add_special=False)
    borrowed = min(common_prefix(first, second), len(second) - 1)
    assert borrowed >= 150

    async def main() -> tuple[Result, Result]:
        with running(chat_model, parallel=2) as engine:
            long_running = engine.submit(first, greedy(200))
            await first_text(long_running)  # it is generating: its slot holds the document
            later = await collect(engine.submit(second, greedy(20)))
            long_running.cancel()
            return later, await collect(long_running)

    later, cancelled = asyncio.run(main())
    [reference] = alone(chat_model, [second], 20)
    assert later.text == reference.text and later.finish.completion_tokens == 20
    assert later.finish.cached_tokens == borrowed
    assert cancelled.finish.reason == "cancelled"


def test_prompts_sharing_only_a_few_tokens_do_not_wait(chat_model: lib.LlamaModel) -> None:
    # Two prompts that share BOS only: neither waits for the other, both are prefilled in the first step.
    prompts = [filler(40, start=0), filler(40, start=100)]

    async def main() -> list[Result]:
        with running(chat_model, parallel=2) as engine:
            results = await asyncio.gather(*(collect(engine.submit(p, greedy(8))) for p in prompts))
            assert engine.stats.decode_calls == 8  # one step prefills both, seven more decode both
            return results

    results = asyncio.run(main())
    assert [r.text for r in results] == [r.text for r in alone(chat_model, prompts, 8)]


# -- idle caches in host memory ---------------------------------------------------------------------


def test_idle_caches_wait_in_host_memory_while_others_run(chat_model: lib.LlamaModel) -> None:
    first_turn = chat_model.tokenize("Tell me about the weather by the sea in the morning.")
    second_turn = first_turn + chat_model.tokenize(" And what about the evening?", add_special=False)
    other = filler(60, start=50)

    async def main() -> tuple[Result, list[int]]:
        with running(chat_model, parallel=2, host_cache_bytes=64 << 20) as engine:
            await collect(engine.submit(first_turn, greedy(12)))
            sizes = [engine.kv_cache_tokens, engine.host_cache_tokens]  # nothing runs: it stays in the KV cache
            busy = engine.submit(other, greedy(400))
            await first_text(busy)
            # While `other` runs, the first conversation's cache waits in host memory.
            sizes.append(engine.host_cache_tokens)
            follow_up = await collect(engine.submit(second_turn, greedy(12)))
            for _ in range(2):  # what `other` produced meanwhile, then one more step: the follow-up is idle now
                await first_text(busy)
            sizes.append(engine.host_cache_tokens)
            busy.cancel()
            await collect(busy)
            return follow_up, sizes

    follow_up, sizes = asyncio.run(main())
    first_cache = len(first_turn) + 12 - 1  # the last sampled token was never decoded
    assert sizes[:3] == [first_cache, 0, first_cache]
    # The first conversation's entry went back into the KV cache; now the follow-up's cache waits there.
    assert sizes[3] == len(second_turn) + 12 - 1
    assert follow_up.finish.cached_tokens >= len(first_turn)
    assert follow_up.text == alone(chat_model, [second_turn], 12)[0].text


def test_host_cache_keeps_the_longest_prompts_within_its_budget() -> None:
    def entry(tokens: list[int], nbytes: int) -> CachedPrompt:
        return CachedPrompt(tokens, np.zeros(nbytes, np.uint8))

    cache = HostPromptCache(budget_bytes=1000)
    cache.put(entry([1, 2, 3], 300))
    cache.put(entry([1, 2, 3, 4, 5], 500))  # the same conversation, longer: replaces the shorter one
    assert (len(cache), cache.nbytes, cache.tokens) == (1, 500, 5)
    assert not cache.wants([1, 2, 3, 4]) and cache.wants([1, 2, 9])
    cache.put(entry([7, 8], 400))
    cache.put(entry([9], 300))  # over budget: the least recently used entry goes
    assert (len(cache), cache.nbytes) == (2, 700)
    assert cache.take_longest([1, 2, 3, 4, 5, 6], at_least=0, limit=5) is None
    cache.put(entry([5] * 50, 2000))  # larger than the whole budget: not kept
    assert cache.nbytes == 700
    found = cache.take_longest([7, 8, 9], at_least=1, limit=2)
    assert found is not None and found[0].tokens == [7, 8] and found[1] == 2
    assert cache.take_longest([7, 8, 9], at_least=0, limit=2) is None  # taken means gone
    assert cache.take_longest([9, 1], at_least=1, limit=1) is None  # shares 1, not more than 1


def test_a_cache_larger_than_the_host_budget_is_dropped_not_parked(chat_model: lib.LlamaModel) -> None:
    prompt = filler(80, start=11)

    async def main() -> tuple[int, Result, Result]:
        with running(chat_model, parallel=2, host_cache_bytes=1024) as engine:  # far below one sequence's KV
            first = await collect(engine.submit(prompt, greedy(8)))
            busy = engine.submit(filler(40, start=90), greedy(400))
            await first_text(busy)
            parked = engine.host_cache_tokens
            again = await collect(engine.submit(prompt, greedy(8)))
            busy.cancel()
            await collect(busy)
            return parked, first, again

    parked, first, again = asyncio.run(main())
    assert parked == 0
    assert again.text == first.text and again.finish.cached_tokens <= 1  # computed anew (BOS may be shared)
