"""How long `make demo` takes to its first answer: `lmkube serve --demo` started, then the README's first chat
request (SmolLM2-135M-Instruct, the server's default sampling), timed from the start of the process.

    .venv/bin/python bench/demo_start.py [--runs 3] [--no-cold] [--threads N]

Cold: a fresh models folder (--demo writes lmkube/demo and lmkube/demo-vision, links the real model) and the
page cache of the files a start reads dropped first, file by file (posix_fadvise DONTNEED on the real model,
the virtualenv and the source tree: nothing else on the machine is touched; pages another process maps stay,
and fincore's count of what is still resident is printed). Warm: the same folder again, files cached.
Reported per start: seconds until /health answers, until /v1/models lists the models, and until the answer
arrived, with the answer's first words.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from servers import free_port

from lmkube.real_model import REAL_MODEL_KEY, local_real_model_path

ROOT = Path(__file__).resolve().parent.parent
LMKUBE = str(Path(sys.executable).with_name("lmkube"))
# The README's first chat request, as its curl sends it (no temperature: the server's default sampling).
README_REQUEST = {"model": REAL_MODEL_KEY,
                  "messages": [{"role": "user", "content": "Write one sentence about the sea."}]}


def drop_page_cache(paths: list[Path]) -> int:
    """Asks the kernel to drop the cached pages of every file under `paths`; returns the bytes asked for."""
    total = 0
    for top in paths:
        files = [top] if top.is_file() else [p for p in top.rglob("*") if p.is_file() and not p.is_symlink()]
        for path in files:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                total += os.fstat(fd).st_size
            finally:
                os.close(fd)
    return total


def resident(path: Path) -> str:
    out = subprocess.run(["fincore", "--noheadings", "--output", "RES", str(path)], capture_output=True, text=True)
    return out.stdout.strip() or "?"


def start(models: Path, extra: list[str]) -> dict[str, float | str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        began = time.perf_counter()
        command = [LMKUBE, "serve", "--demo", "--models-dir", str(models), "--port", str(port), *extra]
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
        try:
            times: dict[str, float | str] = {}
            with httpx.Client(base_url=url, timeout=300) as client:
                while "health" not in times:
                    assert process.poll() is None, "the server exited"
                    try:
                        if client.get("/health").status_code == 200:
                            times["health"] = time.perf_counter() - began
                    except httpx.TransportError:
                        time.sleep(0.05)
                assert client.get("/v1/models").json()["data"][0]["id"] == REAL_MODEL_KEY
                times["models"] = time.perf_counter() - began
                answer = client.post("/v1/chat/completions", json=README_REQUEST).json()
                times["answer"] = time.perf_counter() - began
                times["text"] = answer["choices"][0]["message"]["content"]
                times["tokens"] = answer["usage"]["completion_tokens"]
            return times
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="warm starts after the cold one")
    parser.add_argument("--no-cold", action="store_true", help="leave the page cache alone")
    parser.add_argument("--threads", type=int, help="lmkube serve --threads (default: the server's, all cores)")
    args = parser.parse_args()
    model = local_real_model_path()
    assert model is not None, "run `make setup` first"
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models"
        if not args.no_cold:
            dropped = drop_page_cache([model.resolve(), Path(sys.prefix), ROOT / "server", ROOT / "lmkube"])
            print(f"page cache dropped for {dropped / 2**20:.0f} MiB of files; the model's pages still resident: "
                  f"{resident(model.resolve())}", flush=True)
        for run in range(1 + args.runs):
            first = "cold" if not args.no_cold else "first"
            label = f"{first} (fresh models folder)" if run == 0 else f"warm {run}"
            t = start(models, [] if args.threads is None else ["--threads", str(args.threads)])
            print(f"- {label}: /health {t['health']:.2f} s, /v1/models {t['models']:.2f} s, first answer "
                  f"{t['answer']:.2f} s ({t['tokens']} tokens): {str(t['text'])[:60]!r}", flush=True)


if __name__ == "__main__":
    main()
