"""The GPU check's benchmark (scripts/gpu-check.sh, docs/gpu.md): lmkube against llama-server built from the same
llama.cpp in the same build, both with every layer on the GPU, at the plan's stream counts (1, 16, 64 on the GPU).
Streaming /v1/completions of one fixed prompt, EOS banned (bench/oai_load.py), so every request streams exactly the
plan's token count; aggregate tokens/s and TTFT p50, and their ratios lmkube / llama-server, per model.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any

from llama_tools import prepare_llama_server
from oai_load import burst
from serve_throughput import RunResult
from servers import READY_TIMEOUT_S, Server, free_port, http_json, running, wait_ready

if TYPE_CHECKING:
    from gpu_check import CheckModel, Paths, Plan


def llama_server(plan: Plan, paths: Paths, model: CheckModel) -> Server:
    port = free_port()
    parallel = max(plan.streams)
    command = [str(paths.bin / "llama-server"), "-m", str(paths.model_file(model)), "--host", "127.0.0.1",
               "--port", str(port), "-c", str(plan.bench_ctx), "-np", str(parallel), "-kvu", "-t", str(plan.threads),
               "-tb", str(plan.threads), "-ngl", "999" if plan.gpu else "0", "--no-webui"]
    return Server("llama-server", command, port, paths.work / "logs" / f"llama-server-{model.name}.log")


def _cell(result: RunResult | None, tokens: int) -> dict[str, Any]:
    if result is None:
        return {"tps": None, "ttft_ms": None, "problems": ["no run"]}
    return {"tps": round(result.agg_tps, 1), "ttft_ms": round(result.ttft(50) * 1000, 1),
            "problems": result.problems(tokens)}


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def bench_model(plan: Plan, paths: Paths, model: CheckModel) -> list[dict[str, Any]]:
    from gpu_check import lmkube_server

    parallel = max(plan.streams)
    lmkube = lmkube_server(paths, f"bench-lmkube-{model.name}", parallel=parallel, ctx=plan.bench_ctx,
                           threads=plan.threads)
    peer = llama_server(plan, paths, model)
    best: dict[tuple[str, int], RunResult] = {}
    with contextlib.ExitStack() as stack:
        stack.enter_context(running(lmkube))
        stack.enter_context(running(peer))
        wait_ready(lmkube)
        body = {"model": model.key, "context_length": plan.bench_ctx, "parallel": parallel, "gpu": "max"}
        http_json(f"{lmkube.url}/api/v1/models/load", body, timeout=READY_TIMEOUT_S)
        lmkube.model = model.key
        prepare_llama_server(peer)
        servers = [lmkube, peer]
        for server in servers:
            warm = asyncio.run(burst(server, 1, plan.tokens))[0]
            if warm.error:
                raise RuntimeError(f"{server.name} warm-up failed: {warm.error}\n{server.log_tail()}")
        for rep in range(plan.repeat):
            for streams in plan.streams:
                for server in servers[rep % 2:] + servers[:rep % 2]:  # alternate who goes first
                    run = RunResult(streams, asyncio.run(burst(server, streams, plan.tokens)))
                    print(f"  {model.name} {server.name} x{streams}: {run.agg_tps:.1f} tok/s, "
                          f"TTFT p50 {run.ttft(50) * 1000:.1f} ms", flush=True)
                    key = (server.name, streams)
                    if key not in best or run.agg_tps > best[key].agg_tps:
                        best[key] = run
    rows = []
    for streams in plan.streams:
        ours, theirs = _cell(best.get(("lmkube", streams)), plan.tokens), _cell(
            best.get(("llama-server", streams)), plan.tokens)
        rows.append({"model": model.key, "streams": streams, "lmkube_tps": ours["tps"], "server_tps": theirs["tps"],
                     "tps_ratio": _ratio(ours["tps"], theirs["tps"]), "lmkube_ttft_ms": ours["ttft_ms"],
                     "server_ttft_ms": theirs["ttft_ms"], "ttft_ratio": _ratio(ours["ttft_ms"], theirs["ttft_ms"]),
                     "problems": [f"lmkube: {p}" for p in ours["problems"]]
                     + [f"llama-server: {p}" for p in theirs["problems"]]})
    return rows


def run(plan: Plan, paths: Paths) -> int:
    from gpu_check import update_results

    rows: list[dict[str, Any]] = []
    failed = False
    for model in plan.models:
        started = time.monotonic()
        try:
            rows += bench_model(plan, paths, model)
        except Exception as exc:  # the next model still runs
            failed = True
            rows.append({"model": model.key, "streams": 0, "lmkube_tps": None, "server_tps": None,
                         "lmkube_ttft_ms": None, "server_ttft_ms": None,
                         "problems": [f"{type(exc).__name__}: {exc}"[:600]]})
        print(f"{model.key}: {time.monotonic() - started:.1f} s", flush=True)
        update_results(paths, "bench", rows)
    return 1 if failed or any(r["problems"] for r in rows) else 0
