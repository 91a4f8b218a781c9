"""The Python half of scripts/gpu-check.sh (docs/gpu.md): the llama-shaped models, the memory estimate against
measured memory, and the summary. The benchmark against llama-server is bench/gpu_bench.py.

    python bench/gpu_check.py sources|models|memory|bench|summary --mode gpu|cpu --work DIR --out DIR

Each subcommand adds its part to DIR(out)/results.json, so a failed or timed-out step leaves the others' results.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from servers import READY_TIMEOUT_S, Server, free_port, http_json, running, wait_ready

from lmkube.synthetic_gguf import LlamaShape, write_llama_model

MIB = 1 << 20


@dataclass(frozen=True)
class CheckModel:
    name: str  # also the lmkube model key `gpu-check/<name>`
    shape: LlamaShape
    like: str  # the real model whose shape it copies

    @property
    def key(self) -> str:
        return f"gpu-check/{self.name}"


@dataclass(frozen=True)
class Plan:
    """What one mode runs: the models, the memory check's contexts and the benchmark's streams."""

    models: tuple[CheckModel, ...]
    contexts: tuple[int, ...]  # the memory check loads each model at each of these
    memory_parallel: int
    streams: tuple[int, ...]
    tokens: int  # per benchmark request
    bench_ctx: int
    repeat: int
    threads: int
    gpu: bool


# Untied output heads and every row a multiple of 256, so Q4_K_M needs no fallback quant types.
GPU_PLAN = Plan(
    models=(
        CheckModel("llama-1b", LlamaShape(n_vocab=32000, n_embd=2048, n_layer=22, n_head=32, n_head_kv=4, n_ff=5632,
                                          n_ctx_train=32768), "TinyLlama-1.1B"),
        CheckModel("llama-8b", LlamaShape(n_vocab=128256, n_embd=4096, n_layer=32, n_head=32, n_head_kv=8,
                                          n_ff=14336, n_ctx_train=32768), "Llama-3-8B"),
    ),
    contexts=(8192, 32768), memory_parallel=4, streams=(1, 16, 64), tokens=64, bench_ctx=16384, repeat=2,
    threads=8, gpu=True,
)
# Small enough for two busy cores: the same steps, the sizes shrunk. One thread per server: two spinning llama.cpp
# threads collapse whenever anything else wants a core (bench/README.md).
CPU_PLAN = Plan(
    models=(
        CheckModel("llama-tiny", LlamaShape(n_vocab=2048, n_embd=256, n_layer=4, n_head=4, n_head_kv=2, n_ff=768,
                                            n_ctx_train=8192), "nothing (CPU run)"),
        CheckModel("llama-small", LlamaShape(n_vocab=4096, n_embd=512, n_layer=6, n_head=8, n_head_kv=2, n_ff=1536,
                                             n_ctx_train=8192), "nothing (CPU run)"),
    ),
    contexts=(1024, 4096), memory_parallel=4, streams=(1, 2, 4), tokens=16, bench_ctx=2048, repeat=2, threads=1,
    gpu=False,
)


@dataclass(frozen=True)
class Paths:
    work: Path
    out: Path

    @property
    def bin(self) -> Path:
        return self.work / "build" / "bin"  # llama-server, llama-quantize (scripts/gpu-check.sh's build)

    @property
    def sources(self) -> Path:
        return self.work / "sources"

    @property
    def models(self) -> Path:
        return self.work / "models"

    def model_file(self, model: CheckModel) -> Path:
        return self.models / "gpu-check" / model.name / f"{model.name}-Q4_K_M.gguf"

    def source_file(self, model: CheckModel) -> Path:
        return self.sources / f"{model.name}-F16.gguf"


# ------------------------------------------------------------------------------------------------------ results


def update_results(paths: Paths, part: str, value: Any) -> None:
    file = paths.out / "results.json"
    results = json.loads(file.read_text()) if file.exists() else {}
    results[part] = value
    file.write_text(json.dumps(results, indent=1))


def load_results(paths: Paths) -> dict[str, Any]:
    file = paths.out / "results.json"
    return json.loads(file.read_text()) if file.exists() else {}


# ------------------------------------------------------------------------------------------------------- models


def write_sources(plan: Plan, paths: Paths) -> None:
    """The F16 random-weight files (numpy and gguf only: this runs while llama.cpp compiles)."""
    for model in plan.models:
        target = paths.source_file(model)
        if target.exists():
            continue
        started = time.monotonic()
        write_llama_model(target, model.shape, dtype="f16", name=f"gpu-check {model.name}")
        print(f"{target.name}: {target.stat().st_size / MIB:.0f} MiB in {time.monotonic() - started:.1f} s",
              flush=True)


def quantize(plan: Plan, paths: Paths) -> None:
    rows = []
    for model in plan.models:
        target = paths.model_file(model)
        started = time.monotonic()
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(".tmp")
            subprocess.run([str(paths.bin / "llama-quantize"), str(paths.source_file(model)), str(tmp), "Q4_K_M",
                            str(os.cpu_count() or 1)], check=True, stdout=subprocess.DEVNULL)
            tmp.rename(target)
        s = model.shape
        rows.append({"model": model.key, "like": model.like, "quant": "Q4_K_M", "mib": target.stat().st_size / MIB,
                     "quantize_s": round(time.monotonic() - started, 1), "n_vocab": s.n_vocab, "n_embd": s.n_embd,
                     "n_layer": s.n_layer, "n_head": s.n_head, "n_head_kv": s.n_head_kv, "n_ff": s.n_ff})
        print(rows[-1], flush=True)
    update_results(paths, "models", rows)


# ------------------------------------------------------------------------------------------------------- memory

_BUFFER = re.compile(r"\b(CUDA\d+|CUDA_Host|CPU(?:_Mapped|_REPACK)?)\s+(model|KV|compute|output)\s+buffer size\s*="
                     r"\s*([\d.]+)\s*MiB")


def llama_buffers(log_text: str) -> dict[str, float]:
    """llama.cpp's own buffer sizes from a debug log (MiB, summed per device and kind): the last load's."""
    sizes: dict[str, float] = {}
    for device, kind, mib in _BUFFER.findall(log_text):
        sizes[f"{device} {kind}"] = sizes.get(f"{device} {kind}", 0.0) + float(mib)
    return sizes


def gpu_used_mib(pid: int | None = None) -> float | None:
    """GPU memory in use (MiB): one process's where nvidia-smi reports it per process, else the whole GPU's."""
    if shutil.which("nvidia-smi") is None:
        return None
    if pid is not None:
        apps = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=30).stdout
        for line in apps.splitlines():
            fields = [f.strip() for f in line.split(",")]
            if len(fields) == 2 and fields[0] == str(pid) and fields[1].isdigit():
                return float(fields[1])
        return None
    total = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=30, check=True).stdout
    return float(sum(int(v) for v in total.split()))


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def lmkube_server(paths: Paths, name: str, *, parallel: int, ctx: int, threads: int, debug: bool = False) -> Server:
    port = free_port()
    command = [str(Path(sys.executable).parent / "lmkube"), "serve", "--models-dir", str(paths.models), "--port",
               str(port), "--parallel", str(parallel), "--threads", str(threads), "--ctx-size", str(ctx),
               "--no-jit", "--log-level", "debug" if debug else "warning"]
    return Server("lmkube", command, port, paths.work / "logs" / f"{name}.log")


def load_body(model: CheckModel, ctx: int, parallel: int) -> dict[str, Any]:
    return {"model": model.key, "context_length": ctx, "parallel": parallel, "gpu": "max"}


def measure_memory(plan: Plan, paths: Paths) -> None:
    rows = []
    for model in plan.models:
        for ctx in plan.contexts:
            row: dict[str, Any] = {"model": model.key, "context_length": ctx, "parallel": plan.memory_parallel}
            rows.append(row)
            try:
                row.update(_memory_case(plan, paths, model, ctx))
            except Exception as exc:  # one case failing must not hide the others
                row["error"] = f"{type(exc).__name__}: {exc}"
            print(row, flush=True)
            update_results(paths, "memory", rows)


def _memory_case(plan: Plan, paths: Paths, model: CheckModel, ctx: int) -> dict[str, Any]:
    server = lmkube_server(paths, f"memory-{model.name}-{ctx}", parallel=plan.memory_parallel, ctx=ctx,
                           threads=plan.threads, debug=True)
    gpu_before = gpu_used_mib()
    with running(server):
        wait_ready(server)
        assert server.process is not None
        pid = server.process.pid
        body = load_body(model, ctx, plan.memory_parallel)
        estimate = http_json(f"{server.url}/api/v1/models/load", {**body, "estimate_only": True}, timeout=60)
        process_before = gpu_used_mib(pid) if plan.gpu else rss_mib(pid)
        http_json(f"{server.url}/api/v1/models/load", body, timeout=READY_TIMEOUT_S)
        # One short request, so what a first batch allocates is in use too.
        http_json(f"{server.url}/v1/completions", {"model": model.key, "prompt": "hello world", "max_tokens": 4},
                  timeout=120)
        time.sleep(1)
        process_after = gpu_used_mib(pid) if plan.gpu else rss_mib(pid)
        gpu_after = gpu_used_mib()
    est = estimate["estimate"]
    row: dict[str, Any] = {
        "gpu_layers": estimate["gpu_offload"]["layers"], "total_layers": estimate["gpu_offload"]["total_layers"],
        "estimate_gpu_mib": est["gpu_bytes"] / MIB, "estimate_total_mib": est["total_bytes"] / MIB,
        "breakdown_mib": {k: round(v / MIB, 1) for k, v in est["breakdown"].items()},
        "llama_buffers_mib": llama_buffers(server.log_path.read_text(errors="replace")),
    }
    if plan.gpu:
        # What the process holds (CUDA context and cuBLAS workspace included) and the load's own growth.
        row["measured_process_mib"] = process_after
        row["measured_load_mib"] = (process_after - (process_before or 0.0)) if process_after is not None else None
        row["measured_gpu_delta_mib"] = (gpu_after - gpu_before) if None not in (gpu_after, gpu_before) else None
        measured = next((row[k] for k in ("measured_process_mib", "measured_gpu_delta_mib") if row[k]), None)
        reference = row["estimate_gpu_mib"]
    else:
        row["measured_rss_growth_mib"] = process_after - process_before
        measured, reference = row["measured_rss_growth_mib"], row["estimate_total_mib"]
    # llama.cpp's own account of the same memory: its GPU buffers, or on a CPU run all of its buffers.
    row["llama_buffers_total_mib"] = sum(v for k, v in row["llama_buffers_mib"].items()
                                         if not plan.gpu or (k.startswith("CUDA") and "Host" not in k))
    row["measured_over_estimate"] = round(measured / reference, 3) if measured and reference else None
    ratio = row["measured_over_estimate"]
    row["within_10_percent"] = ratio is not None and abs(ratio - 1) <= 0.1
    return row


# ------------------------------------------------------------------------------------------------------ summary


def summary(plan: Plan, paths: Paths, mode: str) -> str:
    results = load_results(paths)
    lines = [f"# GPU check ({mode} mode)", ""]
    steps = paths.out / "steps.tsv"
    if steps.exists():
        lines += ["| step | rc | seconds | limit |", "|---|---|---|---|"]
        for row in steps.read_text().splitlines()[1:]:
            lines.append("| " + " | ".join(row.split("\t")) + " |")
        lines.append("")
    if env := results.get("environment"):
        lines += [f"- {k}: {v}" for k, v in env.items()] + [""]
    pytest_log = paths.out / "pytest.log"
    if pytest_log.exists():
        tail = [line for line in pytest_log.read_text().splitlines() if line.strip()][-1:]
        lines += [f"Tests: `{tail[0] if tail else 'no output'}`", ""]
    if models := results.get("models"):
        lines += ["| model | shape of | n_embd | layers | heads/kv | n_ff | vocab | Q4_K_M MiB |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {m['model']} | {m['like']} | {m['n_embd']} | {m['n_layer']} | {m['n_head']}/{m['n_head_kv']} | "
                  f"{m['n_ff']} | {m['n_vocab']} | {m['mib']:.0f} |" for m in models]
        lines.append("")
    if memory := results.get("memory"):
        what = "GPU (nvidia-smi, the server process)" if plan.gpu else "RSS growth of the server process"
        goal = ("goal ±10 %" if plan.gpu else "not the goal's measure: RSS counts only the touched part of the "
                "reserved compute buffer and of the mapped weights")
        lines += [f"Memory: estimate against measured {what} ({goal}).", "",
                  f"| model | ctx | layers on GPU | estimate MiB | llama.cpp {'GPU ' if plan.gpu else ''}buffers MiB | "
                  "measured MiB | measured / estimate | within ±10 % |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in memory:
            if "error" in r:
                lines.append(f"| {r['model']} | {r['context_length']} | error: {r['error'][:120]} | | | | | |")
                continue
            est = r["estimate_gpu_mib"] if plan.gpu else r["estimate_total_mib"]
            measured = r.get("measured_process_mib") if plan.gpu else r.get("measured_rss_growth_mib")
            lines.append(f"| {r['model']} | {r['context_length']} | {r['gpu_layers']}/{r['total_layers']} | "
                         f"{est:.0f} | {r['llama_buffers_total_mib']:.0f} | {_num(measured)} | "
                         f"{_num(r['measured_over_estimate'], 3)} | {'yes' if r['within_10_percent'] else 'no'} |")
        lines.append("")
    if bench := results.get("bench"):
        lines += ["Benchmark: lmkube / llama-server (same build), streaming /v1/completions, "
                  f"{plan.tokens} tokens per request.", "",
                  "| model | streams | lmkube agg tok/s | llama-server agg tok/s | ratio | lmkube TTFT p50 ms | "
                  "llama-server TTFT p50 ms | ratio | problems |", "|---|---|---|---|---|---|---|---|---|"]
        for r in bench:
            lines.append(f"| {r['model']} | {r['streams']} | {_num(r['lmkube_tps'])} | {_num(r['server_tps'])} | "
                         f"{_num(r.get('tps_ratio'), 2)} | {_num(r['lmkube_ttft_ms'])} | {_num(r['server_ttft_ms'])} | "
                         f"{_num(r.get('ttft_ratio'), 2)} | {'; '.join(r.get('problems', []))[:200]} |")
        lines.append("")
    return "\n".join(lines)


def _num(value: float | None, digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def environment(paths: Paths, mode: str) -> dict[str, str]:
    import llama_cpp

    env = {"mode": mode, "llama_cpp_python": llama_cpp.__version__,
           "gpu_offload_supported": str(bool(llama_cpp.llama_supports_gpu_offload())), "cpus": str(os.cpu_count())}
    if shutil.which("nvidia-smi"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            env["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                         "--format=csv,noheader"], capture_output=True, text=True,
                                        timeout=30).stdout.strip()
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("command", choices=["sources", "models", "memory", "bench", "summary"])
    parser.add_argument("--mode", choices=["gpu", "cpu"], required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    plan = GPU_PLAN if args.mode == "gpu" else CPU_PLAN
    paths = Paths(args.work, args.out)
    paths.out.mkdir(parents=True, exist_ok=True)
    if args.command == "sources":
        write_sources(plan, paths)
    elif args.command == "models":
        update_results(paths, "environment", environment(paths, args.mode))
        quantize(plan, paths)
    elif args.command == "memory":
        measure_memory(plan, paths)
        rows = load_results(paths).get("memory", [])
        return 1 if any("error" in r for r in rows) else 0
    elif args.command == "bench":
        import gpu_bench

        return gpu_bench.run(plan, paths)
    else:
        text = summary(plan, paths, args.mode)
        (paths.out / "summary.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
