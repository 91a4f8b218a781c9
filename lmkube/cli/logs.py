"""`lmkube log stream`: follow the server's log events (GET /api/v1/logs/stream, SSE)."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from typing import Any

import httpx

from .client import Client, CliError, add_connection_arguments
from .output import style

LOG_EXAMPLES = """examples:
  lmkube log stream                         prompts and answers as models see and write them
  lmkube log stream --filter output --stats answers with tokens/s and time to first token
  lmkube log stream -s server               one line per HTTP request (method, path, status, duration)
  lmkube log stream --json | jq -c .data    one JSON event per line
"""


def _filter(text: str) -> set[str]:
    kinds = {k.strip() for k in text.split(",") if k.strip()}
    if not kinds or not kinds <= {"input", "output"}:
        raise argparse.ArgumentTypeError(f"expected input, output or input,output; got {text!r}")
    return kinds


def register(commands: Any) -> None:
    log = commands.add_parser("log", help="server logs")
    actions = log.add_subparsers(dest="log_command", required=True, metavar="ACTION")
    stream = actions.add_parser("stream", help="follow the server's log events", epilog=LOG_EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    stream.add_argument("-s", "--source", choices=["model", "server"], default="model",
                        help="model: prompts and outputs (default); server: HTTP requests")
    stream.add_argument("--filter", type=_filter, default={"input", "output"}, metavar="input,output",
                        help="model source: which events (default both)")
    stream.add_argument("--json", action="store_true", help="one JSON event per line")
    stream.add_argument("--stats", action="store_true", help="model source: add prediction stats to outputs")
    add_connection_arguments(stream)
    stream.set_defaults(func=stream_logs)


def stream_logs(args: argparse.Namespace) -> int:
    client = Client.from_args(args)
    client.http.timeout = httpx.Timeout(None, connect=5.0)  # a quiet stream is not a dead one
    try:
        with client.stream("GET", "/api/v1/logs/stream", params={"source": args.source}) as response:
            announced = False
            for data in client.sse(response):
                if data is None:
                    if not announced:
                        print(f"Streaming {args.source} logs from {client.base_url} (Ctrl+C to stop)",
                              file=sys.stderr, flush=True)
                        announced = True
                    continue
                event = json.loads(data)
                if not _wanted(event, args):
                    continue
                if not args.stats:
                    event["data"].pop("stats", None)
                if args.json:
                    print(json.dumps(event, ensure_ascii=False), flush=True)
                else:
                    print(render(event), flush=True)
    except KeyboardInterrupt:
        return 0
    raise CliError("the server closed the log stream")


def _wanted(event: dict[str, Any], args: argparse.Namespace) -> bool:
    kind = event["data"].get("type", "")
    if kind.startswith("llm.prediction."):
        return kind.removeprefix("llm.prediction.") in args.filter
    return True


def render(event: dict[str, Any]) -> str:
    data = event["data"]
    when = datetime.fromtimestamp(event["timestamp"] / 1000).strftime("%Y-%m-%d %H:%M:%S")
    if data.get("type") == "server.log":
        return f"{style(when, 'dim')} {data['content']}"
    lines = [f"{style('timestamp:', 'dim')} {when}", f"{style('type:', 'dim')} {data['type']}",
             f"{style('modelIdentifier:', 'dim')} {data.get('modelIdentifier')}"]
    if "modelPath" in data:
        lines.append(f"{style('modelPath:', 'dim')} {data['modelPath']}")
    if "input" in data:
        lines += [style("input:", "cyan"), data["input"]]
    if "output" in data:
        lines += [style("output:", "green"), data["output"]]
    for key, value in (data.get("stats") or {}).items():
        lines.append(f"  {key}: {value}")
    return "\n".join(lines) + "\n"
