"""`lmkube chat`: streaming chat over /v1/chat/completions, interactive (history kept) or one-shot (-p).

Ctrl+C during a prediction closes its stream (the server sees the disconnect and frees the slot) and
returns to the prompt; Ctrl+C or EOF at the prompt ends the program."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from typing import Any

from .client import Client, CliError, add_connection_arguments
from .output import error, style

CHAT_EXAMPLES = """examples:
  lmkube chat                                  chat with the loaded model (or the first one)
  lmkube chat acme/tiny-chat -s "Be brief." --stats
  lmkube chat acme/tiny-chat -p "Say hello"    one answer to stdout, then exit
  echo "Say hello" | lmkube chat acme/tiny-chat
In a chat: Ctrl+C stops the answer being written; Ctrl+C or Ctrl+D at the prompt exits.
"""
PROMPT = "› "


def register(commands: Any) -> None:
    chat = commands.add_parser("chat", help="chat with a model", epilog=CHAT_EXAMPLES,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    chat.add_argument("model", nargs="?", help="model key or instance identifier (default: the loaded one)")
    chat.add_argument("-p", "--prompt", help="answer this prompt and exit")
    chat.add_argument("-s", "--system-prompt", help="system prompt")
    chat.add_argument("--stats", action="store_true", help="print tokens/s, time to first token and token counts")
    chat.add_argument("-n", "--max-tokens", type=int, metavar="N", help="limit each answer to N tokens")
    chat.add_argument("--ttl", type=float, default=3600.0,
                      help="idle seconds before a model this chat loads unloads (default 3600)")
    add_connection_arguments(chat)
    chat.set_defaults(func=chat_command)


def _default_model(client: Client) -> str:
    loaded = [i["id"] for i in client.get("/api/v1/instances")["instances"] if i["type"] == "llm"]
    if loaded:
        return loaded[0]
    models = [m["key"] for m in client.get("/api/v1/models")["models"] if m["type"] == "llm"]
    if not models:
        raise CliError("the server has no LLMs (download one with `lmkube get <name>`)")
    return models[0]


def chat_command(args: argparse.Namespace) -> int:
    client = Client.from_args(args)
    model = args.model or _default_model(client)
    history: list[dict[str, str]] = []
    if args.system_prompt:
        history.append({"role": "system", "content": args.system_prompt})
    prompt = args.prompt
    if prompt is None and not sys.stdin.isatty():
        prompt = sys.stdin.read()
    if prompt is not None:
        if not prompt.strip():
            raise CliError("the prompt is empty")
        history.append({"role": "user", "content": prompt})
        try:
            _reply, stats = predict(client, model, history, args)
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 130
        print()
        if args.stats:
            print_stats(stats)
        return 0
    return interactive(client, model, history, args)


def interactive(client: Client, model: str, history: list[dict[str, str]], args: argparse.Namespace) -> int:
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())
    print(style(f"Chatting with {model}. Ctrl+C stops an answer; Ctrl+C or Ctrl+D at the prompt exits.", "dim"))
    while True:
        try:
            text = input(style(PROMPT, "cyan", "bold"))
        except (KeyboardInterrupt, EOFError):
            print()
            return 0
        if not text.strip():
            continue
        history.append({"role": "user", "content": text})
        try:
            reply, stats = predict(client, model, history, args)
        except CliError as exc:  # e.g. the context is full: say so and stay in the chat
            error(exc.message)
            history.pop()
            continue
        except KeyboardInterrupt as stop:
            reply = str(stop.args[0]) if stop.args else ""
            print(style("\n[interrupted]", "yellow"), flush=True)
            if reply:
                history.append({"role": "assistant", "content": reply})
            else:
                history.pop()  # nothing came back: forget the question too
            continue
        print()
        history.append({"role": "assistant", "content": reply})
        if args.stats:
            print_stats(stats)


def predict(client: Client, model: str, messages: list[dict[str, str]],
            args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """Streams one answer to stdout. Ctrl+C closes the stream and re-raises KeyboardInterrupt with the
    partial text as its argument."""
    body: dict[str, Any] = {"model": model, "messages": messages, "stream": True, "ttl": args.ttl,
                            "stream_options": {"include_usage": True}}
    if args.max_tokens is not None:
        body["max_tokens"] = args.max_tokens
    parts: list[str] = []
    usage: dict[str, Any] = {}
    started = time.perf_counter()
    first: float | None = None
    try:
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            for data in client.sse(response):
                if data is None or data == "[DONE]":
                    continue
                chunk = json.loads(data)
                if "error" in chunk:
                    message = chunk["error"].get("message") if isinstance(chunk["error"], dict) else chunk["error"]
                    raise CliError(str(message))
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        if first is None:
                            first = time.perf_counter()
                        parts.append(text)
                        sys.stdout.write(text)
                        sys.stdout.flush()
    except KeyboardInterrupt:
        raise KeyboardInterrupt("".join(parts)) from None
    end = time.perf_counter()
    completion = usage.get("completion_tokens", 0)
    stats = {
        "time_to_first_token_seconds": None if first is None else round(first - started, 3),
        "tokens_per_second": round((completion - 1) / (end - first), 2) if first and completion > 1 and end > first
        else None,
        "prompt_tokens": usage.get("prompt_tokens"), "completion_tokens": completion,
        "total_tokens": usage.get("total_tokens"),
    }
    return "".join(parts), stats


def print_stats(stats: dict[str, Any]) -> None:
    tps = stats["tokens_per_second"]
    ttft = stats["time_to_first_token_seconds"]
    print(style(f"Prediction stats: {'-' if tps is None else f'{tps:.2f}'} tok/s, time to first token "
                f"{'-' if ttft is None else f'{ttft:.3f}'} s, prompt {stats['prompt_tokens']} tokens, "
                f"generated {stats['completion_tokens']} tokens, total {stats['total_tokens']} tokens", "dim"))
