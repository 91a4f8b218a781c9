"""The whole benchmark: lmkube vs llama.cpp's `llama-server -np 16 -kvu` vs llama-cpp-python's server, plus
`llama-batched-bench` as the ceiling and a prefix-cache demo, on two generated models, then speculative decoding
(lmkube and llama-server, each with and without the same draft: bench/speculative_bench.py). `make bench` runs it.

    .venv/bin/python bench/run_all.py [--clients 1,4,8,16] [--tokens 64] [--repeat 2] [--draft-model KEY]

The three servers of a model run side by side (idle ones use no CPU) and the runs are interleaved
(every client count, every server, round after round), so other load on the shared box spreads over all of them
and the ratios stay fair. The report goes to bench/results/<UTC timestamp>.md; see bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import speculative_bench
from llama_tools import BenchModel, batched_bench, build_tools, ensure_models, llama_server, prepare_llama_server
from oai_load import burst
from prefix_cache import prefix_demo
from report_all import ModelResult, ServerRuns, report
from serve_throughput import CpuUse, RunResult, client_counts, cpu_sample, print_run
from servers import (
    SERVER_DEPS_INSTALL,
    Server,
    llama_cpp_server,
    lmkube_server,
    prepare_llama_cpp,
    prepare_lmkube,
    running,
    server_deps_missing,
)
from stream_overhead import Cost, loop_costs, thread_cpu_ns

ROOT = Path(__file__).resolve().parent.parent
SPECULATIVE_CLIENTS = (1, 4)  # drafting pays off at low concurrency; a full batch is compute-bound already


@dataclass
class Run(RunResult):
    loop_cpu_s: float = 0.0  # CPU of the server's main thread (lmkube: the asyncio loop: HTTP, JSON, SSE)


def measure(server: Server, clients: int, tokens: int, extra: dict[str, Any] | None, distinct: bool) -> Run:
    pid = server.process.pid if server.process else 0
    before, loop_before = cpu_sample(pid), thread_cpu_ns(pid, pid)
    streams = asyncio.run(burst(server, clients, tokens, extra, distinct=distinct))
    after, loop_after = cpu_sample(pid), thread_cpu_ns(pid, pid)
    return Run(clients, streams, CpuUse.between(before, after), (loop_after - loop_before) / 1e9)


def streaming_costs(server: Server, tokens: int) -> tuple[list[Cost], str | None]:
    """Event-loop CPU per extra streamed token, both OpenAI endpoints at 1 and 16 clients (stream_overhead.py):
    the median slope between 8-token and `tokens`-token bursts, so per-request costs cancel out."""
    try:
        return loop_costs(server, (1, 16), short=8, long=tokens, pairs=3), None
    except (OSError, RuntimeError, ValueError) as exc:
        return [], f"{type(exc).__name__}: {exc}"


@dataclass
class Entry:
    """One column of the table: a server, and the request fields that make it this variant."""

    label: str
    server: Server
    extra: dict[str, Any] | None = None
    repeat: int = 0
    runs: ServerRuns = field(default_factory=lambda: ServerRuns(""))


def bench_model(model: BenchModel, bin_dir: Path, args: argparse.Namespace, logs: Path) -> ModelResult:
    result = ModelResult(model)
    lmkube = lmkube_server(logs)
    lmkube.log_path = logs / f"lmkube-{model.file.stem}.log"
    peer = llama_server(bin_dir, model.file, logs)
    pyserver = llama_cpp_server(model.file, logs)
    pyserver.log_path = logs / f"llama-cpp-python-{model.file.stem}.log"
    entries = [Entry("lmkube", lmkube, repeat=args.repeat), Entry("llama-server", peer, repeat=args.repeat)]
    if args.draft_model:
        entries.append(Entry(f"lmkube draft {args.draft_model}", lmkube, {"draft_model": args.draft_model},
                             args.repeat))
    if not args.skip_python:
        entries.append(Entry("llama-cpp-python", pyserver, repeat=args.python_repeat))
    with contextlib.ExitStack() as stack:
        stack.enter_context(running(lmkube))
        stack.enter_context(running(peer))
        prepare_lmkube(lmkube, model.key)
        prepare_llama_server(peer)
        if not args.skip_python:
            stack.enter_context(running(pyserver))
            prepare_llama_cpp(pyserver)
        for e in entries:
            e.runs.name = e.label
            warm = asyncio.run(burst(e.server, 1, args.tokens, e.extra))[0]
            e.runs.warmup = warm
            if warm.error:
                e.runs.error = f"warm-up failed: {warm.error}"
                print(f"  {e.label}: {e.runs.error}", file=sys.stderr, flush=True)
        live = [e for e in entries if e.runs.error is None]
        for rep in range(max(e.repeat for e in entries)):
            for n in args.clients:
                # Rotate the order so no server always runs right after another's burst.
                for e in live[rep % len(live):] + live[:rep % len(live)]:
                    if rep < e.repeat:
                        run = measure(e.server, n, args.tokens, e.extra, args.distinct_prompts)
                        e.runs.repeats.setdefault(n, []).append(run)
                        print_run(e.label, run, args.tokens)
        result.servers = [e.runs for e in entries]
        if lmkube_entry := next((e for e in entries if e.label == "lmkube" and e.runs.error is None), None):
            print("  streaming overhead ...", flush=True)
            result.loop_costs, result.loop_error = streaming_costs(lmkube_entry.server, args.tokens)
        prompt_tokens = next((e.runs.warmup.prompt_tokens for e in entries if e.runs.warmup
                              and e.runs.warmup.prompt_tokens), 34)
        print(f"  prefix-cache demo ({args.prefix_words} words) ...", flush=True)
        result.prefix = {
            "lmkube": prefix_demo(lmkube, trials=args.prefix_trials, words=args.prefix_words, seed=1000),
            "llama-server": prefix_demo(peer, trials=args.prefix_trials, words=args.prefix_words, seed=2000,
                                        extra={"cache_prompt": True}),
        }
    print("  llama-batched-bench ...", flush=True)
    try:
        result.batched = batched_bench(bin_dir, model.file, prompt_tokens, args.tokens, args.clients)
    except (OSError, RuntimeError, ValueError) as exc:
        result.batched_error = f"{type(exc).__name__}: {exc}"
    return result


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--clients", type=client_counts, default=[1, 4, 8, 16])
    parser.add_argument("--tokens", type=int, default=64, help="max_tokens per request (default 64)")
    parser.add_argument("--repeat", type=int, default=2, help="rounds for lmkube and llama-server (default 2)")
    parser.add_argument("--python-repeat", type=int, default=1,
                        help="rounds for llama-cpp-python's server, which serves one request at a time (default 1)")
    parser.add_argument("--skip-python", action="store_true", help="leave llama-cpp-python's server out")
    parser.add_argument("--models", default="all", help="all, or comma-separated keys of the bench models")
    parser.add_argument("--draft-model", default=None,
                        help="lmkube model key sent as `draft_model` in an extra lmkube column (speculative decoding)")
    parser.add_argument("--distinct-prompts", action="store_true",
                        help="each client its own prompt (they share only BOS) instead of one prompt for all")
    parser.add_argument("--skip-speculative", action="store_true",
                        help="leave out the speculative-decoding table (bench/speculative_bench.py)")
    parser.add_argument("--prefix-words", type=int, default=900, help="shared prefix length (~tokens)")
    parser.add_argument("--prefix-trials", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="default bench/results/<UTC timestamp>.md")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.skip_python and (why := server_deps_missing()) is not None:
        print(f"llama-cpp-python's server dependencies are missing ({why}). Install them with:\n"
              f"    {SERVER_DEPS_INSTALL}\n(or pass --skip-python)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))
    started = time.monotonic()
    bin_dir, build_note = build_tools()
    models = ensure_models(bin_dir)
    if args.models != "all":
        models = [m for m in models if m.key in args.models.split(",")]
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or ROOT / "bench" / "results" / f"{stamp}.md"
    logs = out.parent / "logs"
    load_before = os.getloadavg()
    results = []
    speculative = ""
    try:
        for model in models:
            print(f"== {model.key} ({model.quant})", flush=True)
            results.append(bench_model(model, bin_dir, args, logs))
        if not args.skip_speculative:
            print("== speculative decoding", flush=True)
            speculative_bench.ensure_pair()
            columns = speculative_bench.run(bin_dir, SPECULATIVE_CLIENTS, 2 * args.tokens, args.repeat, logs)
            speculative = "\n" + speculative_bench.report(columns, SPECULATIVE_CLIENTS, 2 * args.tokens)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    text = report(results, args, build_note, load_before, os.getloadavg(), time.monotonic() - started) + speculative
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print("\n" + text + f"\nwritten to {out}")
    return 1 if any(s.error for r in results for s in r.servers) else 0


if __name__ == "__main__":
    sys.exit(main())
