"""GenerationEngine driven in-process: real llama.cpp contexts over generated GGUF models.

Why F32 weights and no flash attention here: llama.cpp's CPU kernels are not batch-invariant. The
logits of one sequence differ slightly with the shape of the batch it is decoded in (measured on these
generated models, largest difference over 30 steps: 2-3e-2 with flash attention, 4e-3 with F16 weights,
2e-3 with F32 weights and flash attention off). Greedy decoding of a random-weight model meets near-ties
often enough that with F16 weights 8 requests run batched and one at a time disagreed somewhere in 18-20
of 20 trials, while with F32 and flash attention off they agreed in all of 300. The tests that compare
texts across batch shapes use that setup: they test the engine's scheduling, not llama.cpp's numerics.
One llama.cpp thread: on a busy 2-core machine, spinning worker threads made this file ~30x slower.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from pathlib import Path

import llama_cpp
import pytest
from engine_support import (
    Result,
    collect,
    common_prefix,
    context_config,
    filler,
    first_text,
    greedy,
    load_model,
    running,
)
from lmkube.server.engine import llama_lib as lib
from lmkube.server.engine.generation import GenerationRequest
from lmkube.server.engine.sampling import build_sampler_chain

from lmkube.synthetic_gguf import LlamaShape, write_llama_model

TOPICS = [
    "the weather", "a long story about a cat who lived by the sea", "numbers", "hello world",
    "what is the time now in the city", "tell me more", "yes or no, and why", "one two three four five",
]  # fmt: skip
LENGTHS = [7, 48, 20, 64, 13, 33, 56, 26]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("engine-models")


@pytest.fixture(scope="module")
def chat_model(model_dir: Path) -> Iterator[lib.LlamaModel]:
    model = load_model(write_llama_model(model_dir / "chat-F32.gguf", dtype="f32", seed=1))
    yield model
    model.close()


@pytest.fixture(scope="module")
def byte_model(model_dir: Path) -> Iterator[lib.LlamaModel]:
    path = write_llama_model(model_dir / "bytes-F32.gguf", dtype="f32", seed=3, emit_bytes=True, emit_eos=True,
                             shape=LlamaShape(n_vocab=600))
    model = load_model(path)
    yield model
    model.close()


# -- batching ---------------------------------------------------------------------------------------


def test_concurrent_greedy_requests_match_one_at_a_time(chat_model: lib.LlamaModel) -> None:
    prompts = [chat_model.tokenize(f"Question {i}: {topic}?") for i, topic in enumerate(TOPICS)]
    assert len({len(p) for p in prompts}) > 4

    async def main() -> tuple[list[Result], int, list[Result], list[Result]]:
        with running(chat_model) as fresh:
            alone = [await collect(fresh.submit(p, greedy(n))) for p, n in zip(prompts, LENGTHS, strict=True)]
        with running(chat_model) as engine:  # a fresh engine: no prefix cache for the first slots
            requests = [engine.submit(p, greedy(n)) for p, n in zip(prompts, LENGTHS, strict=True)]
            queued = engine.queued
            together = await asyncio.gather(*map(collect, requests))
            # Once more on the same engine: now every slot holds a cache sharing "<s>Question".
            again = await asyncio.gather(
                *(collect(engine.submit(p, greedy(n))) for p, n in zip(prompts, LENGTHS, strict=True))
            )
            assert (engine.active, engine.queued, engine.status()) == (0, 0, "idle")
        return alone, queued, together, again

    alone, queued, together, again = asyncio.run(main())
    texts = [r.text for r in alone]
    assert all(texts) and len(set(texts)) == len(texts)
    assert [r.finish.reason for r in alone] == ["length"] * len(LENGTHS)
    assert [r.finish.completion_tokens for r in alone] == LENGTHS
    assert queued >= len(prompts) - 4  # more requests than the 4 slots: some waited
    assert [r.text for r in together] == texts
    assert [r.text for r in again] == texts
    assert [r.finish.completion_tokens for r in together] == [r.finish.completion_tokens for r in again] == LENGTHS
    assert together[0].finish.cached_tokens == 0
    assert any(r.finish.cached_tokens > 0 for r in again)
    assert all(r.finish.cached_tokens < len(p) for r, p in zip(again, prompts, strict=True))


def test_prefix_cache_reuses_a_shared_prefix(chat_model: lib.LlamaModel) -> None:
    system = "You are a helpful assistant who answers every question about the world. " * 3
    first = chat_model.tokenize(system + "First question: the weather?")
    second = chat_model.tokenize(system + "Second question: a story?")
    shared = common_prefix(first, second)
    assert shared > 100

    async def main() -> tuple[Result, ...]:
        with running(chat_model, parallel=2) as engine:
            a = await collect(engine.submit(first, greedy(16)))
            a_again = await collect(engine.submit(first, greedy(16)))
            b = await collect(engine.submit(second, greedy(24)))
        with running(chat_model, parallel=2) as fresh:
            b_fresh = await collect(fresh.submit(second, greedy(24)))
        return a, a_again, b, b_fresh

    a, a_again, b, b_fresh = asyncio.run(main())
    assert a.finish.cached_tokens == 0
    # The same prompt again: everything but the last token, whose logits must be computed anew.
    assert a_again.finish.cached_tokens == len(first) - 1
    assert a_again.text == a.text
    assert b.finish.cached_tokens == shared
    assert b_fresh.finish.cached_tokens == 0
    assert b.text == b_fresh.text and b.finish.completion_tokens == 24
    assert b.finish.prompt_tokens == len(second)


def test_queue_is_fifo_and_bounded_by_the_slots(chat_model: lib.LlamaModel) -> None:
    prompts = [chat_model.tokenize(f"Request number {i} of six") for i in range(6)]
    assert len({len(p) for p in prompts}) == 1
    lengths = [12, 20, 28, 36, 44, 52]  # every request ends at a different step

    async def main() -> tuple[int, int, list[GenerationRequest], list[Result]]:
        with running(chat_model, parallel=2) as engine:
            requests = [engine.submit(p, greedy(n)) for p, n in zip(prompts, lengths, strict=True)]
            queued, active = engine.queued, engine.active
            results = await asyncio.gather(*map(collect, requests))
            assert (engine.active, engine.queued) == (0, 0)
            return queued, active, requests, results

    queued, active, requests, results = asyncio.run(main())
    assert queued >= 4 and queued + active <= 6
    assert [r.finish.reason for r in results] == ["length"] * 6
    assert [r.finish.completion_tokens for r in results] == lengths
    starts, ends = [], []
    for request, result in zip(requests, results, strict=True):
        assert result.finish.time_to_first_token is not None
        start = request.submitted_at + result.finish.time_to_first_token
        starts.append(start)
        ends.append(start + result.finish.generation_seconds)
    # FIFO: the first two may share a step; every later one starts strictly after its predecessor.
    assert starts[0] <= starts[1] + 1e-9
    assert all(a < b for a, b in itertools.pairwise(starts[1:])), starts
    for j in range(2, 6):  # never more than 2 at once: each later one waited for an earlier one to end
        running_then = [i for i in range(j) if starts[i] <= starts[j] < ends[i]]
        assert len(running_then) <= 1, (j, starts, ends)


# -- cancellation ------------------------------------------------------------------------------------


# Far more tokens than a test ever waits for (a few ms of generation); 2 x BUDGET fit in the context.
BUDGET = 3000


def test_cancel_running_and_queued_requests(chat_model: lib.LlamaModel) -> None:
    prompts = [chat_model.tokenize(f"Cancel me please, number {i}") for i in range(5)]

    async def main() -> dict[str, Result]:
        with running(chat_model, n_ctx=8192, parallel=2) as engine:
            r0 = engine.submit(prompts[0], greedy(BUDGET))
            r1 = engine.submit(prompts[1], greedy(BUDGET))
            q2 = engine.submit(prompts[2], greedy(BUDGET))
            q3 = engine.submit(prompts[3], greedy(BUDGET))
            q2.cancel()  # still waiting for a slot
            head0 = await first_text(r0)
            r0.cancel()  # mid-generation
            out = {"r0": await collect(r0, head0), "q2": await collect(q2)}
            head3 = await first_text(q3)  # r0's slot went to the oldest waiting request
            head1 = await first_text(r1)
            q3.cancel()
            r1.cancel()
            r1.cancel()  # twice is harmless
            out["q3"] = await collect(q3, head3)
            out["r1"] = await collect(r1, head1)
            r4 = engine.submit(prompts[4], greedy(10))
            r4.cancel()  # at once, before it can have produced its 10 tokens
            out["r4"] = await collect(r4)
            assert (engine.active, engine.queued, engine.status()) == (0, 0, "idle")
            out["after"] = await collect(engine.submit(prompts[0], greedy(24)))
            r0.cancel()  # cancelling a finished request changes nothing
            out["last"] = await collect(engine.submit(prompts[1], greedy(5)))
            assert (engine.active, engine.queued) == (0, 0)
        with running(chat_model, parallel=2) as fresh:
            out["fresh"] = await collect(fresh.submit(prompts[0], greedy(24)))
        return out

    out = asyncio.run(main())
    for name in ("r0", "q2", "q3", "r1", "r4"):
        assert out[name].finish.reason == "cancelled", name
    for name in ("r0", "q3", "r1"):
        assert out[name].text and 1 <= out[name].finish.completion_tokens < BUDGET, name
        assert out[name].finish.time_to_first_token is not None
    finish = out["q2"].finish  # cancelled while waiting: it never started
    assert (out["q2"].deltas, finish.completion_tokens, finish.time_to_first_token) == ([], 0, None)
    assert out["r4"].finish.completion_tokens < 10
    # The cancelled requests' caches stay usable: a request sharing their prefix reuses it and still
    # produces exactly what a fresh engine produces.
    assert out["after"].finish.reason == "length" and out["after"].finish.cached_tokens > 0
    assert out["after"].text == out["fresh"].text
    assert out["last"].finish.reason == "length" and out["last"].finish.completion_tokens == 5


def test_cancel_everything_while_most_requests_wait(chat_model: lib.LlamaModel) -> None:
    async def main() -> tuple[list[Result], Result]:
        with running(chat_model, n_ctx=8192, parallel=2) as engine:
            requests = [engine.submit(chat_model.tokenize(f"Wait {i}"), greedy(BUDGET)) for i in range(10)]
            await first_text(requests[0])
            for request in reversed(requests):
                request.cancel()
            results = await asyncio.gather(*map(collect, requests))
            assert (engine.active, engine.queued) == (0, 0)
            after = await collect(engine.submit(chat_model.tokenize("Still there?"), greedy(8)))
        return results, after

    results, after = asyncio.run(main())
    assert [r.finish.reason for r in results] == ["cancelled"] * 10
    assert sum(r.finish.completion_tokens for r in results) < 2 * BUDGET
    assert all(r.finish.completion_tokens == 0 for r in results[2:])  # never got a slot
    assert after.finish.reason == "length" and after.finish.completion_tokens == 8


def test_closing_the_engine_fails_requests_in_flight(chat_model: lib.LlamaModel) -> None:
    async def main() -> list[Result]:
        with running(chat_model, parallel=1) as engine:  # closing twice is harmless
            requests = [engine.submit(chat_model.tokenize(f"Close {i}"), greedy(1000)) for i in range(3)]
            head = await first_text(requests[0])
            engine.close()
            with pytest.raises(RuntimeError, match="closed"):
                engine.submit([1, 300], greedy(1))
            return [await collect(requests[0], head), *[await collect(r) for r in requests[1:]]]

    results = asyncio.run(main())
    assert [r.finish.reason for r in results] == ["error"] * 3
    assert all(r.finish.error == "model unloaded" for r in results)
    assert results[0].text and results[0].finish.completion_tokens < 1000


# -- limits -------------------------------------------------------------------------------------------


def test_max_tokens_and_stop_strings(chat_model: lib.LlamaModel) -> None:
    prompt = chat_model.tokenize("Tell me a story about the sea")

    async def main() -> tuple[Result, Result, str, Result, Result]:
        with running(chat_model) as engine:
            full = await collect(engine.submit(prompt, greedy(40)))
            one = await collect(engine.submit(prompt, greedy(1)))
            stop = full.text[12:15]
            stopped = await collect(engine.submit(prompt, greedy(40, stop=["\x00unused", stop])))
            unmatched = await collect(engine.submit(prompt, greedy(40, stop=["\x00unused"])))
        return full, one, stop, stopped, unmatched

    full, one, stop, stopped, unmatched = asyncio.run(main())
    assert (full.finish.reason, full.finish.completion_tokens) == ("length", 40)
    assert (one.finish.reason, one.finish.completion_tokens) == ("length", 1)
    assert one.text and full.text.startswith(one.text)
    cut = full.text.index(stop)
    assert stopped.text == full.text[:cut]
    assert (stopped.finish.reason, stopped.finish.stop_sequence) == ("stop", stop)
    assert 0 < stopped.finish.completion_tokens < 40
    assert not any(stop in d for d in stopped.deltas)
    assert (unmatched.text, unmatched.finish.reason, unmatched.finish.stop_sequence) == (full.text, "length", None)


def test_generation_ends_before_the_context_overflows(chat_model: lib.LlamaModel) -> None:
    async def main() -> tuple[int, dict[str, Result]]:
        with running(chat_model, n_ctx=256, parallel=1) as engine:
            n_ctx = engine.n_ctx
            prompt = chat_model.tokenize("Fill the whole context")
            out = {
                "unbounded": await collect(engine.submit(prompt, greedy(None))),
                "huge_budget": await collect(engine.submit(prompt, greedy(100_000))),
                "one_left": await collect(engine.submit(filler(n_ctx - 1), greedy(None))),
                "exact": await collect(engine.submit(filler(n_ctx), greedy(5))),
                "over": await collect(engine.submit(filler(n_ctx + 37), greedy(5))),
                "after": await collect(engine.submit(prompt, greedy(6))),
            }
            assert (engine.active, engine.queued) == (0, 0)
        return n_ctx, out

    n_ctx, out = asyncio.run(main())
    unbounded = out["unbounded"].finish
    assert unbounded.reason == "length"
    assert unbounded.prompt_tokens + unbounded.completion_tokens == n_ctx  # filled, never overflowed
    assert out["huge_budget"].text == out["unbounded"].text
    assert out["huge_budget"].finish.completion_tokens == unbounded.completion_tokens
    assert (out["one_left"].finish.reason, out["one_left"].finish.completion_tokens) == ("length", 1)
    for name, size in (("exact", n_ctx), ("over", n_ctx + 37)):
        finish = out[name].finish
        assert (finish.reason, finish.prompt_tokens, finish.completion_tokens) == ("error", size, 0)
        assert finish.error is not None and str(size) in finish.error and str(n_ctx) in finish.error
        assert out[name].deltas == []
    assert out["after"].finish.completion_tokens == 6 and out["unbounded"].text.startswith(out["after"].text)


def test_prompts_longer_than_the_clamped_batch_are_prefilled_in_chunks(chat_model: lib.LlamaModel) -> None:
    # llama.cpp caps n_batch at the requested n_ctx (and pads n_ctx itself up to 256): the engine
    # must fill batches no larger than what llama.cpp accepts, or llama_decode aborts the process.
    prompts = [filler(100), [1] + [450 - i % 100 for i in range(99)]]

    async def main() -> tuple[int, int, list[Result], list[Result]]:
        with running(chat_model, n_ctx=64, parallel=2, n_batch=512) as engine:
            capacity, n_ctx = engine.context.batch.capacity, engine.n_ctx
            assert capacity == llama_cpp.llama_n_batch(engine.context.ptr)
            chunked = await asyncio.gather(*(collect(engine.submit(p, greedy(20))) for p in prompts))
        with running(chat_model, parallel=1) as reference:
            whole = [await collect(reference.submit(p, greedy(20))) for p in prompts]
        return capacity, n_ctx, chunked, whole

    capacity, n_ctx, chunked, whole = asyncio.run(main())
    assert capacity < 100 < n_ctx
    assert [r.finish.reason for r in chunked] == ["length", "length"]
    assert [r.finish.completion_tokens for r in chunked] == [20, 20]
    assert [r.text for r in chunked] == [r.text for r in whole]


def test_a_batch_smaller_than_the_slot_count_still_serves_every_slot(chat_model: lib.LlamaModel) -> None:
    # An eval batch of 2 with 4 slots: 4 generating sequences need 4 batch entries per step. Writing
    # past the batch used to corrupt memory and abort the process (load API: eval_batch_size=2).
    prompts = [chat_model.tokenize(f"Small batch {i}") for i in range(6)]

    async def main() -> tuple[int, list[Result], list[Result]]:
        with running(chat_model, parallel=4, n_batch=2) as engine:
            capacity = engine.context.batch.capacity
            small = await asyncio.gather(*(collect(engine.submit(p, greedy(12))) for p in prompts))
        with running(chat_model, parallel=1) as reference:
            alone = [await collect(reference.submit(p, greedy(12))) for p in prompts]
        return capacity, small, alone

    capacity, small, alone = asyncio.run(main())
    assert capacity >= 4
    assert [r.finish.completion_tokens for r in small] == [12] * 6
    assert [r.text for r in small] == [r.text for r in alone]


def test_kv_cache_pressure_ends_requests_early_but_keeps_serving(chat_model: lib.LlamaModel) -> None:
    # 4 slots share a 256-cell KV cache; 4 x (33 + 100) tokens do not fit at once.
    prompts = [chat_model.tokenize(f"Request {i} is about words words words words words") for i in range(4)]
    assert all(len(p) * 4 < 256 for p in prompts)

    async def main() -> tuple[int, list[Result], list[Result], list[Result], Result, list[Result]]:
        with running(chat_model, parallel=1) as roomy:
            alone = [await collect(roomy.submit(p, greedy(100))) for p in prompts]
        with running(chat_model, n_ctx=256, parallel=4) as engine:
            n_ctx = engine.n_ctx
            pressed = await asyncio.gather(*(collect(engine.submit(p, greedy(100))) for p in prompts))
            # Prompts that do not fit together either (4 x 100 > 256, nothing shared), plus a queue behind them.
            big = await asyncio.gather(
                *(collect(engine.submit(filler(100 + i, start=23 * i), greedy(10))) for i in range(8))
            )
            assert (engine.active, engine.queued) == (0, 0)
            after = await collect(engine.submit(prompts[0], greedy(100)))
            mixed = await asyncio.gather(*(collect(engine.submit(p, greedy(100))) for p in prompts))
        return n_ctx, alone, pressed, big, after, mixed

    n_ctx, alone, pressed, big, after, mixed = asyncio.run(main())
    assert 4 * (len(prompts[0]) + 100) > n_ctx
    for run in (pressed, big, mixed):
        assert all(r.finish.reason == "length" for r in run)  # never "error"
    # The cache ran out: some requests were ended before their budget ...
    assert any(r.finish.completion_tokens < 100 for r in pressed)
    assert any(r.finish.completion_tokens < 10 for r in big)
    # ... and every request, cut or not, produced exactly the start of what it produces alone.
    for run in (pressed, mixed):
        for result, reference in zip(run, alone, strict=True):
            assert reference.text.startswith(result.text)
            if result.finish.completion_tokens == 100:
                assert result.text == reference.text
    assert after.text == alone[0].text and after.finish.completion_tokens == 100


def test_invalid_grammar_fails_alone_and_leaves_the_cache_consistent(chat_model: lib.LlamaModel) -> None:
    # Regression: the engine trimmed the slot's KV cache before building the sampler chain, so a
    # rejected grammar left the slot claiming tokens it no longer held; the next request sharing the
    # prefix then made llama_decode fail (-1) for every request in the batch.
    prompt = chat_model.tokenize("A shared conversation prefix that the cache keeps around")

    async def main() -> tuple[Result, Result, Result]:
        with running(chat_model, parallel=1) as engine:
            first = await collect(engine.submit(prompt, greedy(10)))
            bad = await collect(engine.submit([*prompt[:3], 300, 301], greedy(10, grammar="root ::= (")))
            again = await collect(engine.submit(prompt, greedy(10)))
        return first, bad, again

    first, bad, again = asyncio.run(main())
    assert bad.finish.reason == "error" and bad.finish.error is not None and "grammar" in bad.finish.error
    assert again.finish.reason == "length", again.finish.error
    assert again.finish.cached_tokens == len(prompt) - 1
    assert again.text == first.text


# -- byte-level output ---------------------------------------------------------------------------------


def reference_tokens(model: lib.LlamaModel, prompt: list[int], max_tokens: int) -> tuple[list[int], bool]:
    """Greedy decoding of one sequence straight through llama_lib: the tokens, and whether EOS ended it."""
    context = lib.LlamaContext(model, context_config(n_ctx=1024, parallel=1))
    chain = build_sampler_chain(model, greedy(None), prompt)
    try:
        batch = context.batch
        batch.clear()
        for pos, token in enumerate(prompt):
            index = batch.add(token, pos, 0, pos == len(prompt) - 1)
        tokens: list[int] = []
        while True:
            assert context.decode() == 0
            token = chain.sample(context, index)
            if model.is_eog(token):
                return tokens, True
            tokens.append(token)
            if len(tokens) == max_tokens:
                return tokens, False
            batch.clear()
            index = batch.add(token, len(prompt) + len(tokens) - 1, 0, True)
    finally:
        chain.close()
        context.close()


def test_byte_tokens_stream_as_whole_characters(byte_model: lib.LlamaModel) -> None:
    prompts = [byte_model.tokenize(f"prompt {i} says") for i in range(12)]
    expected: list[str] = []
    ended_by_eos: list[bool] = []
    for prompt in prompts:
        tokens, eos = reference_tokens(byte_model, prompt, 150)
        pieces = [byte_model.token_bytes(t) for t in tokens]
        assert any(len(p) == 1 and p[0] >= 0x80 for p in pieces)  # raw bytes, not whole characters
        expected.append(b"".join(pieces).decode("utf-8", "replace"))
        ended_by_eos.append(eos)

    async def main() -> tuple[list[Result], list[Result]]:
        one_by_one = []
        for prompt in prompts:  # a fresh engine each: the same batch shapes as the reference decode
            with running(byte_model, n_ctx=1024, parallel=1) as engine:
                one_by_one.append(await collect(engine.submit(prompt, greedy(150))))
        with running(byte_model, parallel=4) as engine:
            together = await asyncio.gather(*(collect(engine.submit(p, greedy(150))) for p in prompts))
        return one_by_one, together

    one_by_one, together = asyncio.run(main())
    for result, text, eos in zip(one_by_one, expected, ended_by_eos, strict=True):
        # Streamed deltas, joined, are exactly the whole byte string decoded at once: no character
        # was split between deltas (that would have produced extra U+FFFD) and none was lost.
        assert result.text == text
        assert result.finish.reason == ("stop" if eos else "length")
    for result in one_by_one + together:
        assert all(result.deltas)
        for delta in result.deltas:
            delta.encode("utf-8")  # raises on a lone surrogate
            assert not any("\ud800" <= c <= "\udfff" for c in delta)
    # The samples really exercised what this test is about.
    assert any(eos for eos in ended_by_eos)
    assert any(c > "\x7f" and c != "\ufffd" for text in expected for c in text)  # valid multi-byte chars
    assert any("\ufffd" in text for text in expected)  # and invalid byte sequences
