"""The `lmkube` command line: the server and operator (serve, operator, token, server) and lms-style client
commands (get, ls, load, unload, ps, chat, log) that talk to a server over HTTP."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lmkube import __version__

from . import api_tokens, background_server, chat, foreground_server, gateway, get, kube_operator, logs, models
from .client import CliError
from .output import error

EXAMPLES = """examples:
  lmkube server start -d              a server in the background (lmkube serve runs one in the foreground)
  lmkube get qwen3 -y                 download a GGUF model through the server
  lmkube ls                           the server's models
  lmkube load acme/tiny-chat --estimate-only
  lmkube chat acme/tiny-chat --stats
  lmkube ps                           loaded models, their status and queues
  lmkube log stream --stats           prompts and answers as they happen
Client commands reach http://127.0.0.1:1234 unless --host/--port or LMKUBE_BASE_URL say otherwise; the API
token comes from LMKUBE_API_TOKEN. NO_COLOR turns colours off.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmkube", description="LM Studio-compatible local model server.",
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"lmkube {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (foreground_server, api_tokens, kube_operator, gateway, background_server, get, models, chat, logs):
        module.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CliError as exc:
        error(exc.message)
        return exc.code
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # `lmkube ls | head`
        return 0


__all__ = ["build_parser", "main"]
