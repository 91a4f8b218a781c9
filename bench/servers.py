"""Starting, stopping and readiness of the two servers serve_throughput.py compares: lmkube and
llama-cpp-python's own server, same model, same threads (plus the prerequisites: the model file, the server deps).
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmkube.synthetic_gguf import SMOLLM_135M, write_llama_model

MODEL_KEY = "bench/smollm-135m"
MODELS_DIR = Path("~/.cache/lmkube/bench-models").expanduser()
MODEL_FILE = MODELS_DIR / "bench" / "smollm-135m" / "smollm-135m-F16.gguf"
THREADS = 2
CTX = 8192
PARALLEL = 16
SERVER_DEPS_INSTALL = ".venv/bin/pip install 'sse-starlette' 'starlette-context>=0.3.6,<0.4' 'pydantic-settings'"
READY_TIMEOUT_S = 180.0
BIN = Path(sys.executable).parent


# ----------------------------------------------------------------------------------------------- prerequisites


def server_deps_missing() -> str | None:
    """Why llama-cpp-python's server cannot start, or None.

    `import llama_cpp.server` alone succeeds without the [server] extra (its __init__ is empty), so import the
    app module, which pulls in sse_starlette, starlette_context and pydantic_settings.
    """
    try:
        import llama_cpp.server.app  # noqa: F401
    except ImportError as exc:
        return str(exc)
    return None


def ensure_model() -> Path:
    """The random-weight SmolLM2-135M-shaped F16 model, generated once (deterministic, ~330 MB, a few seconds)."""
    if not MODEL_FILE.exists():
        print(f"generating {MODEL_FILE} (once) ...", flush=True)
        write_llama_model(MODEL_FILE, SMOLLM_135M, dtype="f16", name="bench smollm-135m")
    return MODEL_FILE


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ----------------------------------------------------------------------------------------------------- servers


@dataclass
class Server:
    name: str
    command: list[str]
    port: int
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    model: str = ""  # the `model` field completions requests carry

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


@contextlib.contextmanager
def running(server: Server) -> Iterator[Server]:
    """Starts the server and always stops it again (errors, Ctrl+C and SIGTERM included)."""
    server.log_path.parent.mkdir(parents=True, exist_ok=True)
    with server.log_path.open("wb") as log:
        # Own session: a Ctrl+C in the terminal reaches only this script, which then stops the server in order.
        server.process = subprocess.Popen(
            server.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    try:
        yield server
    finally:
        stop(server.process)


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=15)  # uvicorn's graceful shutdown is 5 s in lmkube
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# Loopback only: never route through an http_proxy from the environment.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_json(url: str, body: dict[str, Any] | None = None, timeout: float = 5.0) -> Any:
    """Control-plane calls (readiness, load) are outside the timed part, so plain urllib is fine."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with _DIRECT.open(request, timeout=timeout) as response:
        return json.loads(response.read())


def wait_ready(server: Server) -> Any:
    """Polls GET /v1/models (both servers have it) until it answers; returns its JSON."""
    assert server.process is not None
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.process.returncode}:\n{server.log_tail()}")
        with contextlib.suppress(OSError, ValueError):
            return http_json(f"{server.url}/v1/models", timeout=2)
        time.sleep(0.2)
    raise TimeoutError(f"{server.name} not ready after {READY_TIMEOUT_S:.0f} s:\n{server.log_tail()}")


def lmkube_server(logs: Path) -> Server:
    port = free_port()
    command = [str(BIN / "lmkube"), "serve", "--models-dir", str(MODELS_DIR), "--port", str(port),
               "--parallel", str(PARALLEL), "--threads", str(THREADS), "--ctx-size", str(CTX),
               "--log-level", "warning"]  # no per-request access log lines in the timed part
    return Server("lmkube", command, port, logs / "lmkube.log")


def llama_cpp_server(model_file: Path, logs: Path) -> Server:
    port = free_port()
    command = [str(BIN / "python"), "-m", "llama_cpp.server", "--model", str(model_file), "--host", "127.0.0.1",
               "--port", str(port), "--n_ctx", str(CTX), "--n_threads", str(THREADS),
               "--n_threads_batch", str(THREADS),
               # The default (True) cuts every running stream when a new request arrives (only the newest finishes).
               "--interrupt_requests", "False"]
    return Server("llama-cpp-python", command, port, logs / "llama-cpp-python.log")


def prepare_lmkube(server: Server, key: str = MODEL_KEY) -> None:
    wait_ready(server)
    # Load explicitly so the load time stays out of the warm-up and the timed runs.
    body = {"model": key, "parallel": PARALLEL, "context_length": CTX}
    http_json(f"{server.url}/api/v1/models/load", body, timeout=READY_TIMEOUT_S)
    server.model = key


def prepare_llama_cpp(server: Server) -> None:
    models = wait_ready(server)  # it loads the model before it starts listening
    server.model = models["data"][0]["id"]
