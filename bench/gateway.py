"""What `lmkube gateway` costs: streams through the gateway vs straight to the one replica behind it.

One `lmkube serve` replica (64 slots) and one gateway in front of it (a backends file, no keys); for 1, 16
and 64 concurrent streams, rounds that alternate direct and gateway runs of the same streaming chat requests,
and report, as ratios measured in this one run:
- aggregate streamed tokens/s through the gateway / direct (goal >= 0.95),
- the TTFT p50 the gateway adds (ms; goal <= 5),
- the gateway's CPU per streamed token (its process' user+system time / content chunks relayed).
`--placement` pins the processes to cores: by default the replica gets the first half, the gateway and this
client the rest (`gateway-alone`: the gateway alone on the second half; `shared`: all on all). On a shared
machine the numbers move run to run.
The model: `tiny` (default; a small random-weight model, so many tokens per second: the gateway's per-token
cost weighs most), `smollm` (the SmolLM2-135M-shaped bench model of serve_throughput.py; slow on 2 cores), or
`bare`: no model, bench/bare_sse.py stands in for the replica (one token per stream every `--step-ms`, at
almost no CPU), so what is measured is the relay alone: the gateway's CPU per token with little noise.

    .venv/bin/python bench/gateway.py [--model tiny|smollm|bare] [--streams 1,16,64] [--tokens 64] [--rounds 3]
                                      [--placement split|gateway-alone|shared]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from servers import BIN, MODEL_KEY, MODELS_DIR, Server, ensure_model, free_port, http_json, running, wait_ready

from lmkube.synthetic_gguf import LlamaShape, write_llama_model

SLOTS = 64
CTX = SLOTS * 256
PROMPT = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}]


@dataclass
class Run:
    tokens: int
    seconds: float
    ttfts: list[float]

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds


async def _stream(client: httpx.AsyncClient, url: str, model: str, tokens: int, seed: int,
                  step_ms: float) -> tuple[int, float]:
    began = time.perf_counter()
    first, count = 0.0, 0
    body = {"model": model, "messages": PROMPT, "max_tokens": tokens, "stream": True, "seed": seed,
            "temperature": 1.0, "step_ms": step_ms}  # step_ms: bare_sse's pace; the server ignores it
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: {") and ('"content":"' in line or '"text":"' in line):
                count += 1
                if count == 1:
                    first = time.perf_counter() - began
    return count, first


async def burst(url: str, model: str, streams: int, tokens: int, step_ms: float = 1.0) -> Run:
    limits = httpx.Limits(max_connections=streams + 4, max_keepalive_connections=streams + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits, trust_env=False) as client:
        began = time.perf_counter()
        results = await asyncio.gather(*(_stream(client, url, model, tokens, seed, step_ms) for seed in range(streams)))
        seconds = time.perf_counter() - began
    return Run(sum(c for c, _ in results), seconds, [t for _, t in results])


def cpu_seconds(pid: int) -> float:
    """The process' CPU time so far, all threads: schedstat's nanoseconds (`stat` counts 10 ms ticks, too coarse
    for one stream's few milliseconds)."""
    try:
        return sum(int((task / "schedstat").read_text().split()[0])
                   for task in Path(f"/proc/{pid}/task").iterdir()) / 1e9
    except (OSError, ValueError):  # a thread ended meanwhile, or no schedstat: fall back to the ticks
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", default="1,16,64")
    parser.add_argument("--model", choices=["tiny", "smollm", "bare"], default="tiny")
    parser.add_argument("--step-ms", type=float, default=2.0, help="bare: ms between a stream's tokens")
    parser.add_argument("--tokens", type=int, default=64, help="max_tokens per stream")
    parser.add_argument("--rounds", type=int, default=3, help="direct/gateway pairs per stream count")
    parser.add_argument("--placement", choices=["split", "gateway-alone", "shared"], default="split",
                        help="split: the replica on the first half of the cores, the gateway and this client on the "
                        "rest; gateway-alone: the gateway on the second half, the replica and this client on the "
                        "first (as in a cluster, where the gateway's pods have their own cores); shared: every "
                        "process on every core")
    args = parser.parse_args(argv)
    cores = sorted(os.sched_getaffinity(0))
    first, second = (cores[:len(cores) // 2], cores[len(cores) // 2:]) if len(cores) >= 2 else (cores, cores)
    replica_cores, gateway_cores, client_cores = {
        "split": (first, second, second), "gateway-alone": (first, second, first), "shared": (cores, cores, cores),
    }[args.placement]
    os.sched_setaffinity(0, client_cores)
    pin_replica = ["taskset", "-c", ",".join(map(str, replica_cores))]
    pin_gateway = ["taskset", "-c", ",".join(map(str, gateway_cores))]
    work = Path(tempfile.mkdtemp(prefix="lmkube-bench-gateway-"))
    port = free_port()
    if args.model == "bare":
        model = "bare"
        replica = Server("bare", [*pin_replica, sys.executable, str(Path(__file__).parent / "bare_sse.py"),
                                  "--port", str(port)], port, work / "replica.log")
    else:
        if args.model == "smollm":
            ensure_model()
            models_dir, model = MODELS_DIR, MODEL_KEY
        else:
            models_dir, model = work / "models", "bench/tiny"
            write_llama_model(models_dir / "bench" / "tiny" / "tiny-F16.gguf", LlamaShape(n_ctx_train=CTX), seed=1)
        replica = Server("lmkube", [*pin_replica, str(BIN / "lmkube"), "serve", "--models-dir", str(models_dir),
                                    "--port", str(port), "--parallel", str(SLOTS), "--threads",
                                    str(len(replica_cores)), "--ctx-size", str(CTX),
                                    "--log-level", "warning"], port, work / "replica.log")
    (work / "backends.yaml").write_text(yaml.safe_dump({"models": [
        {"name": "bench", "modelKey": model, "replicas": [replica.url]}]}))
    gateway_port = free_port()
    gateway = Server("gateway", [*pin_gateway, str(BIN / "lmkube"), "gateway", "--host", "127.0.0.1", "--port",
                                 str(gateway_port), "--backends", str(work / "backends.yaml"), "--no-auth",
                                 "--log-level", "warning"],
                     gateway_port, work / "gateway.log")
    with running(replica), running(gateway):
        wait_ready(replica)
        if args.model != "bare":
            http_json(f"{replica.url}/api/v1/models/load",
                      {"model": model, "parallel": SLOTS, "context_length": CTX}, timeout=180)
        wait_ready(gateway)
        assert gateway.process is not None
        asyncio.run(burst(gateway.url, model, 4, 8))  # warm-up: connections, first decode
        rows = []
        for streams in (int(s) for s in args.streams.split(",")):
            direct: list[Run] = []
            proxied: list[Run] = []
            cpu = 0.0
            for _ in range(args.rounds):
                direct.append(asyncio.run(burst(replica.url, model, streams, args.tokens, args.step_ms)))
                before = cpu_seconds(gateway.process.pid)
                proxied.append(asyncio.run(burst(gateway.url, model, streams, args.tokens, args.step_ms)))
                cpu += cpu_seconds(gateway.process.pid) - before
            # Each round's gateway run against the direct run just before it: paired, so the load other work
            # puts on a shared machine cancels out more than it would across medians taken apart.
            pairs = list(zip(direct, proxied, strict=True))
            ratio = statistics.median(g.tokens_per_second / d.tokens_per_second for d, g in pairs)
            added = statistics.median(statistics.median(g.ttfts) - statistics.median(d.ttfts)
                                      for d, g in pairs)
            relayed = sum(r.tokens for r in proxied)
            rows.append((streams, statistics.median(r.tokens_per_second for r in direct),
                         statistics.median(r.tokens_per_second for r in proxied), ratio,
                         statistics.median(statistics.median(d.ttfts) for d in direct) * 1000, added * 1000,
                         cpu / relayed * 1e6))
    print(f"model {args.model}, {args.tokens} tokens per stream, medians of {args.rounds} paired rounds, replica on "
          f"cores {pin_replica[-1]}, gateway on {pin_gateway[-1]}, client on {','.join(map(str, client_cores))}; "
          "machine shared with other work: compare "
          "the ratios, not the absolute numbers")
    print(f"{'streams':>7} {'direct tok/s':>12} {'gateway tok/s':>13} {'ratio':>6} {'direct TTFT p50':>16} "
          f"{'added TTFT p50':>15} {'gateway CPU/token':>18}")
    for streams, direct_tps, gateway_tps, ratio, direct_ttft, added, cpu_per_token in rows:
        print(f"{streams:>7} {direct_tps:>12.0f} {gateway_tps:>13.0f} {ratio:>6.2f} {direct_ttft:>13.1f} ms "
              f"{added:>12.1f} ms {cpu_per_token:>15.0f} µs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
