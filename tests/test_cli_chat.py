"""`lmkube chat` against a real server: one-shot (-p, piped stdin) and interactive in a pseudo-terminal
(pexpect), where Ctrl+C stops only the running prediction and frees the server's slot."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from typing import Any

import httpx
import pexpect
import pytest
from cli_support import cli_env, run_cli
from support import LMKUBE, ServerProcess, write_test_models

from lmkube.synthetic_gguf import LlamaShape, write_llama_model

LONG_MODEL = "acme/long-chat"  # never stops on its own: a prediction runs until it is interrupted
CONTEXT = 32768


@pytest.fixture(scope="module")
def srv(start_server: Callable[..., ServerProcess], tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    models = tmp_path_factory.mktemp("chat-models")
    write_test_models(models)
    write_llama_model(models / "acme" / "long-chat" / "long-chat-F32.gguf", dtype="f32", seed=4, name="Long Chat",
                      shape=LlamaShape(n_ctx_train=CONTEXT))
    server = start_server(models, "--threads", "1")
    # One slot: a prediction that kept running after Ctrl+C would make the next one wait.
    response = httpx.post(f"{server.base_url}/api/v1/models/load", timeout=60,
                          json={"model": LONG_MODEL, "context_length": CONTEXT, "parallel": 1})
    assert response.status_code == 200, response.text
    return server


def instance(server: ServerProcess) -> dict[str, Any]:
    [found] = [i for i in httpx.get(f"{server.base_url}/api/v1/instances", timeout=10).json()["instances"]
               if i["id"] == LONG_MODEL]
    return found


def wait_for(server: ServerProcess, check: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while True:
        state = instance(server)
        if check(state):
            return state
        assert time.monotonic() < deadline, f"the instance never became {what}: {state}"
        time.sleep(0.05)


def test_one_shot_prompt_with_stats(srv: ServerProcess) -> None:
    result = run_cli("chat", "acme/byte-chat", "-p", "hi there", "-s", "Be brief.", "--stats", server=srv)
    assert result.code == 0, result.err
    answer, stats = result.out.rstrip("\n").rsplit("\n", 1)
    assert answer.strip()
    assert stats.startswith("Prediction stats: ") and " tok/s, time to first token " in stats
    assert "generated " in stats and "prompt " in stats


def test_piped_stdin_is_the_prompt(srv: ServerProcess) -> None:
    done = subprocess.run([LMKUBE, "chat", "acme/byte-chat"], input="hello", capture_output=True, text=True,
                          env=cli_env(srv), timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()


def test_unknown_model_is_one_line(srv: ServerProcess) -> None:
    result = run_cli("chat", "nope/none", "-p", "hi", server=srv)
    assert result.code == 1 and result.err.count("\n") == 1 and 'Model "nope/none" not found' in result.err


def test_ctrl_c_interrupts_only_the_prediction(srv: ServerProcess) -> None:
    child = pexpect.spawn(LMKUBE, ["chat", LONG_MODEL], env=cli_env(srv, TERM="dumb"), encoding="utf-8",
                          timeout=60)
    try:
        child.expect("Chatting with acme/long-chat")
        for turn in ("first question", "second question"):
            child.expect_exact("› ")
            child.sendline(turn)
            # The prediction is running on the server, and its text reaches the terminal.
            state = wait_for(srv, lambda s: s["status"] == "generating", "busy")
            assert (state["active"], state["queued"]) == (1, 0)
            child.expect(r"\S{3}")
            child.sendintr()
            child.expect_exact("[interrupted]")
            # The stream was closed: the server stopped generating and freed the only slot.
            wait_for(srv, lambda s: s["status"] == "idle" and s["active"] == 0 and s["queued"] == 0, "idle")
            assert child.isalive()
        child.expect_exact("› ")
        child.sendintr()  # at the prompt: exits
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_full_turns_then_eof_exits(srv: ServerProcess) -> None:
    child = pexpect.spawn(LMKUBE, ["chat", "acme/byte-chat", "--stats", "-n", "20"], env=cli_env(srv, TERM="dumb"),
                          encoding="utf-8", timeout=60)
    try:
        for turn in ("hi", "and again"):
            child.expect_exact("› ")
            child.sendline(turn)
            child.expect(r"Prediction stats: [0-9.-]+ tok/s, .* generated (\d+) tokens")
            assert int(child.match.group(1)) <= 20
        child.expect_exact("› ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
