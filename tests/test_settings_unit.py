"""Server settings are defined once (server/config.py): `lmkube serve` with no flags runs with exactly the
defaults the server defines, and each flag reaches the setting it names."""

from __future__ import annotations

from pathlib import Path

import pytest
from lmkube.server.config import RuntimeSettings, ServerConfig

from lmkube.cli import build_parser
from lmkube.cli.client import DEFAULT_BASE_URL
from lmkube.cli.foreground_server import server_config


def test_serve_without_flags_runs_with_the_server_defaults(tmp_path: Path) -> None:
    args = build_parser().parse_args(["serve"])
    config = server_config(args, tmp_path, ())
    assert config == ServerConfig(models_dir=tmp_path, home=config.home)
    assert config.runtime == RuntimeSettings()
    assert f"http://{ServerConfig.host}:{ServerConfig.port}" == DEFAULT_BASE_URL
    start = build_parser().parse_args(["server", "start"])
    assert (start.bind, start.port) == (ServerConfig.host, ServerConfig.port)


def test_each_flag_reaches_its_setting(tmp_path: Path) -> None:
    args = build_parser().parse_args([
        "serve", "--host", "0.0.0.0", "--port", "8080", "--parallel", "8", "--ctx-size", "8192", "--ttl", "0",
        "--max-queue", "3", "--cache-ram", "0", "--max-body-size", "2", "--no-jit", "--no-auto-evict",
        "--threads", "2", "--public-metrics", "--cors", "--allow-remote-mcp", "--mcp-json", "/etc/mcp.json",
        "--mcp-call-timeout", "7", "--mcp-idle-timeout", "9"])
    config = server_config(args, tmp_path, ("sk-lm-x",))
    assert config == ServerConfig(
        host="0.0.0.0", port=8080, models_dir=tmp_path, home=config.home, api_tokens=("sk-lm-x",), cors=True,
        public_metrics=True, allow_remote_mcp=True, max_body_bytes=2 << 20, mcp_json=Path("/etc/mcp.json"),
        mcp_call_timeout=7, mcp_idle_timeout=9,
        runtime=RuntimeSettings(default_context_length=8192, parallel=8, jit=False, auto_evict=False, jit_ttl=None,
                                n_threads=2, max_queue=3, cache_ram_mib=0))


def test_help_shows_the_defaults_the_server_defines(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("(default 127.0.0.1)", "(default 1234)", "(default 4)", "(default 4096)", "(default 3600)",
                  "(default 1024)", "(default 32)"):
        assert shown in text
