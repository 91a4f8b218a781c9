"""The Markdown report of run_all.py: per model, one table with every server side by side and the ratios to
llama-server in the last columns, the batched-bench ceiling, lmkube's streaming cost, the prefix-cache demo and
the issue's targets.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from llama_tools import BatchedRow, BenchModel
from oai_load import EOS_TOKEN, Stream
from prefix_cache import PrefixTrial
from serve_throughput import RunResult, best_run, fmt_s, machine_info
from servers import CTX, PARALLEL, THREADS
from stream_overhead import Cost, format_costs

if TYPE_CHECKING:
    from collections.abc import Sequence

PEER = "llama-server"


@dataclass
class ServerRuns:
    name: str
    repeats: dict[int, list[RunResult]] = field(default_factory=dict)
    warmup: Stream | None = None
    error: str | None = None

    @property
    def runs(self) -> dict[int, RunResult]:
        """The fastest repeat per client count (other load only ever slows a run down)."""
        return {n: best_run(runs) for n, runs in self.repeats.items()}


@dataclass
class ModelResult:
    model: BenchModel
    servers: list[ServerRuns] = field(default_factory=list)
    batched: dict[int, BatchedRow] = field(default_factory=dict)
    batched_error: str | None = None
    prefix: dict[str, list[PrefixTrial]] = field(default_factory=dict)
    loop_costs: list[Cost] = field(default_factory=list)  # lmkube event-loop CPU per extra streamed token
    loop_error: str | None = None

    def server(self, name: str) -> ServerRuns | None:
        return next((s for s in self.servers if s.name == name), None)


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}×" if a and b else "–"


def main_table(result: ModelResult, clients: Sequence[int]) -> list[str]:
    names = [s.name for s in result.servers]
    others = [n for n in names if n != PEER]
    head = (["clients"] + [f"{n} agg tok/s" for n in names] + [f"{n} TTFT p50 / p95" for n in names]
            + [f"{n} ITL p50" for n in names] + [f"{n} / {PEER}" for n in others])
    rows = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    peer = result.server(PEER)
    single: list[str] = ["single-stream tok/s"]
    for n in clients:
        cells = [str(n)]
        runs = [s.runs.get(n) for s in result.servers]
        cells += [f"{r.agg_tps:.1f}" if r else "–" for r in runs]
        cells += [f"{fmt_s(r.ttft(50))} / {fmt_s(r.ttft(95))}" if r else "–" for r in runs]
        cells += [fmt_s(r.itl(50)) if r else "–" for r in runs]
        base = peer.runs.get(n) if peer else None
        cells += [_ratio(s.runs[n].agg_tps if n in s.runs else None, base.agg_tps if base else None)
                  for s in result.servers if s.name != PEER]
        rows.append("| " + " | ".join(cells) + " |")
    if 1 in clients:
        rates = [s.runs[1].decode_tps if 1 in s.runs else None for s in result.servers]
        base_rate = peer.runs[1].decode_tps if peer and 1 in peer.runs else None
        single += [f"{r:.1f}" if r else "–" for r in rates] + [""] * (2 * len(names))
        single += [_ratio(r, base_rate) for s, r in zip(result.servers, rates, strict=True) if s.name != PEER]
        rows.append("| " + " | ".join(single) + " |")
    return rows


def batched_lines(result: ModelResult) -> list[str]:
    if result.batched_error:
        return [f"llama-batched-bench failed: {result.batched_error}"]
    if not result.batched:
        return ["llama-batched-bench: not run"]
    ours = result.server("lmkube")
    peer = result.server(PEER)
    rows = ["| B (= clients) | S_TG t/s | gen tok/s incl. prefill (B·TG/T) | lmkube agg / that | "
            "llama-server agg / that | lmkube agg / S_TG |", "|---:|---:|---:|---:|---:|---:|"]
    for b, row in sorted(result.batched.items()):
        a = ours.runs[b].agg_tps if ours and b in ours.runs else None
        p = peer.runs[b].agg_tps if peer and b in peer.runs else None
        rows.append(f"| {b} | {row.s_tg:.1f} | {row.gen_tps:.1f} | {_ratio(a, row.gen_tps)} | "
                    f"{_ratio(p, row.gen_tps)} | {_ratio(a, row.s_tg)} |")
    pp = next(iter(result.batched.values()))
    return [f"`llama-batched-bench -npp {pp.pp} -ntg {pp.tg} -kvu -c {CTX} -t {THREADS}`, same model:", "", *rows]


def streaming_lines(result: ModelResult, tokens: int) -> list[str]:
    """lmkube's event-loop thread CPU per streamed token: HTTP, request parsing, JSON and SSE writes together."""
    ours = result.server("lmkube")
    if not ours:
        return []
    cells = []
    for n, run in sorted(ours.runs.items()):
        loop = getattr(run, "loop_cpu_s", 0.0)
        if run.tokens:
            cells.append(f"N={n}: {loop / run.tokens * 1e6:.0f} µs/token")
    lines = ["Streaming overhead (CPU of lmkube's asyncio thread, from /proc/<pid>/task/<pid>/schedstat, ns):", "",
             "- per streamed token of the timed runs above, per-request work included (HTTP parsing, validation, "
             "tokenizing the prompt, final chunks): " + ", ".join(cells)]
    if result.loop_costs:
        at16 = [c for c in result.loop_costs if c.clients == 16 and c.endpoint == "/v1/completions"]
        ok = "✅" if at16 and max(c.per_token_s for c in at16) <= 15e-6 else "❌"
        floor = ", ".join(f"{c.bare_per_token_s * 1e6:.1f} µs" for c in at16)
        lines += [f"- per extra token (median slope of 3 pairs of 8- and {tokens}-token bursts; target ≤ 15 µs, "
                  f"/v1/completions at 16 clients: {ok}; a bare uvicorn app at the same pace: {floor}):", "",
                  *format_costs(result.loop_costs, 8, tokens)]
    if result.loop_error:
        lines.append(f"- per extra token: failed ({result.loop_error})")
    return lines


def prefix_lines(result: ModelResult) -> list[str]:
    rows = ["| server | prompt tokens | cold TTFT (median) | warm TTFT, shared prefix (median) | gain |",
            "|---|---:|---:|---:|---:|"]
    for name, trials in result.prefix.items():
        if not trials:
            continue
        cold = statistics.median(t.cold_s for t in trials)
        warm = statistics.median(t.warm_s for t in trials)
        tokens = trials[0].prompt_tokens or "?"
        rows.append(f"| {name} | {tokens} | {fmt_s(cold)} | {fmt_s(warm)} | {cold / warm:.1f}× |")
    return rows


def target_lines(result: ModelResult) -> list[str]:
    ours, peer = result.server("lmkube"), result.server(PEER)
    if not ours or not peer:
        return []
    lines = []
    for n, need in ((1, 0.97), (4, 1.05), (8, 1.05), (16, 1.05)):
        if n in ours.runs and n in peer.runs:
            r = ours.runs[n].agg_tps / peer.runs[n].agg_tps
            lines.append(f"- agg at {n} ≥ {need}× llama-server: {r:.2f}× {'✅' if r >= need else '❌'}")
    if 16 in ours.runs and 16 in result.batched:
        r = ours.runs[16].agg_tps / result.batched[16].gen_tps
        lines.append(f"- agg at 16 ≥ 0.9× batched-bench (gen tok/s incl. prefill): {r:.2f}× "
                     f"{'✅' if r >= 0.9 else '❌'}")
    if 16 in ours.runs:
        t = ours.runs[16].ttft(50)
        lines.append(f"- TTFT p50 at 16 ≤ 200 ms: {fmt_s(t)} {'✅' if t <= 0.2 else '❌'}")
    return lines


def problems(result: ModelResult, tokens: int) -> list[str]:
    out = [f"- {s.name} N={n} repeat {i + 1}: {p}" for s in result.servers for n, runs in s.repeats.items()
           for i, run in enumerate(runs) for p in run.problems(tokens)]
    return out + [f"- {s.name}: {s.error}" for s in result.servers if s.error]


def repeats_lines(result: ModelResult) -> list[str]:
    rows = ["| server | clients | agg tok/s, each repeat | CPU cores server / client / other (best) |",
            "|---|---:|---|---:|"]
    for s in result.servers:
        for n, runs in s.repeats.items():
            cpu = s.runs[n].cpu
            rows.append(f"| {s.name} | {n} | {', '.join(f'{r.agg_tps:.1f}' for r in runs)} | "
                        + (f"{cpu.server:.2f} / {cpu.client:.2f} / {cpu.other:.2f} |" if cpu else "– |"))
    return rows


def report(results: Sequence[ModelResult], args: argparse.Namespace, build_note: str,
           load_before: tuple[float, ...], load_after: tuple[float, ...], elapsed_s: float) -> str:
    lines = ["# Serving benchmark: lmkube vs llama-server vs llama-cpp-python server"]
    lines += ["", f"Streaming /v1/completions, {args.tokens} tokens per request (EOS banned with logit_bias "
              f"{{{EOS_TOKEN}: -100}}), temperature 0, {THREADS} threads everywhere, ctx {CTX}, {PARALLEL} slots; "
              f"each cell is the fastest of the repeats (lmkube and llama-server {args.repeat}, llama-cpp-python "
              f"{args.python_repeat}), runs interleaved across servers. Total time {elapsed_s / 60:.1f} min.",
              "", "Prompts: " + ("each client its own (a different first word, so they share only BOS)."
                                 if args.distinct_prompts else
                                 "the same for every client (lmkube computes a prompt that concurrent requests "
                                 "share once; `--distinct-prompts` gives each client its own).")]
    for r in results:
        lines += ["", f"## {r.model.describe()}", "", *main_table(r, args.clients), "",
                  "### Ceiling: llama-batched-bench", "", *batched_lines(r), "",
                  "### Targets (issue 8)", "", *target_lines(r), "", *streaming_lines(r, args.tokens), "",
                  "### Prefix cache: TTFT with a shared long prefix vs cold", "", *prefix_lines(r), "",
                  "### Repeats", "", *repeats_lines(r), "", "### Problems", "", *(problems(r, args.tokens) or
                                                                                  ["- none"])]
    lines += ["", "## Setup", *machine_info(), f"- llama.cpp tools: {build_note}",
              "- load average (1/5/15 min) before: {:.2f} {:.2f} {:.2f}; after: {:.2f} {:.2f} {:.2f}".format(
                  *load_before, *load_after),
              f"- lmkube: `lmkube serve --parallel {PARALLEL} --threads {THREADS} --ctx-size {CTX}` + "
              "POST /api/v1/models/load; llama-server: `-c 8192 -np 16 -kvu -t 2 -tb 2 --no-webui`; "
              "llama-cpp-python: `python -m llama_cpp.server --n_ctx 8192 --n_threads 2 --n_threads_batch 2 "
              "--interrupt_requests False`"]
    return "\n".join(lines) + "\n"
