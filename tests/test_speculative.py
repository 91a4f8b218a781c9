"""Speculative decoding with draft models (server/engine/speculative.py), in process and over HTTP.

Greedy output must be the same with and without a draft, so the comparisons use F32 weights with flash
attention off (see tests/test_engine.py for why: llama.cpp's CPU kernels are not batch-invariant, and
verifying drafts changes the batch shape). The "same" draft has the target's weights, so it drafts what
the target would pick; the "small" one is a different, smaller model sharing the vocabulary.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from engine_support import TEST_GPU_LAYERS, load_model
from lmkube.server.engine import llama_lib as lib
from lmkube.server.engine.events import Finish, TextDelta
from lmkube.server.engine.generation import GenerationEngine
from lmkube.server.engine.sampling import SamplingParams
from lmkube.server.engine.speculative import Draft, DraftIncompatible, DraftSettings, check_compatible, load_drafter
from prometheus_client.parser import text_string_to_metric_families
from support import ServerProcess

from lmkube.synthetic_gguf import LlamaShape, write_llama_model

SMALL = LlamaShape(n_embd=32, n_layer=1, n_head=2, n_head_kv=1, n_ff=64)
PROMPTS = ["hello world", "the weather is", "one two three four five", "tell me more about the cat",
           "what is the time now", "yes or no"]
TARGET, SAME, DRAFT_SMALL = "acme/spec-target", "acme/spec-same", "acme/spec-small"
ODD_SPECIALS, BIG_VOCAB = "acme/spec-odd", "acme/spec-big"


def write_models(root: Path) -> dict[str, Path]:
    paths = {
        TARGET: write_llama_model(root / TARGET / "spec-target-F32.gguf", dtype="f32", seed=1, name="Spec Target"),
        SAME: write_llama_model(root / SAME / "spec-same-F32.gguf", dtype="f32", seed=1, name="Spec Same"),
        DRAFT_SMALL: write_llama_model(root / DRAFT_SMALL / "spec-small-F32.gguf", dtype="f32", seed=5,
                                       shape=SMALL, name="Spec Small"),
        # Same size, but two token texts differ: drafted ids would mean other text.
        ODD_SPECIALS: write_llama_model(root / ODD_SPECIALS / "spec-odd-F16.gguf", seed=1, name="Spec Odd",
                                        extra_special_tokens=("<|start|>", "<|end|>")),
        BIG_VOCAB: write_llama_model(root / BIG_VOCAB / "spec-big-F16.gguf", seed=1, name="Spec Big",
                                     shape=LlamaShape(n_vocab=1024)),
    }
    return paths


# -- in process ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_models(tmp_path_factory.mktemp("spec-models"))


@pytest.fixture(scope="module")
def target(paths: dict[str, Path]) -> Iterator[lib.LlamaModel]:
    model = load_model(paths[TARGET])
    yield model
    model.close()


CONFIG = lib.ContextConfig(n_ctx=2048, n_seq_max=4, n_batch=512, n_threads=1, flash_attention=False)


@pytest.fixture(scope="module")
def drafters(paths: dict[str, Path], target: lib.LlamaModel) -> Iterator[dict[str, Any]]:
    loaded = {name: load_drafter(name, paths[name], target, CONFIG, TEST_GPU_LAYERS) for name in (SAME, DRAFT_SMALL)}
    yield loaded
    for drafter in loaded.values():
        drafter.close()


@pytest.fixture
def engine(target: lib.LlamaModel) -> Iterator[GenerationEngine]:
    engine = GenerationEngine(target, lib.LlamaContext(target, CONFIG))
    yield engine
    engine.close()


async def generate(engine: GenerationEngine, prompt: str, draft: Draft | None, **params: Any) -> tuple[str, Finish]:
    settings = {"max_tokens": 40, "temperature": 0.0, **params}
    request = engine.submit(engine.model.tokenize(prompt), SamplingParams(**settings), draft)
    parts: list[str] = []
    async for events in request:
        for event in events:
            if isinstance(event, TextDelta):
                parts.append(event.text)
            else:
                return "".join(parts), event
    raise AssertionError("no Finish")


def consistent(finish: Finish) -> None:
    assert finish.draft_total == finish.draft_accepted + finish.draft_rejected + finish.draft_ignored
    assert min(finish.draft_accepted, finish.draft_rejected, finish.draft_ignored) >= 0


def test_greedy_output_is_identical_with_and_without_drafts(engine: GenerationEngine,
                                                            drafters: dict[str, Any]) -> None:
    same = Draft(drafters[SAME], DraftSettings(p_min=0.0))
    small = Draft(drafters[DRAFT_SMALL], DraftSettings(max_tokens=4, p_min=0.0))

    async def main() -> tuple[list[tuple[str, Finish]], list[tuple[str, Finish]]]:
        plain = [await generate(engine, p, None) for p in PROMPTS]
        # Concurrent, mixing the same-weights draft, the small draft and no draft in one batch.
        mixed = await asyncio.gather(*(generate(engine, p, [same, small, None][i % 3]) for i, p in enumerate(PROMPTS)))
        return plain, mixed

    plain, mixed = asyncio.run(main())
    assert [text for text, _ in mixed] == [text for text, _ in plain]
    assert all(f.completion_tokens == 40 and f.reason == "length" for _, f in plain + mixed)
    for i, (_, finish) in enumerate(mixed):
        if i % 3 == 2:
            assert finish.draft_model is None and finish.draft_total == 0
            continue
        assert finish.draft_model == (SAME if i % 3 == 0 else DRAFT_SMALL)
        assert finish.draft_total > 0
        consistent(finish)
    # The same weights draft what the target picks: nearly everything is accepted, and a round of 8 drafts
    # plus the target's own token covers 9 tokens per decode.
    for _, finish in mixed[0::3]:
        assert finish.draft_accepted >= 0.9 * finish.draft_total
        assert finish.draft_accepted >= 30


def test_a_draft_that_never_agrees_backs_off(engine: GenerationEngine, drafters: dict[str, Any]) -> None:
    # The small random draft disagrees with the target nearly always: after three fruitless rounds the slot
    # skips 2, 4, ... 32 steps, so 120 tokens see a handful of rounds instead of one per step.
    small = Draft(drafters[DRAFT_SMALL], DraftSettings(max_tokens=4, p_min=0.0))
    never_sure = Draft(drafters[SAME], DraftSettings(p_min=1.01))  # no draft token is ever likely enough

    async def main() -> list[tuple[str, Finish]]:
        return [await generate(engine, "the weather is", draft, max_tokens=120)
                for draft in (None, small, never_sure)]

    (plain, _), (text, backed_off), (unsure_text, unsure) = asyncio.run(main())
    assert text == unsure_text == plain
    consistent(backed_off)
    rounds = backed_off.draft_rejected + (backed_off.draft_accepted > 0)
    assert backed_off.draft_accepted <= 2 and 3 <= rounds <= 10, backed_off
    assert backed_off.draft_total <= 4 * 10
    assert unsure.draft_total == 0


def test_sampled_output_keeps_the_seeded_stream(engine: GenerationEngine, drafters: dict[str, Any]) -> None:
    """A sampled request accepts drafts only where the target's own draw agrees, one draw per emitted token,
    so with a fixed seed even sampled output matches the run without a draft."""
    draft = Draft(drafters[SAME], DraftSettings(p_min=0.0))

    async def main() -> list[tuple[str, Finish]]:
        return [await generate(engine, p, d, temperature=0.9, seed=7, top_k=0, top_p=1.0, min_p=0.0)
                for p in PROMPTS[:3] for d in (None, draft)]

    results = asyncio.run(main())
    for (plain, _), (drafted, finish) in zip(results[0::2], results[1::2], strict=True):
        assert drafted == plain
        consistent(finish)
        assert finish.draft_total > 0


def test_stops_inside_a_draft_count_the_rest_as_ignored(engine: GenerationEngine, drafters: dict[str, Any]) -> None:
    draft = Draft(drafters[SAME], DraftSettings(max_tokens=16, p_min=0.0))

    async def main() -> tuple[tuple[str, Finish], tuple[str, Finish], tuple[str, Finish]]:
        plain = await generate(engine, "hello world", None, max_tokens=60)
        stop = plain[0][20:23]
        return plain, await generate(engine, "hello world", draft, max_tokens=60, stop=[stop]), \
            await generate(engine, "hello world", draft, max_tokens=7)

    (plain, _), (stopped, finish), (short, limited) = asyncio.run(main())
    assert plain.startswith(stopped) and len(stopped) < len(plain)
    assert finish.reason == "stop"
    consistent(finish)
    assert finish.draft_ignored > 0  # drafted past the stop string, never used
    assert short == "" or plain.startswith(short)
    assert limited.completion_tokens == 7 and limited.reason == "length"
    consistent(limited)
    assert limited.draft_total <= 6  # never drafted past the token budget


def test_full_kv_cache_drops_drafts_and_still_matches(target: lib.LlamaModel, drafters: dict[str, Any]) -> None:
    """Four slots of ~150 tokens in a 256-cell cache: drafts (here up to 16 cells per slot) are dropped first
    and requests end early, but what each did generate is what it generates with room to spare."""
    draft = Draft(drafters[SAME], DraftSettings(max_tokens=16, p_min=0.0))
    prompts = [f"prompt {i} " * 10 for i in range(4)]
    small = GenerationEngine(target, lib.LlamaContext(target, lib.ContextConfig(
        n_ctx=256, n_seq_max=4, n_batch=512, n_threads=1, flash_attention=False)))
    roomy = GenerationEngine(target, lib.LlamaContext(target, CONFIG))

    async def main() -> tuple[list[tuple[str, Finish]], list[tuple[str, Finish]]]:
        crowded = await asyncio.gather(*(generate(small, p, draft if i % 2 else None, max_tokens=120)
                                         for i, p in enumerate(prompts)))
        return crowded, [await generate(roomy, p, None, max_tokens=120) for p in prompts]

    try:
        crowded, alone = asyncio.run(main())
    finally:
        small.close()
        roomy.close()
    assert any(f.completion_tokens < 120 for _, f in crowded)  # the cache really ran out
    for (text, finish), (full, _) in zip(crowded, alone, strict=True):
        assert finish.reason == "length" and finish.error is None
        assert full.startswith(text)
        consistent(finish)


def test_vocabulary_compatibility(paths: dict[str, Path], target: lib.LlamaModel) -> None:
    for name, reason in ((ODD_SPECIALS, "token 259 differs"), (BIG_VOCAB, "vocabulary sizes differ")):
        draft = lib.LlamaModel(paths[name])
        try:
            with pytest.raises(DraftIncompatible, match=reason):
                check_compatible(target, draft, name)
        finally:
            draft.close()
    small = lib.LlamaModel(paths[DRAFT_SMALL])
    try:
        check_compatible(target, small, DRAFT_SMALL)  # another model, same vocabulary: fine
    finally:
        small.close()


# -- over HTTP ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def srv(start_server: Callable[..., ServerProcess], tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    root = tmp_path_factory.mktemp("spec-server-models")
    write_models(root)
    server = start_server(root, "--parallel", "4", "--threads", "1", "--no-jit")
    for identifier, extra in (("plain", {}), ("drafted", {"draft_model": SAME})):
        response = httpx.post(f"{server.base_url}/api/v1/models/load", timeout=60, json={
            "model": TARGET, "identifier": identifier, "flash_attention": False, "context_length": 1024, **extra})
        assert response.status_code == 200, response.text
    return server


def chat(server: ServerProcess, model: str, content: str, **extra: Any) -> httpx.Response:
    return httpx.post(f"{server.base_url}/v1/chat/completions", timeout=60, json={
        "model": model, "messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 32,
        **extra})


def test_openai_chat_with_draft_matches_plain_and_reports_stats(srv: ServerProcess) -> None:
    async def main() -> list[Any]:
        client = openai.AsyncOpenAI(base_url=f"{srv.base_url}/v1", api_key="x", max_retries=0, timeout=60)
        try:
            calls = []
            for i, prompt in enumerate(PROMPTS[:4]):
                extra = {"draft_model": [SAME, DRAFT_SMALL][i % 2], "draft_p_min": 0.0} if i < 2 else {}
                calls.append(client.chat.completions.with_raw_response.create(
                    model="plain", messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=32,
                    extra_body=extra))
            return [r.parse() for r in await asyncio.gather(*calls)]
        finally:
            await client.close()

    drafted = asyncio.run(main())
    for prompt, completion in zip(PROMPTS[:4], drafted, strict=True):
        plain = chat(srv, "plain", prompt).json()
        assert "stats" not in plain
        assert completion.choices[0].message.content == plain["choices"][0]["message"]["content"]
    stats = [getattr(c, "model_extra", {}).get("stats") for c in drafted]
    assert stats[2] is None and stats[3] is None
    assert stats[0]["draft_model"] == SAME and stats[1]["draft_model"] == DRAFT_SMALL
    for s in stats[:2]:
        assert s["total_draft_tokens_count"] == (s["accepted_draft_tokens_count"] + s["rejected_draft_tokens_count"]
                                                 + s["ignored_draft_tokens_count"])
        assert s["total_draft_tokens_count"] > 0 and s["tokens_per_second"] > 0 and s["time_to_first_token"] > 0
    assert stats[0]["accepted_draft_tokens_count"] >= 0.9 * stats[0]["total_draft_tokens_count"]


def test_draft_from_load_config_and_other_endpoints(srv: ServerProcess) -> None:
    plain = chat(srv, "plain", "hello world").json()
    loaded = chat(srv, "drafted", "hello world").json()  # the instance's load-time draft, no field needed
    assert loaded["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]
    assert loaded["stats"]["draft_model"] == SAME and loaded["stats"]["accepted_draft_tokens_count"] > 0

    native = httpx.post(f"{srv.base_url}/api/v1/chat", timeout=60, json={
        "model": "plain", "input": "hello world", "temperature": 0, "max_output_tokens": 32, "draft_model": SAME,
        "store": False}).json()
    stats = native["stats"]
    assert native["output"][-1]["content"] == plain["choices"][0]["message"]["content"]
    assert stats["draft_model"] == SAME and stats["total_output_tokens"] == 32
    assert stats["total_draft_tokens_count"] == sum(stats[f"{k}_draft_tokens_count"]
                                                    for k in ("accepted", "rejected", "ignored"))

    body = {"model": "plain", "prompt": "one two three", "temperature": 0, "max_tokens": 24}
    text = httpx.post(f"{srv.base_url}/v1/completions", timeout=60, json=body).json()
    fast = httpx.post(f"{srv.base_url}/v1/completions", timeout=60, json={**body, "draft_model": SAME}).json()
    assert fast["choices"][0]["text"] == text["choices"][0]["text"]
    assert fast["stats"]["draft_model"] == SAME

    v0 = httpx.post(f"{srv.base_url}/api/v0/chat/completions", timeout=60, json={
        "model": "plain", "messages": [{"role": "user", "content": "hello world"}], "temperature": 0,
        "max_tokens": 32, "draft_model": SAME}).json()
    assert v0["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]
    assert v0["stats"]["draft_model"] == SAME and v0["stats"]["stop_reason"] == "maxPredictedTokensReached"


def test_bad_draft_models_are_refused_in_each_family_shape(srv: ServerProcess) -> None:
    for name, status in ((ODD_SPECIALS, 400), (BIG_VOCAB, 400), ("acme/no-such-draft", 404)):
        response = chat(srv, "plain", "hi", draft_model=name)
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["param"] == "draft_model" and name in error["message"]
        native = httpx.post(f"{srv.base_url}/api/v1/chat", timeout=60,
                            json={"model": "plain", "input": "hi", "draft_model": name})
        assert native.status_code == status, native.text
        assert name in native.json()["error"]["message"]
    streaming = httpx.post(f"{srv.base_url}/api/v1/chat", timeout=60,
                           json={"model": "plain", "input": "hi", "draft_model": "acme/nope", "stream": True})
    assert streaming.status_code == 404 and streaming.json()["error"]["param"] == "draft_model"
    response = httpx.post(f"{srv.base_url}/api/v1/models/load", timeout=60,
                          json={"model": TARGET, "identifier": "odd", "draft_model": ODD_SPECIALS})
    assert response.status_code == 400 and "token 259 differs" in response.json()["error"]["message"]
    response = httpx.post(f"{srv.base_url}/api/v1/models/load", timeout=60,
                          json={"model": TARGET, "identifier": "odd", "draft_model": "acme/nope"})
    assert response.status_code == 404, response.text
    assert [i for i in httpx.get(f"{srv.base_url}/api/v1/instances").json()["instances"] if i["id"] == "odd"] == []


def test_streaming_with_draft_and_disconnect_frees_the_slot(srv: ServerProcess) -> None:
    body = {"model": "plain", "messages": [{"role": "user", "content": "tell me more"}], "temperature": 0,
            "stream": True, "draft_model": SAME, "draft_p_min": 0.0, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{srv.base_url}/v1/chat/completions", timeout=60,
                      json={**body, "max_tokens": 32}) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    assert '"draft_model":"acme/spec-same"' in lines[-2]  # the usage chunk carries the stats
    streamed = "".join(httpx.Response(200, content=line[6:]).json()["choices"][0]["delta"].get("content", "")
                       for line in lines[:-2] if '"choices":[{' in line)
    assert streamed == chat(srv, "plain", "tell me more").json()["choices"][0]["message"]["content"]

    with httpx.stream("POST", f"{srv.base_url}/v1/chat/completions", timeout=60, json=body) as response:
        seen = 0
        for line in response.iter_lines():  # no max_tokens: it would run to the end of the context
            seen += line.startswith("data: ")
            if seen >= 5:
                break
    deadline = time.monotonic() + 20
    while True:
        [state] = [i for i in httpx.get(f"{srv.base_url}/api/v1/instances").json()["instances"] if i["id"] == "plain"]
        if state["active"] == 0 and state["queued"] == 0:
            break
        assert time.monotonic() < deadline, state
        time.sleep(0.05)
    assert chat(srv, "plain", "hi", draft_model=SAME).status_code == 200


def draft_counters(server: ServerProcess, model: str) -> dict[str, float]:
    """lmkube_draft_tokens_total of one instance, by outcome."""
    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    return {sample.labels["outcome"]: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "lmkube_draft_tokens_total" and sample.labels["model"] == model}


def test_metrics_count_drafted_tokens_by_outcome(srv: ServerProcess) -> None:
    before = draft_counters(srv, "plain")
    stats = chat(srv, "plain", "the weather is", draft_model=DRAFT_SMALL, draft_p_min=0.0).json()["stats"]
    after = draft_counters(srv, "plain")
    assert stats["total_draft_tokens_count"] > 0
    for outcome in ("accepted", "rejected", "ignored"):
        assert after[outcome] - before[outcome] == stats[f"{outcome}_draft_tokens_count"], (outcome, before, after)

    # A client that goes away mid-stream never reads the closing event; its drafts are counted all the same.
    body = {"model": "plain", "messages": [{"role": "user", "content": "one two"}], "temperature": 0,
            "stream": True, "draft_model": SAME, "draft_p_min": 0.0}
    with httpx.stream("POST", f"{srv.base_url}/v1/chat/completions", timeout=60, json=body) as response:
        for seen, _ in enumerate(response.iter_lines()):
            if seen >= 6:
                break
    deadline = time.monotonic() + 20
    while sum(draft_counters(srv, "plain").values()) == sum(after.values()):
        assert time.monotonic() < deadline, "the abandoned request's drafts were never counted"
        time.sleep(0.05)


def test_responses_and_messages_take_a_draft_model(srv: ServerProcess) -> None:
    """`draft_model` (and the draft knobs) through the official SDKs' extra_body: same greedy text, stats as
    an extra top-level key, and an unknown or incompatible draft refused in each family's error shape."""
    drafting = {"draft_model": SAME, "draft_p_min": 0.0, "draft_max": 6}
    oai = openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key="x", max_retries=0, timeout=60)
    claude = anthropic.Anthropic(base_url=srv.base_url, api_key="x", max_retries=0, timeout=60)
    try:
        def respond(**extra: Any) -> Any:
            return oai.responses.create(model="plain", input="tell me more about the cat", temperature=0,
                                        max_output_tokens=32, store=False, extra_body=extra or None)

        def message(**extra: Any) -> Any:
            # temperature is no longer among the SDK's arguments; the API still takes it.
            return claude.messages.create(model="plain", max_tokens=32, extra_body={"temperature": 0, **extra},
                                          messages=[{"role": "user", "content": "what is the time now"}])

        plain, fast = respond(), respond(**drafting)
        assert fast.output_text == plain.output_text and fast.output_text
        assert (plain.model_extra or {}).get("stats") is None
        stats = fast.model_extra["stats"]
        assert stats["draft_model"] == SAME and stats["accepted_draft_tokens_count"] > 0
        assert stats["total_draft_tokens_count"] == sum(stats[f"{k}_draft_tokens_count"]
                                                        for k in ("accepted", "rejected", "ignored"))

        plain_msg, fast_msg = message(), message(**drafting)
        assert fast_msg.content[0].text == plain_msg.content[0].text and fast_msg.content[0].text
        assert (plain_msg.model_extra or {}).get("stats") is None
        assert fast_msg.model_extra["stats"]["draft_model"] == SAME
        assert fast_msg.model_extra["stats"]["accepted_draft_tokens_count"] > 0
        with claude.messages.stream(model="plain", max_tokens=32, extra_body={"temperature": 0, "draft_model": SAME},
                                    messages=[{"role": "user", "content": "what is the time now"}]) as stream:
            assert stream.get_final_text() == plain_msg.content[0].text

        for name, status in (("acme/no-such-draft", 404), (ODD_SPECIALS, 400)):
            with pytest.raises(openai.APIStatusError) as caught:
                respond(draft_model=name)
            assert caught.value.status_code == status and caught.value.body["param"] == "draft_model"
            assert name in caught.value.body["message"]
            with pytest.raises(anthropic.APIStatusError) as refused:
                message(draft_model=name)
            assert refused.value.status_code == status
            assert refused.value.body["type"] == "error" and name in refused.value.body["error"]["message"]
            assert refused.value.body["error"]["type"] == ("not_found_error" if status == 404
                                                           else "invalid_request_error")
    finally:
        oai.close()
        claude.close()
