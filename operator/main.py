"""`lmkube operator`: runs the LocalModel operator (kopf) in this process."""

from __future__ import annotations

import argparse
import logging
import random


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


def run(args: argparse.Namespace) -> int:
    # Imported here so that `lmkube serve` never pays for kopf.
    import kopf
    from lmkube.operator import autoscaler
    from lmkube.operator.handlers import build_runtime, register

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        logging.getLogger("kubernetes").setLevel(logging.WARNING)
        logging.getLogger("httpx").setLevel(logging.WARNING)
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
