"""A real `lmkube gateway` process for tests: fixed replicas from a backends file (rewritten while it runs to
add or drop replicas), keys from a keys file."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml
from support import LMKUBE, free_port


@dataclass
class GatewayProcess:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"lmkube gateway exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"lmkube gateway did not become healthy:\n{self.log()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_gateway(workdir: Path, *args: str, env: dict[str, str] | None = None) -> GatewayProcess:
    port = free_port()
    log_path = workdir / f"gateway-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([LMKUBE, "gateway", "--host", "127.0.0.1", "--port", str(port), *args],
                                   stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    gateway = GatewayProcess(process, port, log_path)
    try:
        gateway.wait_ready()
    except BaseException:
        gateway.stop()
        raise
    return gateway


def write_yaml(path: Path, document: dict[str, Any]) -> Path:
    """Writes atomically, so the gateway's file follower never reads half a file."""
    partial = path.with_suffix(".partial")
    partial.write_text(yaml.safe_dump(document))
    partial.replace(path)
    return path
