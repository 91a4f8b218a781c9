"""`lmkube gateway`: one endpoint for every LocalModel (see gateway/ and docs/gateway.md)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

GATEWAY_EXAMPLES = """examples:
  lmkube gateway --namespace models --keys-namespace lmkube      in a cluster (what the chart runs)
  lmkube gateway --backends backends.yaml --keys-file keys.yaml    fixed replicas, for local use and tests
"""


def register(commands: Any) -> None:
    gateway = commands.add_parser(
        "gateway", help="one OpenAI/Anthropic/LM Studio endpoint for every LocalModel, routed by `model`",
        epilog=GATEWAY_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    gateway.add_argument("--host", default="0.0.0.0", help="address to bind (default 0.0.0.0)")
    gateway.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    source = gateway.add_mutually_exclusive_group()
    source.add_argument("--backends", type=Path, metavar="FILE",
                        help="LocalModels and replica URLs from this YAML/JSON file instead of the Kubernetes API")
    source.add_argument("--namespace", action="append", default=[], metavar="NS",
                        help="serve the LocalModels of this namespace (repeatable; default: all namespaces)")
    gateway.add_argument("--keys-namespace", metavar="NS", default=os.environ.get("POD_NAMESPACE"),
                         help="read gateway keys from Secrets labelled lmkube.dev/gateway-key in this namespace "
                              "(default: $POD_NAMESPACE)")
    gateway.add_argument("--keys-file", type=Path, metavar="FILE", help="gateway keys from this YAML/JSON file")
    gateway.add_argument("--no-auth", action="store_true",
                         help="no keys: anyone who reaches the gateway may use every model (local use only)")
    gateway.add_argument("--upstream-token-file", type=Path, metavar="FILE",
                         help="the credential the model servers accept from the gateway (also "
                              "LMKUBE_GATEWAY_UPSTREAM_TOKEN)")
    gateway.add_argument("--drain-seconds", type=float, default=30.0,
                         help="on SIGTERM, how long in-flight requests may run on (default 30)")
    gateway.add_argument("--scale-from-zero-seconds", type=float, metavar="S",
                         default=float(os.environ.get("LMKUBE_GATEWAY_SCALE_FROM_ZERO_SECONDS") or 300),
                         help="hold a request for a LocalModel scaled to zero (spec.scaling.minReplicas: 0) this long "
                              "while a replica starts; 0 answers 503 at once (default 300, or "
                              "$LMKUBE_GATEWAY_SCALE_FROM_ZERO_SECONDS)")
    gateway.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    gateway.set_defaults(func=run_gateway)


def _upstream_token(args: argparse.Namespace) -> str | None:
    if args.upstream_token_file is not None:
        return args.upstream_token_file.read_text().strip() or None
    return os.environ.get("LMKUBE_GATEWAY_UPSTREAM_TOKEN") or None


def run_gateway(args: argparse.Namespace) -> int:
    import uvicorn

    from lmkube.gateway.app import Discovery, GatewaySettings, create_app
    from lmkube.gateway.catalog import Catalog
    from lmkube.gateway.keys import KeyRing, load_keys_file

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    catalog = Catalog()
    keys = KeyRing(load_keys_file(args.keys_file) if args.keys_file else None)
    discoveries: list[Discovery] = []
    if args.backends is not None:
        from lmkube.gateway.static import StaticDiscovery

        discoveries.append(StaticDiscovery(args.backends, catalog))
        key_namespace = None
    else:
        from lmkube.gateway.kube import KubeDiscovery

        key_namespace = args.keys_namespace
        kube_discovery = KubeDiscovery(catalog, keys, args.namespace, key_namespace)
        discoveries.append(kube_discovery)
    if not args.no_auth and not args.keys_file and key_namespace is None:
        print("lmkube gateway: no keys: give --keys-file, --keys-namespace (or $POD_NAMESPACE), or --no-auth",
              file=sys.stderr)
        return 2
    settings = GatewaySettings(upstream_token=_upstream_token(args), open_access=args.no_auth)
    app = create_app(catalog, keys, settings, discoveries)
    if args.backends is None:
        from lmkube.gateway.wake import ScaleSubresource, Waker

        config = kube_discovery.config
        app.waker = Waker(catalog, ScaleSubresource(kube_discovery.client, config.server, config.token),
                          args.scale_from_zero_seconds)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                lifespan="on", timeout_graceful_shutdown=int(args.drain_seconds))
    return 0
