"""`lmkube operator`: runs the LocalModel operator (kopf) in this process."""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--namespace", "-n", action="append", default=[], metavar="NS",
                        help="manage LocalModels in this namespace (repeatable; default: all namespaces)")
    parser.add_argument("--liveness", metavar="URL", default=None,
                        help="serve a liveness endpoint, e.g. http://0.0.0.0:8080/healthz")
    peering = parser.add_mutually_exclusive_group()
    peering.add_argument("--peering", metavar="NAME", default=None,
                         help="coordinate with other replicas through kopf peering object NAME "
                              "(needs the kopf.dev peering CRDs); only one replica is active at a time")
    peering.add_argument("--standalone", action="store_true", help="no peering (a single replica)")
    parser.add_argument("--priority", type=int, default=None,
                        help="peering priority: the live replica with the highest one is active (default: random, "
                             "since kopf pauses every replica when two share a priority)")
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")


def exec_with_glibc_malloc() -> None:
    """Runs this same command again (same process id) with Python's objects allocated by glibc's malloc
    instead of pymalloc, unless PYTHONMALLOC is set (PYTHONMALLOC=pymalloc keeps pymalloc).

    pymalloc gives a 1 MiB arena back to the system only once every object in it is gone, and the few
    long-lived objects a burst of hundreds of models leaves behind pin many arenas: measured, 16 MiB of
    free pools stayed resident after 200 models were deleted. glibc's free pages go back page by page with
    the malloc_trim the operator runs after a burst of deletions."""
    if "PYTHONMALLOC" in os.environ or not sys.platform.startswith("linux") or not sys.orig_argv:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, {**os.environ, "PYTHONMALLOC": "malloc"})


def run(args: argparse.Namespace) -> int:
    exec_with_glibc_malloc()
    # Imported here so that `lmkube serve` never pays for kopf.
    import kopf
    from lmkube.operator import autoscaler, memreport
    from lmkube.operator.handlers import build_runtime, register

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        logging.getLogger("kubernetes").setLevel(logging.WARNING)
        logging.getLogger("httpx").setLevel(logging.WARNING)
    # A diagnostic, only with LMKUBE_OPERATOR_MEMORY_REPORT set; after the imports, which tracemalloc would slow.
    memreport.install_from_env()
    registry = kopf.OperatorRegistry()
    runtime = build_runtime()
    register(registry, runtime)
    autoscaler.register(registry, autoscaler.build_autoscaler(runtime.kube, runtime.options.settings))
    namespaces = list(dict.fromkeys(args.namespace))
    priority = args.priority
    if args.peering and priority is None:
        priority = random.SystemRandom().randint(1, 1_000_000)
    kopf.run(
        registry=registry,
        standalone=True if args.standalone else None,
        peering_name=args.peering,
        priority=priority,
        liveness_endpoint=args.liveness,
        clusterwide=not namespaces,
        namespaces=namespaces,
    )
    return 0
