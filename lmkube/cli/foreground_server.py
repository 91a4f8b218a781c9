"""`lmkube serve`: the model server in this process, in the foreground.

Every default comes from `lmkube.server.config` (ServerConfig, RuntimeSettings): the help text shows it
with %(default)s, and a flag left out leaves the setting as the server defines it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from lmkube import __version__
from lmkube.server.config import DEFAULT_MAX_BODY_BYTES, RuntimeSettings, SamplingDefaults, ServerConfig

from .arg_types import non_negative_float, non_negative_int, positive_float, positive_int, unit_interval

SERVE_EXAMPLES = """examples:
  lmkube serve --demo                      offline demo models (SmolLM2-135M-Instruct), http://127.0.0.1:1234
  lmkube serve --models-dir ~/models --parallel 8 --api-token "$(lmkube token new)"
"""


# llama.cpp's LLAMA_MAX_SEQ: a context with more sequences is refused.
MAX_PARALLEL = 256


def _slot_count(text: str) -> int:
    value = positive_int(text)
    if value > MAX_PARALLEL:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_PARALLEL}, got {value}")
    return value


def add_serve_arguments(serve: argparse.ArgumentParser) -> None:
    serve.add_argument("--host", default=ServerConfig.host, help="address to bind (default %(default)s)")
    serve.add_argument("--port", type=int, default=ServerConfig.port, help="port (default %(default)s)")
    serve.add_argument("--models-dir", type=Path, help="model store (default $LMKUBE_HOME/models)")
    serve.add_argument("--parallel", type=_slot_count, default=RuntimeSettings.parallel,
                       help=f"concurrent requests per model instance, 1-{MAX_PARALLEL} (default %(default)s)")
    serve.add_argument("--ctx-size", type=positive_int, default=RuntimeSettings.default_context_length,
                       help="default context length, capped at the model's trained context (default %(default)s)")
    serve.add_argument("--ttl", type=float, default=RuntimeSettings.jit_ttl,
                       help="idle seconds before a JIT-loaded model unloads; 0: never (default %(default).0f)")
    serve.add_argument("--max-queue", type=non_negative_int, default=RuntimeSettings.max_queue, metavar="N",
                       help="requests waiting per model instance beyond the --parallel running ones; more get "
                            "503 with Retry-After (529 on /v1/messages); 0: no waiting (default: unbounded)")
    serve.add_argument("--cache-ram", type=non_negative_int, default=RuntimeSettings.cache_ram_mib, metavar="MIB",
                       help="host memory per model for prompt caches of finished requests, kept out of the KV "
                            "cache while others run and brought back for a prompt that continues them; "
                            "0: keep them in the KV cache (default %(default)s)")
    serve.add_argument("--max-body-size", type=positive_int, default=DEFAULT_MAX_BODY_BYTES >> 20, metavar="MIB",
                       help="largest request body in MiB; a larger one gets 413 before it is read "
                            "(default %(default)s)")
    sampling = serve.add_argument_group(
        "sampling defaults", "for requests that leave the parameter out (a request's own value or preset wins)")
    sampling.add_argument("--temp", type=non_negative_float, default=SamplingDefaults.temperature,
                          help="temperature; 0: greedy, the same answer every time (default %(default)g)")
    sampling.add_argument("--top-k", type=non_negative_int, default=SamplingDefaults.top_k,
                          help="top-k; 0: off (default %(default)s)")
    sampling.add_argument("--top-p", type=unit_interval, default=SamplingDefaults.top_p,
                          help="top-p; 1: off (default %(default)g)")
    sampling.add_argument("--min-p", type=unit_interval, default=SamplingDefaults.min_p,
                          help="min-p; 0: off (default %(default)g)")
    sampling.add_argument("--repeat-penalty", type=positive_float, default=SamplingDefaults.repeat_penalty,
                          help="penalty on the last 64 tokens' repeats; 1: off (default %(default)g)")
    serve.add_argument("--no-jit", action="store_true", help="do not load models on first request")
    serve.add_argument("--no-auto-evict", action="store_true",
                       help="keep earlier JIT-loaded models when JIT-loading another")
    serve.add_argument("--api-token", action="append", default=[], metavar="TOKEN",
                       help="require this API token (repeatable; also LMKUBE_API_TOKENS)")
    serve.add_argument("--api-token-file", action="append", default=[], type=Path, metavar="FILE",
                       help="file with one API token per line (repeatable)")
    serve.add_argument("--threads", type=int, default=RuntimeSettings.n_threads,
                       help="CPU threads per model (default: all cores)")
    serve.add_argument("--public-metrics", action="store_true",
                       help="serve GET /metrics without an API token (for Prometheus scrapes without credentials)")
    serve.add_argument("--cors", action="store_true", help="allow cross-origin requests from browsers")
    serve.add_argument("--allow-image-urls", action="store_true",
                       help="fetch http(s) image URLs in chat requests (off: only base64 data URLs are taken); "
                            "each image at most 20 MB and 10 s")
    serve.add_argument("--allow-remote-mcp", action="store_true",
                       help="allow per-request MCP servers (ephemeral_mcp integrations on /api/v1/chat)")
    serve.add_argument("--mcp-json", type=Path, metavar="FILE",
                       help="the mcp.json of the MCP servers that integrations name (default: $LMKUBE_HOME/mcp.json)")
    serve.add_argument("--mcp-call-timeout", type=float, default=ServerConfig.mcp_call_timeout, metavar="SECONDS",
                       help="longest one MCP tool call may take; past it the call fails (default: %(default)g)")
    serve.add_argument("--mcp-idle-timeout", type=float, default=ServerConfig.mcp_idle_timeout, metavar="SECONDS",
                       help="close an mcp.json server's session (stop a stdio server) after this long unused "
                            "(default: %(default)g)")
    serve.add_argument("--demo", action="store_true",
                       help="add the offline demo models: huggingfacetb/smollm2-135m-instruct (a small real "
                            "instruct model, cached by set-up), lmkube/demo (random weights, gibberish, fast) and "
                            "lmkube/demo-vision (the same with a random vision projector: takes images)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def register(commands: Any) -> None:
    serve_parser = commands.add_parser(
        "serve", help="run the model server", epilog=SERVE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_serve_arguments(serve_parser)
    serve_parser.set_defaults(func=serve)


def server_config(args: argparse.Namespace, models_dir: Path, tokens: tuple[str, ...]) -> ServerConfig:
    """The settings `lmkube serve` runs with, from its flags."""
    return ServerConfig(
        host=args.host,
        port=args.port,
        models_dir=models_dir,
        runtime=RuntimeSettings(
            default_context_length=args.ctx_size,
            parallel=args.parallel,
            jit=not args.no_jit,
            auto_evict=not args.no_auto_evict,
            jit_ttl=args.ttl if args.ttl > 0 else None,
            n_threads=args.threads,
            max_queue=args.max_queue,
            cache_ram_mib=args.cache_ram,
            fetch_image_urls=args.allow_image_urls,
            sampling=SamplingDefaults(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                                      repeat_penalty=args.repeat_penalty),
        ),
        api_tokens=tokens,
        cors=args.cors,
        public_metrics=args.public_metrics,
        allow_remote_mcp=args.allow_remote_mcp,
        mcp_call_timeout=args.mcp_call_timeout,
        mcp_json=args.mcp_json,
        mcp_idle_timeout=args.mcp_idle_timeout,
        max_body_bytes=args.max_body_size << 20,
    )


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from lmkube.real_model import RealModelUnavailable
    from lmkube.server.app import create_app
    from lmkube.server.config import collect_api_tokens
    from lmkube.server.demo import ensure_demo_model, ensure_demo_vision_model, link_real_model
    from lmkube.server.store.paths import default_models_dir

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    models_dir = (args.models_dir or default_models_dir()).expanduser()
    models_dir.mkdir(parents=True, exist_ok=True)
    if args.demo:
        ensure_demo_model(models_dir)
        ensure_demo_vision_model(models_dir)
        try:
            link_real_model(models_dir)
        except RealModelUnavailable as exc:
            # Still serve the random-weight model, so the endpoints can be tried; say why answers are gibberish.
            print(f"lmkube: warning: only lmkube/demo and lmkube/demo-vision (random weights) are served: {exc}",
                  file=sys.stderr)
    try:
        tokens = collect_api_tokens(args.api_token, args.api_token_file)
    except OSError as exc:
        print(f"lmkube: cannot read API token file: {exc}", file=sys.stderr)
        return 2
    config = server_config(args, models_dir, tokens)
    print(f"lmkube {__version__} serving {models_dir} on http://{args.host}:{args.port}"
          + (f" ({len(tokens)} API token(s) required)" if tokens else ""), flush=True)
    uvicorn.run(create_app(config), host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=5)
    return 0
