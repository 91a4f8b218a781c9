"""`lmkube token new`: a fresh API token for `lmkube serve --api-token` (and the LocalModel Secret)."""

from __future__ import annotations

import argparse
from typing import Any


def register(commands: Any) -> None:
    token = commands.add_parser("token", help="API tokens")
    token_commands = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    token_commands.add_parser("new", help="print a fresh sk-lm-... token").set_defaults(func=new_token)


def new_token(_args: argparse.Namespace) -> int:
    from lmkube.random_ids import new_token as make_token

    print(make_token())
    return 0
