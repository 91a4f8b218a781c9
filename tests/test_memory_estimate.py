"""The memory estimate (server/runtime/estimate.py) against llama.cpp itself and a real server's RSS.

1. Component by component against the buffer sizes llama.cpp reports when it creates a context (weights,
   KV cache, output and compute buffers) over shapes and settings the formulas were not fitted on.
2. As a whole against the resident memory a real `lmkube serve` process gains by loading a ~64 MiB model
   with a 16k context, within ±15 %. Weights are mmapped: llama.cpp touches every page while loading, so
   they count in the RSS (RssFile) right away. The compute buffer is reserved but only touched as far as a
   batch uses it; the load uses a small batch so that this untouched part stays a few MiB.
3. With a draft model (speculative decoding): the draft's own weights and context, sized the way the
   instance creates them, first against llama.cpp's buffers, then in the RSS of a load with a draft.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from lmkube.server.engine import llama_lib as lib
from lmkube.server.engine.speculative import load_drafter
from lmkube.server.runtime.estimate import MIB, GpuOffload, MemoryEstimate, estimate_memory
from lmkube.server.store.gguf_header import read_gguf_header
from support import ServerProcess

from lmkube.synthetic_gguf import LlamaShape, write_llama_model

BUFFER_LINE = re.compile(r"\b(?P<what>model|output|KV|compute) buffer size =\s+(?P<mib>[\d.]+) MiB")
BIG = "acme/mem-chat"
HUGE = "acme/huge-context"
DRAFT = "acme/mem-draft"
# A draft sharing mem-chat's vocabulary, trained on a shorter context than its target's (it gets the target's).
DRAFT_SHAPE = LlamaShape(n_vocab=8000, n_embd=256, n_layer=4, n_head=4, n_head_kv=2, n_ff=768, n_ctx_train=4096)


class _BufferLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.sizes: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if (match := BUFFER_LINE.search(record.getMessage())) is not None:
            self.sizes[match["what"]] = self.sizes.get(match["what"], 0.0) + float(match["mib"])


@pytest.fixture()
def buffer_log() -> Iterator[_BufferLog]:
    logger = logging.getLogger(lib.__name__)
    handler, level = _BufferLog(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)  # llama.cpp's log lines reach Python logging at debug level
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.mark.parametrize(("shape", "settings"), [
    (LlamaShape(n_vocab=4000, n_embd=384, n_layer=4, n_head=6, n_head_kv=2, n_ff=1024, n_ctx_train=16384),
     [(4096, 1, 512, False), (8192, 4, 512, True), (8192, 2, 64, False), (2048, 8, 256, True)]),
    (LlamaShape(n_vocab=12000, n_embd=256, n_layer=6, n_head=4, n_head_kv=4, n_ff=2048, n_ctx_train=16384),
     [(4096, 1, 512, True), (6000, 4, 128, False), (16384, 1, 512, True)]),
])
def test_components_match_llama_cpp_buffers(tmp_path: Path, buffer_log: _BufferLog, shape: LlamaShape,
                                            settings: list[tuple[int, int, int, bool]]) -> None:
    path = write_llama_model(tmp_path / "model-F16.gguf", shape, dtype="f16", seed=5)
    model = lib.LlamaModel(path)
    try:
        weights_mib = buffer_log.sizes["model"]
        for n_ctx, parallel, batch, flash in settings:
            buffer_log.sizes.clear()
            context = lib.LlamaContext(model, lib.ContextConfig(n_ctx=n_ctx, n_seq_max=parallel, n_batch=batch,
                                                                flash_attention=flash, n_threads=1))
            context.close()
            real = dict(buffer_log.sizes)
            estimate = estimate_memory([path], context_length=n_ctx, default_context=4096, parallel=parallel,
                                       eval_batch_size=batch, flash_attention=flash)
            parts = estimate.breakdown
            where = f"n_ctx={n_ctx} parallel={parallel} batch={batch} flash={flash}: {real} vs {parts}"
            assert parts.weights / MIB == pytest.approx(weights_mib, abs=0.01), where
            assert parts.kv_cache / MIB == pytest.approx(real["KV"], abs=0.01), where
            assert parts.output / MIB == pytest.approx(real["output"], abs=0.05), where
            assert abs(parts.compute / MIB - real["compute"]) <= max(0.15 * real["compute"], 2.0), where
    finally:
        model.close()


def test_draft_components_match_llama_cpp_buffers(tmp_path: Path, buffer_log: _BufferLog) -> None:
    """The draft's share: its weights, and a context with the target's settings (not capped at its own
    trained context), as instance.py creates it through load_drafter."""
    target_path = write_llama_model(tmp_path / "target-F16.gguf", dtype="f16", seed=5, shape=LlamaShape(
        n_vocab=4000, n_embd=384, n_layer=4, n_head=6, n_head_kv=2, n_ff=1024, n_ctx_train=16384))
    draft_path = write_llama_model(tmp_path / "draft-F16.gguf", dtype="f16", seed=6, shape=LlamaShape(
        n_vocab=4000, n_embd=128, n_layer=2, n_head=4, n_head_kv=1, n_ff=256, n_ctx_train=1024))
    target = lib.LlamaModel(target_path)
    try:
        for n_ctx, parallel, batch, flash in [(6000, 4, 128, False), (4096, 2, 512, True)]:
            buffer_log.sizes.clear()
            config = lib.ContextConfig(n_ctx=n_ctx, n_seq_max=parallel, n_batch=batch, flash_attention=flash,
                                       n_threads=1)
            load_drafter("draft", draft_path, target, config, 0).close()
            real = dict(buffer_log.sizes)
            kwargs: dict[str, Any] = dict(context_length=n_ctx, default_context=4096, parallel=parallel,
                                          eval_batch_size=batch, flash_attention=flash)
            plain = estimate_memory([target_path], **kwargs)
            drafted = estimate_memory([target_path], draft_files=[draft_path], **kwargs)
            draft = drafted.draft
            assert draft is not None and plain.draft is None
            parts, where = draft.breakdown, f"n_ctx={n_ctx} parallel={parallel}: {real} vs {draft.breakdown}"
            assert draft.context_length == plain.context_length > 1024, where
            assert parts.weights / MIB == pytest.approx(real["model"], abs=0.01), where
            assert parts.kv_cache / MIB == pytest.approx(real["KV"], abs=0.01), where
            assert parts.output / MIB == pytest.approx(real["output"], abs=0.05), where
            assert abs(parts.compute / MIB - real["compute"]) <= max(0.15 * real["compute"], 2.0), where
            assert drafted.total_bytes == plain.total_bytes + draft.total_bytes
            assert drafted.gpu_bytes == plain.gpu_bytes == 0 and drafted.breakdown == plain.breakdown
            assert drafted.as_dict()["draft"]["total_bytes"] == draft.total_bytes
    finally:
        target.close()


@pytest.fixture(scope="module")
def srv(
    start_server: Callable[..., ServerProcess], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    models = tmp_path_factory.mktemp("estimate-models")
    write_llama_model(models / "acme" / "mem-chat" / "mem-chat-F16.gguf", dtype="f16", seed=6, name="Mem Chat",
                      shape=LlamaShape(n_vocab=8000, n_embd=512, n_layer=8, n_head=8, n_head_kv=4, n_ff=1536,
                                       n_ctx_train=32768))
    write_llama_model(models / "acme" / "huge-context" / "huge-context-F16.gguf", dtype="f16", seed=7,
                      name="Huge Context", shape=LlamaShape(n_ctx_train=1 << 28))
    write_llama_model(models / "acme" / "mem-draft" / "mem-draft-F16.gguf", dtype="f16", seed=8, name="Mem Draft",
                      shape=DRAFT_SHAPE)
    server = start_server(models, "--no-jit", "--threads", "1")
    yield server
    server.stop()


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def measured_load(srv: ServerProcess, load: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """(the estimate_only answer for `load`, the RSS the server process gained by doing it); unloads it."""
    identifier = load.get("identifier", load["model"])
    with srv.client() as client:
        # Warm the process up first (llama.cpp backend, thread pool, code paths) with a small load of the
        # other model, so the measured growth is the big load's own.
        warm = client.post("/api/v1/models/load", json={"model": HUGE, "context_length": 512, "parallel": 1})
        assert warm.status_code == 200, warm.text
        assert client.post("/v1/completions", json={"model": HUGE, "prompt": "hi", "max_tokens": 2}).status_code == 200
        assert client.post("/api/v1/models/unload", json={"instance_id": HUGE}).status_code == 200

        answer = client.post("/api/v1/models/load", json={**load, "estimate_only": True})
        assert answer.status_code == 200, answer.text
        estimate = answer.json()
        before = rss_bytes(srv.process.pid)
        loaded = client.post("/api/v1/models/load", json=load)
        assert loaded.status_code == 200, loaded.text
        done = client.post("/v1/completions", json={"model": identifier, "prompt": "warm up the graph",
                                                    "max_tokens": 8})
        assert done.status_code == 200, done.text
        assert ("stats" in done.json()) == ("draft_model" in load)  # the draft ran (its graphs are built)
        grown = rss_bytes(srv.process.pid) - before
        instances = client.get("/api/v1/instances").json()["instances"]
        client.post("/api/v1/models/unload", json={"instance_id": identifier})
    assert [i["context_length"] for i in instances if i["id"] == identifier] == [estimate["context_length"]]
    return estimate, grown


RSS_LOAD = {"model": BIG, "context_length": 16384, "parallel": 2, "eval_batch_size": 64, "flash_attention": True}


def test_rss_of_a_real_load_is_within_15_percent(srv: ServerProcess) -> None:
    estimate, grown = measured_load(srv, RSS_LOAD)
    total = estimate["estimate"]["total_bytes"]
    assert estimate["context_length"] == 16384
    print(f"estimate {total / MIB:.1f} MiB ({estimate['estimate']['breakdown']}), RSS grew {grown / MIB:.1f} MiB")
    assert abs(grown - total) <= 0.15 * total, (grown / MIB, total / MIB, estimate)


def test_rss_of_a_load_with_a_draft_model_is_within_15_percent(srv: ServerProcess) -> None:
    """The draft's weights and its own 16k-token context (past its trained 4k) are in the estimate, and in
    the RSS: the draft runs in the completion that warms the graphs up, since the load names it."""
    estimate, grown = measured_load(srv, {**RSS_LOAD, "identifier": "with-draft", "draft_model": DRAFT})
    with srv.client() as client:
        plain = client.post("/api/v1/models/load", json={**RSS_LOAD, "estimate_only": True}).json()["estimate"]
    total, draft = estimate["estimate"]["total_bytes"], estimate["estimate"]["draft"]
    assert estimate["draft_model"] == f"{DRAFT}@f16"
    assert total == plain["total_bytes"] + draft["total_bytes"]
    assert estimate["estimate"]["breakdown"] == plain["breakdown"]
    assert draft["breakdown"]["kv_cache"] == 16384 * 4 * 2 * (64 + 64) * 2  # the target's context, not 4096
    print(f"estimate {total / MIB:.1f} MiB (draft {draft['total_bytes'] / MIB:.1f} MiB: {draft['breakdown']}), "
          f"RSS grew {grown / MIB:.1f} MiB")
    assert abs(grown - total) <= 0.15 * total, (grown / MIB, total / MIB, estimate)


def test_estimate_only_loads_nothing_and_says_whether_it_fits(srv: ServerProcess) -> None:
    with srv.client() as client:
        small = client.post("/api/v1/models/load", json={"model": BIG, "estimate_only": True, "parallel": 4}).json()
        huge = client.post("/api/v1/models/load", json={"model": HUGE, "estimate_only": True,
                                                         "context_length": 1 << 28}).json()
        missing = client.post("/api/v1/models/load", json={"model": "acme/nothing", "estimate_only": True})
        no_draft = client.post("/api/v1/models/load", json={"model": BIG, "estimate_only": True,
                                                             "draft_model": "acme/nothing"})
        assert client.get("/api/v1/instances").json()["instances"] == []

    assert small["status"] == "estimated" and small["model"] == f"{BIG}@f16" and small["fits"] is True
    assert small["context_length"] == 4096 and small["parallel"] == 4  # the server's default context
    parts = small["estimate"]["breakdown"]
    assert parts["kv_cache"] == 8 * 4096 * 4 * (64 + 64) * 2  # one unified cache, not one per slot
    assert small["estimate"]["total_bytes"] == sum(parts.values())
    assert small["estimate"]["gpu_bytes"] == 0 and small["gpu_offload"]["layers"] == 0  # a CPU build
    assert small["available"]["ram_bytes"] > 0

    assert huge["context_length"] == 1 << 28
    assert huge["estimate"]["total_bytes"] > huge["available"]["ram_bytes"]
    assert huge["fits"] is False
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    assert no_draft.status_code == 404 and no_draft.json()["error"]["param"] == "draft_model"
    assert "draft" not in small["estimate"] and "draft_model" not in small


def test_gpu_offload_splits_layers_like_llama_cpp(tmp_path: Path) -> None:
    """Placement rules (no GPU here to measure): the last blocks go first, the output layer counts as one
    more, the KV cache follows its layer unless its offload is off, and the input embedding stays on the host."""
    shape = LlamaShape(n_vocab=1000, n_embd=128, n_layer=4, n_head=4, n_head_kv=2, n_ff=256, n_ctx_train=4096)
    path = write_llama_model(tmp_path / "gpu-F16.gguf", shape, dtype="f16", seed=8)
    tensors = {t.name: t.nbytes or 0 for t in read_gguf_header(path).tensors}
    block = sum(size for name, size in tensors.items() if name.startswith("blk.0."))
    output = tensors["output.weight"] + tensors["output_norm.weight"]
    kv_per_layer = 4096 * 2 * (32 + 32) * 2

    def estimate(gpu: GpuOffload, *, offload_kv_cache: bool = True) -> MemoryEstimate:
        return estimate_memory([path], context_length=4096, default_context=4096, parallel=1, gpu=gpu,
                               gpu_supported=True, offload_kv_cache=offload_kv_cache)

    off, full, part = estimate("off"), estimate("max"), estimate(0.6)  # 0.6 × (4 + 1) = 3: output + 2 blocks
    assert (off.gpu_layers, off.gpu_bytes) == (0, 0)
    assert (full.gpu_layers, part.gpu_layers) == (5, 3)
    compute = off.breakdown.compute
    assert full.gpu_bytes == 4 * block + output + 4 * kv_per_layer + compute
    assert part.gpu_bytes == 2 * block + output + 2 * kv_per_layer + compute
    assert estimate("max", offload_kv_cache=False).gpu_bytes == full.gpu_bytes - 4 * kv_per_layer
    # Fully offloaded, the host keeps the input embedding and a small buffer for it; partly, a full compute buffer.
    assert full.host_bytes < off.host_bytes - full.gpu_bytes + compute
    assert part.breakdown.compute == 2 * compute
    assert full.breakdown.weights == off.breakdown.weights  # an untied output is not copied
