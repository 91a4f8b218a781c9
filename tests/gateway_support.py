"""A real `lmkube gateway` process for tests: fixed replicas from a backends file (rewritten while it runs to
add or drop replicas), keys from a keys file."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import yaml
from support import LMKUBE, ListeningProcess, free_port


@dataclass
class GatewayProcess(ListeningProcess):
    command: ClassVar[str] = "lmkube gateway"


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
