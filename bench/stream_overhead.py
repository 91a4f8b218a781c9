"""lmkube's streaming overhead per token: CPU of the asyncio thread (HTTP, JSON, SSE writes) per streamed token.

    .venv/bin/python bench/stream_overhead.py [--model tiny|smollm] [--clients 1,16] [--short 16] [--long 256]
                                              [--pairs 5]

The thread's CPU time comes from /proc/<pid>/task/<tid>/schedstat (nanoseconds, user and system together) before
and after each burst of streaming requests. Per-request work (HTTP parsing, validation, tokenizing the prompt, the
closing chunks) cancels out of the slope between a short and a long burst: (CPU(long) - CPU(short)) /
(clients * (long - short)). Short and long bursts alternate `--pairs` times; the median slope is reported.

Each cell is measured again on `bare_sse.py`, the least a Python server on uvicorn can do per streamed token,
stepping at the pace lmkube's engine stepped in that cell (the slope of the bursts' wall time per token): both
pay the same loop wake-ups, so the difference is lmkube's own stack.

The default model is a tiny synthetic one (lmkube.synthetic_gguf's default shape, generated into a temporary
store), so decoding is cheap, a burst takes well under a second and the event loop hardly sleeps: what is left
is the Python path's own cost. `--model smollm` uses run_all.py's `bench/smollm-135m` F16 instead; its 12 ms
steps let the loop go idle between tokens, and each wake-up from idle costs far more (see bench/README.md).
run_all.py imports `loop_costs` for its streaming rows.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from oai_load import Stream, burst, chat_request, completion_request
from servers import BIN, MODEL_KEY, MODELS_DIR, Server, ensure_model, free_port, http_json, running, wait_ready

from lmkube.synthetic_gguf import LlamaShape, write_llama_model

TINY_KEY = "bench/tiny"
ENDPOINTS: dict[str, Callable[[Server, int], bytes]] = {
    "/v1/completions": completion_request,
    "/v1/chat/completions": chat_request,
}


def thread_cpu_ns(pid: int, tid: int) -> int:
    """CPU time the thread has run, in ns (schedstat's first field; /proc/…/stat counts only 10 ms ticks)."""
    return int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])


@dataclass
class Cost:
    endpoint: str
    clients: int
    slope_s: list[float]  # per extra token, one per short/long pair
    whole_s: list[float]  # per token of a long burst, per-request work included
    step_s: list[float] = field(default_factory=list)  # wall time per extra token: the engine's pace
    bare_slope_s: list[float] = field(default_factory=list)  # bare_sse.py at that pace, per extra token

    @property
    def per_token_s(self) -> float:
        return statistics.median(self.slope_s)

    @property
    def bare_per_token_s(self) -> float:
        return statistics.median(self.bare_slope_s) if self.bare_slope_s else float("nan")

    @property
    def with_request_s(self) -> float:
        return statistics.median(self.whole_s)


def _burst_cpu(server: Server, clients: int, tokens: int, request: bytes) -> tuple[float, float]:
    """The event loop's CPU seconds and the wall seconds of one burst."""
    assert server.process is not None
    pid = server.process.pid
    before, started = thread_cpu_ns(pid, pid), time.perf_counter()  # uvicorn's event loop is the main thread
    streams = asyncio.run(burst(server, clients, tokens, request=request))
    after, wall = thread_cpu_ns(pid, pid), time.perf_counter() - started
    _check(streams, tokens)
    return (after - before) / 1e9, wall


def _check(streams: list[Stream], tokens: int) -> None:
    for s in streams:
        if s.error or s.usage_tokens != tokens:
            raise RuntimeError(f"a stream went wrong: error={s.error} usage={s.usage_tokens} (wanted {tokens})")


def loop_cost(server: Server, endpoint: str, clients: int, short: int, long: int, pairs: int) -> Cost:
    make = ENDPOINTS[endpoint]
    requests = {n: make(server, n) for n in (short, long)}
    _burst_cpu(server, clients, short, requests[short])  # warm-up: first-request costs stay out
    cost = Cost(endpoint, clients, [], [])
    for _ in range(pairs):
        low, low_wall = _burst_cpu(server, clients, short, requests[short])
        high, high_wall = _burst_cpu(server, clients, long, requests[long])
        cost.slope_s.append((high - low) / (clients * (long - short)))
        cost.whole_s.append(high / (clients * long))
        cost.step_s.append((high_wall - low_wall) / (long - short))
    return cost


def bare_cost(bare: Server, cost: Cost, short: int, long: int, pairs: int) -> None:
    """The same bursts on bare_sse.py, stepping at the pace lmkube's engine kept in this cell."""
    step_ms = statistics.median(cost.step_s) * 1000
    requests = {n: completion_request(bare, n, extra={"step_ms": step_ms}) for n in (short, long)}
    _burst_cpu(bare, cost.clients, short, requests[short])
    for _ in range(pairs):
        low, _ = _burst_cpu(bare, cost.clients, short, requests[short])
        high, _ = _burst_cpu(bare, cost.clients, long, requests[long])
        cost.bare_slope_s.append((high - low) / (cost.clients * (long - short)))


def loop_costs(server: Server, clients: Sequence[int], short: int, long: int, pairs: int) -> list[Cost]:
    """lmkube's cells, then each again on bare_sse.py (run after lmkube's, so the two never share the cores)."""
    costs = [loop_cost(server, e, n, short, long, pairs) for e in ENDPOINTS for n in clients]
    port = free_port()
    bare = Server("bare-sse", [sys.executable, str(Path(__file__).with_name("bare_sse.py")), "--port", str(port)],
                  port, server.log_path.with_name("bare-sse.log"), model="bare")
    with running(bare):
        wait_ready(bare)
        for cost in costs:
            bare_cost(bare, cost, short, long, pairs)
    return costs


def format_costs(costs: Sequence[Cost], short: int, long: int) -> list[str]:
    lines = [f"| endpoint | clients | engine step | µs/token (slope {short}→{long} tokens, median) | spread | "
             "bare uvicorn µs/token | lmkube − bare | µs/token incl. per-request work |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for c in costs:
        spread = f"{min(c.slope_s) * 1e6:.1f}–{max(c.slope_s) * 1e6:.1f}"
        lines.append(f"| {c.endpoint} | {c.clients} | {statistics.median(c.step_s) * 1e3:.2f} ms | "
                     f"{c.per_token_s * 1e6:.1f} | {spread} | {c.bare_per_token_s * 1e6:.1f} | "
                     f"{(c.per_token_s - c.bare_per_token_s) * 1e6:+.1f} | {c.with_request_s * 1e6:.1f} |")
    return lines


def lmkube_command(models_dir: Path, port: int, threads: int) -> list[str]:
    return [str(BIN / "lmkube"), "serve", "--models-dir", str(models_dir), "--port", str(port), "--parallel", "16",
            "--threads", str(threads), "--ctx-size", "8192", "--log-level", "warning"]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--model", choices=("tiny", "smollm"), default="tiny")
    parser.add_argument("--clients", default="1,16", help="comma-separated client counts (default 1,16)")
    parser.add_argument("--short", type=int, default=16, help="max_tokens of the short bursts (default 16)")
    parser.add_argument("--long", type=int, default=256, help="max_tokens of the long bursts (default 256)")
    parser.add_argument("--pairs", type=int, default=5, help="short/long pairs per cell (default 5)")
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads (default 1, tiny model)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    clients = [int(c) for c in args.clients.split(",")]
    with tempfile.TemporaryDirectory(prefix="lmkube-stream-bench-") as tmp:
        if args.model == "tiny":
            models_dir, key = Path(tmp) / "models", TINY_KEY
            # A training context of 8192 so the load gets every slot 512 tokens (the default 2048 is the cap).
            write_llama_model(models_dir / "bench" / "tiny" / "tiny-F16.gguf", LlamaShape(n_ctx_train=8192),
                              name="bench tiny")
        else:
            ensure_model()
            models_dir, key = MODELS_DIR, MODEL_KEY
        port = free_port()
        server = Server("lmkube", lmkube_command(models_dir, port, args.threads), port, Path(tmp) / "lmkube.log")
        with running(server):
            wait_ready(server)
            http_json(f"{server.url}/api/v1/models/load", {"model": key, "parallel": 16, "context_length": 8192},
                      timeout=300)
            server.model = key
            costs = loop_costs(server, clients, args.short, args.long, args.pairs)
    print(f"lmkube asyncio-thread CPU per streamed token ({args.model} model, {args.pairs} pairs, schedstat ns):\n")
    print("\n".join(format_costs(costs, args.short, args.long)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
