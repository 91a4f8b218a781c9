"""Speculative decoding: lmkube and llama-server, each without and with the same draft model.

The pair is generated (random weights cannot be distilled, and a quantized copy of a deep random model
disagrees with it from the first token, its noise amplified through 30 chaotic layers): `bench/spec-135m`,
an F16 llama in SmolLM2-135M's shape whose blocks are weak (`layer_gain` 0.2) and whose output layer is
strong (`logit_std` 24), so its next token depends mostly on the current one and is predicted with
confidence, as trained models often are; and `bench/spec-135m-draft`, the same seed, width and vocabulary
with 2 layers instead of 30 (same embeddings and output layer), which agrees with it most of the time and
reads a third of the bytes per token. Both servers draft with the same settings (at most 8 tokens, stop
below p 0.75) and the draft's own 2 threads; the table shows what drafting buys each at 1 and 4 clients and
the acceptance each server reports.

    .venv/bin/python bench/speculative_bench.py [--clients 1,4] [--tokens 128] [--repeat 2]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from llama_tools import build_tools, llama_server, prepare_llama_server
from oai_load import burst
from serve_throughput import RunResult, client_counts
from servers import MODELS_DIR, THREADS, Server, http_json, lmkube_server, prepare_lmkube, running

from lmkube.synthetic_gguf import SMOLLM_135M, write_llama_model

TARGET, DRAFT = "bench/spec-135m", "bench/spec-135m-draft"
TARGET_FILE = MODELS_DIR / "bench" / "spec-135m" / "spec-135m-F16.gguf"
DRAFT_FILE = MODELS_DIR / "bench" / "spec-135m-draft" / "spec-135m-draft-F16.gguf"
PAIR = {"dtype": "f16", "seed": 7, "logit_std": 24.0, "layer_gain": 0.2}
DRAFT_MAX, DRAFT_P_MIN = 8, 0.75


def ensure_pair() -> None:
    for path, shape in ((TARGET_FILE, SMOLLM_135M), (DRAFT_FILE, replace(SMOLLM_135M, n_layer=2))):
        if not path.exists():
            print(f"generating {path} (once) ...", flush=True)
            write_llama_model(path, shape, name=path.parent.name, **PAIR)  # type: ignore[arg-type]


def llama_server_pair(bin_dir: Path, logs: Path, draft: bool) -> Server:
    server = llama_server(bin_dir, TARGET_FILE, logs)
    if draft:
        server.name = "llama-server draft"
        server.command += ["-md", str(DRAFT_FILE), "--spec-type", "draft-simple", "--spec-draft-n-max",
                           str(DRAFT_MAX), "--spec-draft-n-min", "0", "--spec-draft-p-min", str(DRAFT_P_MIN),
                           "-td", str(THREADS)]
    server.log_path = logs / f"{server.name.replace(' ', '-')}-spec.log"
    return server


@dataclass
class Column:
    label: str
    server: Server
    extra: dict[str, Any] | None = None
    runs: dict[int, list[RunResult]] = field(default_factory=dict)
    acceptance: str = ""

    def best(self, clients: int) -> RunResult | None:
        runs = self.runs.get(clients)
        return max(runs, key=lambda r: r.agg_tps) if runs else None


def acceptance(column: Column, tokens: int) -> str:
    """Accepted / drafted tokens of one non-streaming request, as the server reports them."""
    body = {"model": column.server.model, "prompt": "the cat sat on the mat", "max_tokens": tokens,
            "temperature": 0, "logit_bias": {"2": -100}, **(column.extra or {})}
    answer = http_json(f"{column.server.url}/v1/completions", body, timeout=300)
    if stats := answer.get("stats"):  # lmkube: LM Studio's stats
        drafted, accepted = stats["total_draft_tokens_count"], stats["accepted_draft_tokens_count"]
    elif timings := answer.get("timings"):  # llama-server
        drafted, accepted = timings.get("draft_n", 0), timings.get("draft_n_accepted", 0)
    else:
        return "n/a"
    return f"{accepted}/{drafted} ({accepted / drafted:.0%})" if drafted else "0/0"


def run(bin_dir: Path, clients: Sequence[int], tokens: int, repeat: int, logs: Path) -> list[Column]:
    lmkube = lmkube_server(logs)
    lmkube.log_path = logs / "lmkube-spec.log"
    plain_peer, draft_peer = llama_server_pair(bin_dir, logs, False), llama_server_pair(bin_dir, logs, True)
    columns = [Column("lmkube", lmkube), Column("lmkube draft", lmkube, {"draft_model": DRAFT,
                                                                        "draft_max": DRAFT_MAX,
                                                                        "draft_p_min": DRAFT_P_MIN}),
               Column("llama-server", plain_peer), Column("llama-server draft", draft_peer)]
    with contextlib.ExitStack() as stack:
        for server in (lmkube, plain_peer, draft_peer):
            stack.enter_context(running(server))
        prepare_lmkube(lmkube, TARGET)
        for peer in (plain_peer, draft_peer):
            prepare_llama_server(peer)
        for column in columns:  # warm-up, and the draft model loads on lmkube's first drafted request
            asyncio.run(burst(column.server, 1, tokens, column.extra))
            column.acceptance = acceptance(column, tokens) if "draft" in column.label else ""
        for rep in range(repeat):
            for n in clients:
                for column in columns[rep % len(columns):] + columns[:rep % len(columns)]:
                    result = RunResult(n, asyncio.run(burst(column.server, n, tokens, column.extra)))
                    column.runs.setdefault(n, []).append(result)
                    print(f"  {column.label:>18} N={n:<2} {result.agg_tps:7.1f} tok/s", flush=True)
    return columns


def report(columns: Sequence[Column], clients: Sequence[int], tokens: int) -> str:
    by = {c.label: c for c in columns}
    lines = [f"### Speculative decoding: `{TARGET}` (F16, 30 layers) with `{DRAFT}` (F16, 2 layers)", "",
             f"Streaming /v1/completions, {tokens} tokens, greedy; both servers draft at most {DRAFT_MAX} tokens, "
             f"p_min {DRAFT_P_MIN}. Acceptance (one {tokens}-token request): lmkube {by['lmkube draft'].acceptance}, "
             f"llama-server {by['llama-server draft'].acceptance}.", "",
             "| clients | lmkube | lmkube + draft | llama-server | llama-server + draft | draft speed-up lmkube "
             "| draft speed-up llama-server | lmkube + draft / llama-server + draft |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n in clients:
        agg = {label: (c.best(n).agg_tps if c.best(n) else 0.0) for label, c in by.items()}

        def ratio(a: float, b: float) -> str:
            return f"{a / b:.2f}×" if b else "n/a"

        lines.append(f"| {n} | {agg['lmkube']:.1f} | {agg['lmkube draft']:.1f} | {agg['llama-server']:.1f} | "
                     f"{agg['llama-server draft']:.1f} | {ratio(agg['lmkube draft'], agg['lmkube'])} | "
                     f"{ratio(agg['llama-server draft'], agg['llama-server'])} | "
                     f"{ratio(agg['lmkube draft'], agg['llama-server draft'])} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--clients", type=client_counts, default=[1, 4])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    bin_dir, _ = build_tools()
    ensure_pair()
    out = args.out or Path(__file__).resolve().parent / "results" / "speculative.md"
    columns = run(bin_dir, args.clients, args.tokens, args.repeat, out.parent / "logs")
    text = report(columns, args.clients, args.tokens)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print("\n" + text + f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
