"""`lmkube get` against a real server that downloads from a local Hugging Face-compatible hub
(tests/hf_hub_server.py): keyword search, org/repo@variant, --select, progress, Ctrl+C and resuming."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pexpect
import pytest
from cli_support import cli_env, run_cli
from hf_hub_server import FakeHub
from support import LMKUBE, ServerProcess

from lmkube.synthetic_gguf import LlamaShape, write_llama_model

BIG = LlamaShape(n_vocab=4096, n_embd=128)  # ~2 MB: takes seconds when the hub is throttled


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    d = tmp_path_factory.mktemp("cli-hub-files")
    hub = FakeHub().start()
    hub.add_repo("hub-org/Tiny-GGUF", {
        "tiny-Q4_K_M.gguf": write_llama_model(d / "tiny-Q4_K_M.gguf", seed=11, name="Tiny Hub"),
        "tiny-Q8_0.gguf": write_llama_model(d / "tiny-Q8_0.gguf", dtype="f32", seed=12, name="Tiny Hub"),
        "README.md": b"# tiny\n"})
    hub.add_repo("hub-org/Picky-GGUF", {
        "picky-Q4_K_M.gguf": write_llama_model(d / "picky-Q4_K_M.gguf", seed=15, name="Picky"),
        "picky-Q8_0.gguf": write_llama_model(d / "picky-Q8_0.gguf", dtype="f32", seed=16, name="Picky")})
    hub.add_repo("hub-org/Slow-GGUF", {"slow-Q4_K_M.gguf": write_llama_model(d / "slow.gguf", BIG, seed=13)})
    yield hub
    hub.stop()


@pytest.fixture(scope="module")
def srv(start_server: Callable[..., ServerProcess], tmp_path_factory: pytest.TempPathFactory,
        hub: FakeHub) -> ServerProcess:
    models = tmp_path_factory.mktemp("cli-get-models")
    home = tmp_path_factory.mktemp("cli-get-hf")
    env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(home / "hf"), "HF_TOKEN": "", "HF_HUB_OFFLINE": "0",
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    return start_server(models, env=env)


def model_files(srv: ServerProcess) -> dict[str, list[str]]:
    return {m["modelKey"]: m["variants"] for m in json.loads(run_cli("ls", "--json", server=srv).out)}


def test_get_repo_with_variant(srv: ServerProcess) -> None:
    result = run_cli("get", "hub-org/Tiny-GGUF@q8_0", "-y", server=srv)
    assert result.code == 0, result.err
    assert result.err.startswith("Downloading hub-org/Tiny-GGUF@q8_0 (")
    assert "100.0%" in result.err and "/s  ETA" in result.err  # plain progress lines off a terminal
    assert "\r" not in result.err and "\x1b[" not in result.err
    assert result.out.startswith("Downloaded hub-org/Tiny-GGUF@q8_0 (")
    assert model_files(srv)["hub-org/tiny-gguf"] == ["hub-org/tiny-gguf@q8_0"]

    again = run_cli("get", "hub-org/Tiny-GGUF@q8_0", "--json", server=srv)
    assert again.code == 0 and json.loads(again.out) == {"status": "already_downloaded"}


def test_get_keyword_takes_best_match_and_default_variant(srv: ServerProcess, hub: FakeHub) -> None:
    result = run_cli("get", "picky", "-y", "--gguf", "--json", server=srv)
    assert result.code == 0, result.err
    job = json.loads(result.out)
    assert job["status"] == "completed" and job["downloaded_bytes"] == job["total_size_bytes"] > 0
    assert model_files(srv)["hub-org/picky-gguf"] == ["hub-org/picky-gguf@q4_k_m"]  # the default variant
    assert any(path == "/api/models" for _, path, _ in hub.requests)


def test_get_errors(srv: ServerProcess) -> None:
    nothing = run_cli("get", "no-such-thing-anywhere", "-y", server=srv)
    assert nothing.code == 1 and nothing.err == (
        "lmkube: error: no GGUF models on the Hugging Face Hub match 'no-such-thing-anywhere'\n")
    unknown = run_cli("get", "hub-org/Missing-GGUF", "-y", server=srv)
    assert unknown.code == 1 and unknown.err.count("\n") == 1 and "was not found" in unknown.err
    bad_quant = run_cli("get", "hub-org/Tiny-GGUF@q2_k", "-y", server=srv)
    assert bad_quant.code == 1 and "available quantizations: Q4_K_M, Q8_0" in bad_quant.err


def test_select_variant_on_a_terminal(srv: ServerProcess) -> None:
    child = pexpect.spawn(LMKUBE, ["get", "hub-org/Tiny-GGUF", "--select"], env=cli_env(srv, TERM="dumb"),
                          encoding="utf-8", timeout=60)
    try:
        child.expect("Variants of hub-org/Tiny-GGUF:")
        child.expect(r"\* +1\. Q4_K_M")  # the default is marked
        child.expect(r"2\. Q8_0")
        child.expect_exact("Variant [1-2, Enter=1]: ")
        child.sendline("1")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, child.before
    assert "hub-org/tiny-gguf@q4_k_m" in model_files(srv)["hub-org/tiny-gguf"]


def test_progress_bar_ctrl_c_and_resume(srv: ServerProcess, hub: FakeHub) -> None:
    hub.bytes_per_second = 400_000  # ~5 s for the 2 MB file
    try:
        child = pexpect.spawn(LMKUBE, ["get", "hub-org/Slow-GGUF", "-y"], env=cli_env(srv, TERM="dumb"),
                              encoding="utf-8", timeout=60)
        try:
            child.expect(r"\r[█░]+ +[0-9.]+%  [0-9.]+ [KM]B / 2\.[0-9]+ MB  [0-9.]+ [KM]B/s  ETA \d+:\d\d")
            child.sendintr()
            child.expect("Stopped waiting for hub-org/Slow-GGUF. The server goes on downloading")
            child.expect(pexpect.EOF)
        finally:
            child.close(force=True)
        assert child.exitstatus == 130
    finally:
        hub.bytes_per_second = None
    resumed = run_cli("get", "hub-org/Slow-GGUF", "-y", server=srv)
    assert resumed.code == 0, resumed.err
    assert "hub-org/slow-gguf" in model_files(srv)
    # Both `get`s followed one job: the blob was fetched once, never restarted from zero.
    starts = [rng for path, rng in hub.blob_requests() if rng is None]
    assert len(starts) == len({path for path, _ in hub.blob_requests()})


def test_get_help_names_resume(tmp_path: Path) -> None:
    result = run_cli("get", "--help")
    assert result.code == 0 and "Ctrl+C stops waiting" in result.out
