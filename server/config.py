"""Server settings: the one definition of every setting and its default.

`lmkube serve`'s flags take their defaults from these classes, `ServerConfig` carries them to the app and
`RuntimeSettings` to the model manager, so a default is written here and nowhere else. This module imports
nothing heavy: the command line reads it to build `--help`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .store.paths import default_models_dir, lmkube_home

DEFAULT_MAX_BODY_BYTES = 32 << 20  # Anthropic's own limit for a Messages request


@dataclass(frozen=True)
class SamplingDefaults:
    """Sampling for the requests that leave a parameter out; a request's own value (or its preset's) wins.

    These are LM Studio's defaults; `lmkube serve --temp ...` changes them the way llama-server's flags of the
    same names do, for clients that send none (Claude Code sends no temperature, for one)."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0  # 1: no penalty


@dataclass(frozen=True)
class RuntimeSettings:
    """How the model manager loads, shares and unloads model instances (runtime/manager.py)."""

    default_context_length: int = 4096  # capped at the model's trained context
    parallel: int = 4  # concurrent requests per instance (slots)
    jit: bool = True  # load a downloaded model on its first request
    auto_evict: bool = True  # JIT-loading a model unloads the other JIT-loaded ones
    jit_ttl: float | None = 3600.0  # idle seconds before a JIT-loaded instance unloads; None: never
    n_threads: int = 0  # 0: one per available core
    reap_interval: float = 1.0
    evict_drain_timeout: float = 120.0  # longest auto-evict waits for the evicted instance's requests
    max_queue: int | None = None  # requests waiting per instance beyond its running ones; None: unbounded
    cache_ram_mib: int = 1024  # host memory per instance for idle prompt caches (engine/host_cache.py); 0: off
    fetch_image_urls: bool = False  # http(s) image URLs in chat requests are fetched (--allow-image-urls)
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 1234
    models_dir: Path = field(default_factory=default_models_dir)
    home: Path = field(default_factory=lmkube_home)  # stored chats, the download job table, presets
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)
    api_tokens: tuple[str, ...] = ()
    cors: bool = False
    public_metrics: bool = False  # GET /metrics without an API token (for token-less Prometheus scrapes)
    allow_remote_mcp: bool = False  # per-request MCP servers (`ephemeral_mcp` integrations on /api/v1/chat)
    mcp_call_timeout: float = 120.0  # seconds one MCP tool call may take (an mcp.json entry's "timeout" wins)
    mcp_json: Path | None = None  # the MCP servers' config; None: $LMKUBE_HOME/mcp.json
    mcp_idle_timeout: float = 600.0  # seconds an mcp.json server's session is kept unused before it closes
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # larger request bodies get 413 (request_guard.py)


def collect_api_tokens(flags: Iterable[str], files: Iterable[Path], env: str | None = None) -> tuple[str, ...]:
    """Tokens from --api-token flags, --api-token-file files (one per line, # comments) and
    LMKUBE_API_TOKENS (comma or whitespace separated)."""
    tokens: list[str] = [t.strip() for t in flags if t.strip()]
    for path in files:
        for line in path.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                tokens.append(line)
    raw_env = os.environ.get("LMKUBE_API_TOKENS", "") if env is None else env
    tokens.extend(t for t in raw_env.replace(",", " ").split() if t)
    return tuple(dict.fromkeys(tokens))
