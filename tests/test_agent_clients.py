"""Claude Code and the Codex CLI, as released on npm (scripts/install-agent-clients.sh), run non-interactively
against a real `lmkube serve`.

The clients run with a temporary HOME and CODEX_HOME, no proxy, telemetry, auto-update and other
non-essential traffic off, and only the loopback server as their endpoint. Their full default prompts
(Claude Code ≈ 12k tokens, Codex ≈ 9k) exceed SmolLM2's 8,192-token context, so the default set-ups run
on a random-weight model with a long context (acme/long-chat), and the real model gets the clients' own
slimmer options (`--bare`, a short system prompt; Codex's `model_instructions_file` and features off).
SmolLM2-135M never calls a tool by itself, so the tool turns force the first call with the
`lmkube-tool-choice` header, set through each client's own header option. Neither client sends a temperature,
and at the server's default (0.8) SmolLM2 now and then writes a command or an answer that runs into the
output limit (seen in 2 of 60 forced calls and 4 of 30 answers to the tool's result, replaying Claude Code's
requests), so the tool turns run on a server started as a user of such a small model would: `--temp 0`.
Even so, Codex's turn fails now and then when SmolLM2's answer to the command's output repeats itself into
Codex's output limit; that test accepts this one failure, after the round trip, and nothing else.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from lmkube.server.demo import link_real_model
from support import REAL_MODEL, ServerProcess

from lmkube.random_ids import new_token
from lmkube.synthetic_gguf import LlamaShape, write_llama_model

ROOT = Path(__file__).resolve().parent.parent
LONG_CHAT = "acme/long-chat"
# Seconds. A 135M model on two busy cores prefills a few hundred tokens a second and may write a few hundred
# tokens at a few a second before it stops (neither client can cap Codex's output).
CLIENT_TIMEOUT = 1200
pytestmark = pytest.mark.timeout(CLIENT_TIMEOUT + 300)
# Claude Code fails a run whose reply reaches its output limit, and Claude Code sends no temperature, so the
# real model samples at the server's default (0.8): a limit far above a one-sentence answer.
ANSWER_TOKENS = "1024"


@pytest.fixture(scope="module")
def clients() -> dict[str, str]:
    """name → executable, installed (once, cached by version) by the script `make test` also runs."""
    out = subprocess.run(["bash", str(ROOT / "scripts" / "install-agent-clients.sh")], check=True,
                         capture_output=True, text=True, timeout=1800).stdout
    return dict(line.split(" ", 1) for line in out.splitlines())


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, real_model_file: Path) -> tuple[Path, str]:
    models = tmp_path_factory.mktemp("agent-models")
    link_real_model(models, real_model_file)
    smollm2 = REAL_MODEL
    # Ends its turns after a few dozen tokens; a context long enough for either client's default prompt.
    write_llama_model(models / "acme" / "long-chat" / "long-chat-F16.gguf", LlamaShape(n_ctx_train=65536),
                      seed=7, emit_eos=True, eos_gain=2.0)
    return models, smollm2


@pytest.fixture(scope="module")
def token() -> str:
    return new_token()


@pytest.fixture(scope="module")
def server(start_server: Any, models: tuple[Path, str], token: str) -> ServerProcess:
    return start_server(models[0], "--api-token", token, "--ctx-size", "65536", "--parallel", "1", token=token)


@pytest.fixture(scope="module")
def greedy_server(start_server: Any, models: tuple[Path, str], token: str) -> ServerProcess:
    return start_server(models[0], "--api-token", token, "--parallel", "1", "--temp", "0", token=token)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    (tmp_path / "home").mkdir()
    (tmp_path / "work").mkdir()
    return tmp_path


def client_env(home: Path, **extra: str) -> dict[str, str]:
    """A clean environment: the client's own HOME, no proxies, nothing but loopback to talk to."""
    env = {"PATH": os.environ["PATH"], "HOME": str(home / "home"), "LANG": "C.UTF-8", "TERM": "dumb",
           "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    return {**env, **extra}


def run_client(command: list[str], home: Path, env: dict[str, str],
               excused: Callable[[subprocess.CompletedProcess[str]], bool] | None = None,
               ) -> subprocess.CompletedProcess[str]:
    """Runs the client; it must exit 0, unless `excused` says why its failure is the model's, not the server's."""
    started = time.monotonic()
    result = subprocess.run(command, cwd=home / "work", env=env, capture_output=True, text=True,
                            timeout=CLIENT_TIMEOUT, stdin=subprocess.DEVNULL)
    print(f"{Path(command[0]).name} took {time.monotonic() - started:.1f} s")  # the wall time, with -s
    assert result.returncode == 0 or (excused is not None and excused(result)), \
        f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


# -- Claude Code ------------------------------------------------------------------------------------


def claude_env(server: ServerProcess, home: Path, **extra: str) -> dict[str, str]:
    return client_env(home, ANTHROPIC_BASE_URL=server.base_url, ANTHROPIC_API_KEY=server.token or "",
                      CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1", DISABLE_TELEMETRY="1",
                      DISABLE_AUTOUPDATER="1", DISABLE_ERROR_REPORTING="1", **extra)


def test_claude_code_default_setup_gets_a_reply(clients: dict[str, str], server: ServerProcess, home: Path) -> None:
    """Every request shape of an unmodified run: a system message inside `messages`, 12 tools (one deferred),
    adaptive thinking, context management, effort; a reply comes back and the run exits 0."""
    result = run_client([clients["claude-code"], "-p", "Say hello", "--model", LONG_CHAT], home,
                        claude_env(server, home, CLAUDE_CODE_MAX_OUTPUT_TOKENS=ANSWER_TOKENS))
    assert result.stdout.strip()


def test_claude_code_real_model_answers(clients: dict[str, str], server: ServerProcess, models: tuple[Path, str],
                                        home: Path) -> None:
    result = run_client([clients["claude-code"], "-p", "What is the capital of France?", "--model", models[1],
                         "--bare", "--tools", "", "--system-prompt", "Answer in one short sentence."], home,
                        claude_env(server, home, CLAUDE_CODE_MAX_OUTPUT_TOKENS=ANSWER_TOKENS))
    assert result.stdout.strip()


def test_claude_code_calls_a_tool_and_sends_the_result_back(clients: dict[str, str], greedy_server: ServerProcess,
                                                            models: tuple[Path, str], home: Path) -> None:
    result = run_client([clients["claude-code"], "-p", "Run the shell command: echo lmkube-tool-ok",
                         "--model", models[1], "--bare", "--tools", "Bash", "--allowedTools", "Bash",
                         "--system-prompt", "You run shell commands for the user with the Bash tool.",
                         "--output-format", "stream-json", "--verbose"], home,
                        claude_env(greedy_server, home, CLAUDE_CODE_MAX_OUTPUT_TOKENS=ANSWER_TOKENS,
                                   ANTHROPIC_CUSTOM_HEADERS="lmkube-tool-choice: Bash"))
    events = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    blocks = [(e["type"], block) for e in events if e.get("type") in ("assistant", "user")
              for block in e["message"]["content"] if isinstance(block, dict)]
    calls = [block for kind, block in blocks if kind == "assistant" and block["type"] == "tool_use"]
    assert calls and calls[0]["name"] == "Bash"
    results = [block for kind, block in blocks if kind == "user" and block["type"] == "tool_result"]
    assert results and results[0]["tool_use_id"] == calls[0]["id"]
    final = events[-1]
    assert final["type"] == "result" and final["subtype"] == "success" and final["num_turns"] >= 2


# -- Codex ------------------------------------------------------------------------------------------

# Codex's own options for a small context: a short base prompt, and its optional tool families off.
SLIM_CODEX = ('model_instructions_file = "{instructions}"\nweb_search = "disabled"\n'
              "include_apps_instructions = false\n",
              "[features]\nmulti_agent = false\ngoals = false\napps = false\nskills = false\n")


def codex_home(home: Path, *configs: tuple[str, str]) -> dict[str, str]:
    """A CODEX_HOME whose config.toml joins `configs`' (top-level keys, tables) pairs: keys before any table."""
    codex = home / "codex-home"
    codex.mkdir()
    (home / "instructions.md").write_text("You are a coding agent in a terminal. Answer in one short sentence.\n")
    configs = (("check_for_update_on_startup = false\n", "[analytics]\nenabled = false\n"), *configs)
    text = "".join(top for top, _ in configs) + "".join(tables for _, tables in configs)
    (codex / "config.toml").write_text(text.replace("{instructions}", str(home / "instructions.md")))
    return {"CODEX_HOME": str(codex)}


def provider(server: ServerProcess, model: str, headers: str = "") -> tuple[str, str]:
    return (f'model = "{model}"\nmodel_provider = "lmkube"\n',
            f'[model_providers.lmkube]\nname = "lmkube"\nbase_url = "{server.base_url}/v1"\n'
            f'env_key = "LMKUBE_API_KEY"\nwire_api = "responses"\n{headers}')


def codex_exec(clients: dict[str, str], *args: str) -> list[str]:
    return [clients["codex"], "exec", "--skip-git-repo-check", "--color", "never", *args]


def test_codex_default_setup_through_a_responses_provider(clients: dict[str, str], server: ServerProcess,
                                                          home: Path) -> None:
    """Unmodified apart from the provider: developer items, a namespace of tools, web_search; exits 0."""
    env = client_env(home, LMKUBE_API_KEY=server.token or "", **codex_home(home, provider(server, LONG_CHAT)))
    result = run_client(codex_exec(clients, "Say hello"), home, env)
    assert result.stdout.strip()


def test_codex_real_model_through_the_lm_studio_provider(clients: dict[str, str], start_server: Any,
                                                         models: tuple[Path, str], home: Path) -> None:
    """`--oss` with the built-in LM Studio provider, which sends no key: a server without tokens."""
    open_server = start_server(models[0], "--ctx-size", "3072")  # bounds what a rambling answer can take
    env = client_env(home, CODEX_OSS_BASE_URL=f"{open_server.base_url}/v1", **codex_home(home, SLIM_CODEX))
    result = run_client(codex_exec(clients, "--oss", "--local-provider", "lmstudio", "-m", models[1],
                                   "Say hello in one word."), home, env)
    assert result.stdout.strip()


def test_codex_calls_a_tool_and_sends_the_result_back(clients: dict[str, str], greedy_server: ServerProcess,
                                                      models: tuple[Path, str], home: Path) -> None:
    headers = 'http_headers = { "lmkube-tool-choice" = "exec_command" }\n'
    env = client_env(home, LMKUBE_API_KEY=greedy_server.token or "",
                     **codex_home(home, SLIM_CODEX, provider(greedy_server, models[1], headers)))
    result = run_client(codex_exec(clients, "--json", "Run the shell command: echo lmkube-tool-ok"), home, env,
                        excused=answer_ran_into_the_output_limit)
    events = codex_events(result)
    items = [e["item"] for e in events if e.get("type") == "item.completed"]
    commands = [item for item in items if item.get("type") == "command_execution"]
    assert commands, events
    # The command's output went back to the model, whose answer ends the turn.
    assert items[-1].get("type") == "agent_message" and items.index(commands[0]) < len(items) - 1
    assert events[-1].get("type") == "turn.completed" or answer_ran_into_the_output_limit(result), events[-1]


def codex_events(result: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def answer_ran_into_the_output_limit(result: subprocess.CompletedProcess[str]) -> bool:
    """SmolLM2 at temperature 0 now and then answers the command's output by repeating itself until Codex's
    output limit (1 run in 3 to 6 here, whatever the command printed; a repeat penalty of 1.3 made it worse),
    and Codex then fails the turn. That comes after the round trip this test is about, and is the model's:
    the answer began, after the command's output had gone back."""
    events = codex_events(result)
    items = [e["item"] for e in events if e.get("type") == "item.completed"]
    kinds = [item.get("type") for item in items]
    return (bool(events) and events[-1].get("type") == "turn.failed"
            and "max_output_tokens" in str(events[-1].get("error"))
            and "command_execution" in kinds and kinds[-1] == "agent_message")
