"""`lmkube operator`: the Kubernetes operator for LocalModels (lmkube.operator), in the foreground."""

from __future__ import annotations

import argparse
from typing import Any


def register(commands: Any) -> None:
    from lmkube.operator.main import add_arguments

    operator = commands.add_parser("operator", help="run the Kubernetes operator for LocalModels")
    add_arguments(operator)
    operator.set_defaults(func=run_operator)


def run_operator(args: argparse.Namespace) -> int:
    from lmkube.operator.main import run

    return run(args)
