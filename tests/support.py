"""Test support shared by the test modules: generated models and a handle on a running server."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import httpx

from lmkube.real_model import REAL_MODEL_KEY
from lmkube.synthetic_gguf import LlamaShape, write_bert_embedding_model, write_llama_model

CHAT_MODEL = "acme/tiny-chat"
OTHER_CHAT_MODEL = "acme/other-chat"
BYTES_MODEL = "acme/byte-chat"
EMBED_MODEL = "acme/tiny-embed"
REAL_MODEL = REAL_MODEL_KEY  # SmolLM2-135M-Instruct: the `real_server` fixture's model (tests marked real_model)
LMKUBE = str(Path(sys.executable).with_name("lmkube"))


def write_test_models(models_dir: Path) -> None:
    """The store every server test starts from (a few hundred KB of random weights)."""
    chat = models_dir / "acme" / "tiny-chat"
    write_llama_model(chat / "tiny-chat-F16.gguf", dtype="f16", seed=1, name="Tiny Chat")
    write_llama_model(chat / "tiny-chat-F32.gguf", dtype="f32", seed=1, name="Tiny Chat")
    write_llama_model(models_dir / "acme" / "other-chat" / "other-chat-F16.gguf", seed=2, name="Other Chat")
    write_llama_model(models_dir / "acme" / "byte-chat" / "byte-chat-F16.gguf", seed=3, name="Byte Chat",
                      emit_bytes=True, emit_eos=True, shape=LlamaShape(n_vocab=600))
    write_bert_embedding_model(models_dir / "acme" / "tiny-embed" / "tiny-embed-F32.gguf", name="Tiny Embed")


@contextlib.contextmanager
def uvicorn_in_thread(app: Any, **options: Any) -> Iterator[str]:
    """Serves an ASGI app on 127.0.0.1 from a thread of this process (uvloop, httptools, as `lmkube serve`
    does); yields its base URL. `options`: more uvicorn.Config settings."""
    import uvicorn  # only the tests that serve an app in-process pay for it

    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, loop="uvloop", http="httptools", lifespan="off",
                            **{"log_level": "warning", **options})
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate: Callable[[], Any], timeout: float = 30, interval: float = 0.1, message: str = "") -> Any:
    """Polls `predicate` until it returns something truthy (returned) or raises TimeoutError after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(message or f"condition not met within {timeout}s")
        time.sleep(interval)


@dataclass
class ListeningProcess:
    """An lmkube command the tests started that answers on 127.0.0.1:`port` (/health when ready)."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    command: ClassVar[str] = "lmkube"  # for messages

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.command} exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"{self.command} did not become healthy:\n{self.log()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class ServerProcess(ListeningProcess):
    token: str | None = None
    command: ClassVar[str] = "lmkube serve"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers=self.headers, timeout=60, **kwargs)  # type: ignore[arg-type]
