"""`lmkube get`: find a GGUF model on the Hugging Face Hub and have the server download it, with progress."""

from __future__ import annotations

import argparse
import re
import sys
import time
from datetime import datetime
from typing import Any

from .client import Client, CliError, add_connection_arguments
from .output import choose, human_bytes, print_json, style

GET_EXAMPLES = """examples:
  lmkube get qwen3 -y                               search the Hub, take the best match and its default variant
  lmkube get bartowski/Qwen_Qwen3-4B-GGUF@q8_0       one repo, one quantization
  lmkube get https://huggingface.co/org/repo-GGUF --select   choose the variant from a list
The server downloads (HF_ENDPOINT and HF_TOKEN are the server's). Ctrl+C stops waiting; the server keeps
the partial file, and running the same `lmkube get` again resumes and follows it.
"""
_POLL_S = 0.25


def register(commands: Any) -> None:
    get = commands.add_parser("get", help="download a model from the Hugging Face Hub", epilog=GET_EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    get.add_argument("model", help="keyword, org/repo or Hugging Face URL, optionally @variant (e.g. @q4_k_m)")
    get.add_argument("--gguf", action="store_true", help="GGUF models only (lmkube runs GGUF only: the default)")
    get.add_argument("-n", "--limit", type=int, default=10, help="search results to consider (default 10)")
    get.add_argument("-y", "--yes", action="store_true", help="no questions: best match, default variant")
    get.add_argument("--select", action="store_true", help="choose the repo and variant from lists")
    get.add_argument("--json", action="store_true", help="print the final job status as JSON")
    add_connection_arguments(get)
    get.set_defaults(func=get_model)


def _split_variant(text: str) -> tuple[str, str | None]:
    if re.match(r"^https?://", text, re.IGNORECASE):
        return text, None
    head, found, tail = text.rpartition("@")
    return (head, tail) if found and head and tail else (text, None)


def _is_repo(name: str) -> bool:
    return bool(re.match(r"^(https?://|(hf|huggingface)\.co/)", name, re.IGNORECASE)) or name.count("/") == 1


def _interactive(args: argparse.Namespace) -> bool:
    return not args.yes and sys.stdin.isatty() and sys.stderr.isatty()


def _find_repo(client: Client, keyword: str, args: argparse.Namespace) -> str:
    results = client.get("/api/v1/models/search", params={"q": keyword, "limit": args.limit})["results"]
    if not results:
        raise CliError(f"no GGUF models on the Hugging Face Hub match '{keyword}'")
    if len(results) == 1 or not (args.select or _interactive(args)):
        return results[0]["id"]
    if not sys.stdin.isatty():
        raise CliError("--select needs a terminal")
    print(f"Models matching '{keyword}':", file=sys.stderr)
    return results[choose("Model", [r["id"] for r in results])]["id"]


def _choose_variant(client: Client, repo: str) -> str:
    if not sys.stdin.isatty():
        raise CliError("--select needs a terminal")
    variants = client.get("/api/v1/models/search/variants", params={"repo": repo})["variants"]
    if not variants:
        raise CliError(f"Hugging Face repo '{repo}' has no GGUF variants")
    default = next((i for i, v in enumerate(variants) if v["default"]), 0)
    labels = [f"{v['quantization']:<10} {human_bytes(v['size_bytes'])}" for v in variants]
    print(f"Variants of {repo}:", file=sys.stderr)
    return variants[choose("Variant", labels, default)]["quantization"]


def get_model(args: argparse.Namespace) -> int:
    client = Client.from_args(args)
    name, variant = _split_variant(args.model.strip())
    repo = name if _is_repo(name) else None
    if repo is None:
        # A model already on the server needs no Hub search (the server answers already_downloaded).
        local = [m["key"] for m in client.get("/api/v1/models")["models"]]
        repo = name if name.lower() in local else _find_repo(client, name, args)
    if variant is None and args.select and not repo.lower().startswith("http"):
        variant = _choose_variant(client, repo)
    label = repo + (f"@{variant}" if variant else "")
    body: dict[str, Any] = {"model": repo}
    if variant:
        body["quantization"] = variant
    job = client.post("/api/v1/models/download", body)
    if job["status"] == "already_downloaded":
        if args.json:
            print_json(job)
        else:
            print(f"{label} is already downloaded. Load it with: lmkube load {repo}")
        return 0
    try:
        job = follow(client, job, label)
    except KeyboardInterrupt:
        print(f"\nStopped waiting for {label}. The server goes on downloading (job {job['job_id']}); run "
              f"`lmkube get {args.model}` again to follow it. An interrupted download resumes from its partial "
              "file.", file=sys.stderr)
        return 130
    if args.json:
        print_json(job)
    if job["status"] != "completed":
        raise CliError(job.get("error") or f"the download of {label} ended as '{job['status']}'")
    if not args.json:
        print(f"Downloaded {label} ({human_bytes(job['total_size_bytes'])}). Load it with: lmkube load {repo}")
    return 0


def follow(client: Client, job: dict[str, Any], label: str) -> dict[str, Any]:
    """Polls the job until it ends; a redrawn progress bar on a terminal, a line per 10% otherwise."""
    tty = sys.stderr.isatty()
    print(f"Downloading {label} ({human_bytes(job.get('total_size_bytes'))}) ...", file=sys.stderr, flush=True)
    next_report = 0.0
    while True:
        job = client.get(f"/api/v1/models/download/status/{job['job_id']}")
        done, total = job.get("downloaded_bytes") or 0, job.get("total_size_bytes") or 0
        fraction = done / total if total else 0.0
        if job["status"] != "downloading":
            final = 1.0 if job["status"] == "completed" else fraction
            if tty:
                sys.stderr.write("\r" + progress_line(final, job) + "\n")
            else:
                print(progress_line(final, job, bar=False), file=sys.stderr, flush=True)
            break
        if tty:
            sys.stderr.write("\r" + progress_line(fraction, job))
            sys.stderr.flush()
        elif fraction >= next_report:
            print(progress_line(fraction, job, bar=False), file=sys.stderr, flush=True)
            next_report = min(1.0, int(fraction * 10 + 1) / 10)
        time.sleep(_POLL_S)
    return job


def progress_line(fraction: float, job: dict[str, Any], *, bar: bool = True) -> str:
    done, total = job.get("downloaded_bytes") or 0, job.get("total_size_bytes") or 0
    rate = job.get("bytes_per_second") or 0.0
    eta = "-"
    if job.get("estimated_completion"):
        finish = datetime.fromisoformat(job["estimated_completion"])
        seconds = max(0, int((finish - datetime.now(finish.tzinfo)).total_seconds()))
        eta = f"{seconds // 60}:{seconds % 60:02d}"
    text = f"{fraction * 100:5.1f}%  {human_bytes(done)} / {human_bytes(total)}  {human_bytes(rate)}/s  ETA {eta}"
    if not bar:
        return text
    width = 30
    filled = int(fraction * width)
    return style("█" * filled, "green", stream=sys.stderr) + "░" * (width - filled) + " " + text + "   "
