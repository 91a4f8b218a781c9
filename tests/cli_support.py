"""Running the `lmkube` CLI as a subprocess against a test server."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

from support import LMKUBE, ServerProcess

ANSI = "\x1b["


@dataclass
class Result:
    code: int
    out: str
    err: str


def cli_env(server: ServerProcess | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LMKUBE_", "NO_COLOR"))}
    if server is not None:
        env["LMKUBE_BASE_URL"] = server.base_url
        if server.token:
            env["LMKUBE_API_TOKEN"] = server.token
    env.update(extra)
    return env


def run_cli(*args: str, server: ServerProcess | None = None, timeout: float = 120, **env: str) -> Result:
    done = subprocess.run([LMKUBE, *args], capture_output=True, text=True, timeout=timeout,
                          env=cli_env(server, **env), stdin=subprocess.DEVNULL)
    return Result(done.returncode, done.stdout, done.stderr)
