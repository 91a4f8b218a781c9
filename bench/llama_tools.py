"""llama.cpp's own tools as benchmark peers: the build (scripts/build-llama-server.sh), the two bench models
(one quantized with llama-quantize), `llama-server -np 16 -kvu` and `llama-batched-bench` as the ceiling.
"""

from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from servers import CTX, MODELS_DIR, PARALLEL, THREADS, Server, ensure_model, free_port, http_json, wait_ready

from lmkube.synthetic_gguf import SMOLLM_135M, LlamaShape, write_llama_model

ROOT = Path(__file__).resolve().parent.parent
SOURCES_DIR = Path("~/.cache/lmkube/bench-src").expanduser()  # F16 inputs of quantized models, not served
# ~0.5B parameters (untied head): every row length a multiple of 256, so Q4_K_M needs no fallback types.
LLAMA_05B = LlamaShape(n_vocab=49152, n_embd=1024, n_layer=24, n_head=16, n_head_kv=4, n_ff=4096, n_ctx_train=8192)


@dataclass(frozen=True)
class BenchModel:
    key: str  # lmkube model key in MODELS_DIR
    file: Path
    shape: LlamaShape
    quant: str

    def describe(self) -> str:
        s = self.shape
        return (f"`{self.key}`: random-weight llama, {self.quant}, n_vocab {s.n_vocab}, n_embd {s.n_embd}, "
                f"n_layer {s.n_layer}, n_head {s.n_head}/{s.n_head_kv} kv, n_ff {s.n_ff}, "
                f"{self.file.stat().st_size / 1e6:.0f} MB")


def build_tools() -> tuple[Path, str]:
    """The folder with llama-server, llama-batched-bench and llama-quantize (built once), and the build note."""
    done = subprocess.run(["bash", str(ROOT / "scripts" / "build-llama-server.sh")], check=True,
                          stdout=subprocess.PIPE, text=True)
    bin_dir = Path(done.stdout.strip().splitlines()[-1])
    note = bin_dir.parent / "BUILD_TIME"
    return bin_dir, note.read_text().strip() if note.exists() else "build time unknown"


def ensure_models(bin_dir: Path) -> list[BenchModel]:
    small = BenchModel("bench/smollm-135m", ensure_model(), SMOLLM_135M, "F16")
    q4 = MODELS_DIR / "bench" / "llama-0.5b" / "llama-0.5b-Q4_K_M.gguf"
    if not q4.exists():
        src = SOURCES_DIR / "llama-0.5b-F16.gguf"
        if not src.exists():
            print(f"generating {src} (once) ...", flush=True)
            write_llama_model(src, LLAMA_05B, dtype="f16", name="bench llama-0.5b")
        q4.parent.mkdir(parents=True, exist_ok=True)
        print(f"quantizing to {q4} (once) ...", flush=True)
        tmp = q4.with_suffix(".tmp")
        subprocess.run([str(bin_dir / "llama-quantize"), str(src), str(tmp), "Q4_K_M", str(THREADS)], check=True,
                       stdout=subprocess.DEVNULL)
        tmp.rename(q4)
    return [small, BenchModel("bench/llama-0.5b", q4, LLAMA_05B, "Q4_K_M")]


# -------------------------------------------------------------------------------------------------- llama-server


def llama_server(bin_dir: Path, model_file: Path, logs: Path) -> Server:
    port = free_port()
    command = [str(bin_dir / "llama-server"), "-m", str(model_file), "--host", "127.0.0.1", "--port", str(port),
               "-c", str(CTX), "-np", str(PARALLEL), "-kvu", "-t", str(THREADS), "-tb", str(THREADS), "--no-webui"]
    return Server("llama-server", command, port, logs / f"llama-server-{model_file.stem}.log")


def prepare_llama_server(server: Server) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:  # /v1/models answers 503 while the model loads
        try:
            if http_json(f"{server.url}/health", timeout=2).get("status") == "ok":
                break
        except (OSError, ValueError):
            time.sleep(0.2)
    server.model = wait_ready(server)["data"][0]["id"]


# ---------------------------------------------------------------------------------------------- batched-bench


@dataclass(frozen=True)
class BatchedRow:
    pp: int
    tg: int
    b: int
    t_pp: float
    s_pp: float
    t_tg: float
    s_tg: float
    t: float
    s: float

    @property
    def gen_tps(self) -> float:
        """Generated tokens over the whole time, prefill included: what a server's agg tok/s compares to."""
        return self.b * self.tg / self.t


_ROW = re.compile(r"^\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*\d+\s*\|" + r"\s*([\d.]+)\s*\|" * 6)


def batched_bench(bin_dir: Path, model_file: Path, prompt_tokens: int, tokens: int,
                  clients: list[int]) -> dict[int, BatchedRow]:
    """llama-batched-bench with the servers' settings: N sequences of `prompt_tokens`, `tokens` generated each."""
    command = [str(bin_dir / "llama-batched-bench"), "-m", str(model_file), "-c", str(CTX), "-b", "2048",
               "-ub", "512", "-kvu", "-t", str(THREADS), "-tb", str(THREADS), "-npp", str(prompt_tokens),
               "-ntg", str(tokens), "-npl", ",".join(map(str, clients))]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=True)
    rows = {}
    for line in (done.stdout + done.stderr).splitlines():
        if m := _ROW.match(line.strip()):
            pp, tg, b = (int(v) for v in m.groups()[:3])
            rows[b] = BatchedRow(pp, tg, b, *(float(v) for v in m.groups()[3:]))
    if not rows:
        raise RuntimeError(f"no result rows from llama-batched-bench:\n{done.stderr[-2000:]}")
    return rows
