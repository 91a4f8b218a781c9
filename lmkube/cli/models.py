"""`lmkube ls`, `load`, `unload` and `ps`: the server's models and loaded instances."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from typing import Any

from .arg_types import positive_int
from .client import Client, CliError, add_connection_arguments
from .output import ago, choose, duration, gib, human_bytes, print_json, style, table

LS_EXAMPLES = """examples:
  lmkube ls                         all models, LLMs and embedding models apart
  lmkube ls --llm --variants        LLMs with every variant (* marks the one that loads by default)
  lmkube ls acme/tiny-chat          one model and its variants
  lmkube ls --json | jq '.[].modelKey'
"""
LOAD_EXAMPLES = """examples:
  lmkube load acme/tiny-chat                         the default variant, no idle TTL
  lmkube load acme/tiny-chat@f32 -c 8192 --parallel 8 --identifier chat
  lmkube load acme/tiny-chat --ttl 600 --gpu 0.5     unload after 10 idle minutes, half the layers on the GPU
  lmkube load acme/tiny-chat --estimate-only         memory estimate only; loads nothing
"""
UNLOAD_EXAMPLES = """examples:
  lmkube unload                 the only loaded model
  lmkube unload chat            one instance, by identifier
  lmkube unload --all
"""
PS_EXAMPLES = """examples:
  lmkube ps
  lmkube ps --json | jq '.[] | {identifier, status, queued}'
"""


def _gpu(text: str) -> str | float:
    if text in ("off", "max"):
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected off, max or a number from 0 to 1, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text}")
    return value


def register(commands: Any) -> None:
    raw = argparse.RawDescriptionHelpFormatter
    ls = commands.add_parser("ls", help="list the server's models", epilog=LS_EXAMPLES, formatter_class=raw)
    ls.add_argument("key", nargs="?", help="show only this model (and its variants)")
    ls.add_argument("--llm", action="store_true", help="only LLMs")
    ls.add_argument("--embedding", action="store_true", help="only embedding models")
    ls.add_argument("--variants", action="store_true", help="list every variant of each model")
    ls.add_argument("--json", action="store_true", help="print JSON")
    add_connection_arguments(ls)
    ls.set_defaults(func=list_models)

    load = commands.add_parser("load", help="load a model", epilog=LOAD_EXAMPLES, formatter_class=raw)
    load.add_argument("model", nargs="?", help="model key, key@variant or file name (asked for on a terminal)")
    load.add_argument("--ttl", type=float, metavar="S", help="unload after S idle seconds (default: never)")
    load.add_argument("--gpu", type=_gpu, metavar="off|max|0..1", help="share of the layers to offload to the GPU")
    load.add_argument("-c", "--context-length", type=positive_int, metavar="N", help="context length in tokens")
    load.add_argument("--parallel", type=positive_int, metavar="N", help="concurrent predictions")
    load.add_argument("--identifier", metavar="ID", help="the name to address the loaded instance by")
    load.add_argument("--draft-model", metavar="KEY",
                      help="speculative decoding: a smaller model with the same vocabulary drafts tokens")
    load.add_argument("--estimate-only", action="store_true", help="print the memory estimate; load nothing")
    load.add_argument("--evict", action="store_true",
                      help="if it does not fit the free memory, unload other models first (least recently used)")
    load.add_argument("--force", action="store_true", help="load even if the estimate does not fit the free memory")
    load.add_argument("-y", "--yes", action="store_true", help="no questions: take the first model if none is named")
    load.add_argument("--json", action="store_true", help="print the server's answer as JSON")
    add_connection_arguments(load)
    load.set_defaults(func=load_model)

    unload = commands.add_parser("unload", help="unload models", epilog=UNLOAD_EXAMPLES, formatter_class=raw)
    unload.add_argument("identifier", nargs="?", help="instance to unload (default: the only loaded one)")
    unload.add_argument("-a", "--all", action="store_true", help="unload every loaded model")
    add_connection_arguments(unload)
    unload.set_defaults(func=unload_models)

    ps = commands.add_parser("ps", help="list loaded models", epilog=PS_EXAMPLES, formatter_class=raw)
    ps.add_argument("--json", action="store_true", help="print JSON")
    add_connection_arguments(ps)
    ps.set_defaults(func=list_instances)


# -- ls ---------------------------------------------------------------------------------------------


def model_json(m: dict[str, Any]) -> dict[str, Any]:
    """The SDK's ModelInfo (what `lms ls --json` prints) from a /api/v1/models entry."""
    quant = m.get("quantization") or {}
    info: dict[str, Any] = {
        "type": m["type"], "modelKey": m["key"], "format": m.get("format", "gguf"),
        "displayName": m.get("display_name"), "publisher": m.get("publisher"), "path": m["key"],
        "sizeBytes": m.get("size_bytes"), "indexedModelIdentifier": m["key"], "deviceIdentifier": None,
        "paramsString": m.get("params_string"), "architecture": m.get("architecture"),
        "quantization": {"name": quant.get("name"), "bits": quant.get("bits_per_weight")},
        "variants": m.get("variants", []), "selectedVariant": m.get("selected_variant"),
        "loadedInstances": [i["id"] for i in m.get("loaded_instances", [])],
    }
    if m["type"] == "llm":
        caps = m.get("capabilities") or {}
        info["vision"] = bool(caps.get("vision"))
        info["trainedForToolUse"] = bool(caps.get("trained_for_tool_use"))
    info["maxContextLength"] = m.get("max_context_length")
    return info


def _select(models: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.llm and not args.embedding:
        models = [m for m in models if m["type"] == "llm"]
    elif args.embedding and not args.llm:
        models = [m for m in models if m["type"] == "embedding"]
    if args.key:
        wanted = args.key.lower().split("@")[0]
        models = [m for m in models if m["key"].lower() == wanted]
        if not models:
            raise CliError(f"no model '{args.key}' on the server (see `lmkube ls`)")
    return models


def list_models(args: argparse.Namespace) -> int:
    client = Client.from_args(args)
    models = _select(client.get("/api/v1/models")["models"], args)
    if args.json:
        if args.variants or args.key:
            print_json([{"model": model_json(m), "variants": m.get("variants", [])} for m in models])
        else:
            print_json([model_json(m) for m in models])
        return 0
    total = sum(m.get("size_bytes") or 0 for m in models)
    print(f"You have {len(models)} model{'s' if len(models) != 1 else ''}, taking up {human_bytes(total)} "
          "of disk space.")
    for kind, title in (("llm", "LLM"), ("embedding", "EMBEDDING")):
        group = [m for m in models if m["type"] == kind]
        if not group:
            continue
        rows: list[list[str]] = []
        for m in group:
            marks = ["vision"] if (m.get("capabilities") or {}).get("vision") else []
            if m.get("loaded_instances"):
                marks.append(style("✓ LOADED", "green"))
            quant = (m.get("quantization") or {}).get("name") or ""
            rows.append([m["key"], m.get("params_string") or "", m.get("architecture") or "", quant,
                         human_bytes(m.get("size_bytes")), "  ".join(marks)])
            if args.variants or args.key:
                for variant in m.get("variants", []):
                    mark = "*" if variant == m.get("selected_variant") else " "
                    rows.append([f"  {mark} {variant}", "", "", "", "", ""])
        print()
        print(table([title, "PARAMS", "ARCH", "QUANT", "SIZE", ""], rows))
    return 0


# -- load / unload ------------------------------------------------------------------------------------


def _pick_model(client: Client, args: argparse.Namespace) -> str:
    models = [m["key"] for m in client.get("/api/v1/models")["models"]]
    if not models:
        raise CliError("the server has no models (download one with `lmkube get <name>`)")
    if args.yes:
        return models[0]
    if not sys.stdin.isatty():
        raise CliError("name the model to load (see `lmkube ls`), or pass -y to load the first one")
    return models[choose("Model to load", models)]


def load_model(args: argparse.Namespace) -> int:
    client = Client.from_args(args)
    model = args.model or _pick_model(client, args)
    body: dict[str, Any] = {"model": model}
    for field, value in (("ttl", args.ttl), ("gpu", args.gpu), ("context_length", args.context_length),
                         ("parallel", args.parallel), ("identifier", args.identifier),
                         ("draft_model", args.draft_model)):
        if value is not None:
            body[field] = value
    if args.estimate_only:
        body["estimate_only"] = True
        result = client.post("/api/v1/models/load", body)
        if args.json:
            print_json(result)
        else:
            print_estimate(result)
        return 0
    body["echo_load_config"] = True
    for flag in ("evict", "force"):
        if getattr(args, flag):
            body[flag] = True
    try:
        result = _load_with_progress(client, body, show=not args.json)
    except CliError as exc:
        if "'stream'" not in str(exc):
            raise
        result = client.post("/api/v1/models/load", body)  # a server from before the streamed load
    if args.json:
        print_json(result)
        return 0
    print(f"Model loaded successfully in {result['load_time_seconds']:.2f}s.")
    print(f'To use the model in the API/SDK, use the identifier "{result["instance_id"]}".')
    return 0


def _load_with_progress(client: Client, body: dict[str, Any], *, show: bool) -> dict[str, Any]:
    """Loads through the streamed load (the server's model_load.* events): a redrawn bar on a terminal, a line
    per 25 % otherwise (stderr, once the load has started), the server's answer returned."""
    tty = sys.stderr.isatty()
    if show and tty:
        print(f"Loading {body['model']} ...", file=sys.stderr, flush=True)
    next_line = 0.25
    with client.stream("POST", "/api/v1/models/load", json={**body, "stream": True}) as response:
        name = ""
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line[len("event: "):]
                continue
            if not line.startswith("data: "):
                continue
            data = json.loads(line[len("data: "):])
            if name == "model_load.progress" and show:
                fraction = float(data["progress"])
                if tty:
                    sys.stderr.write("\r" + load_bar(fraction))
                    sys.stderr.flush()
                elif fraction >= next_line:
                    print(f"{fraction * 100:5.1f}% loaded", file=sys.stderr, flush=True)
                    next_line = int(fraction * 4 + 1) / 4
            elif name == "model_load.end":
                if show and tty:
                    sys.stderr.write("\r" + load_bar(1.0) + "\n")
                return dict(data["result"])
            elif name == "error":
                if show and tty:
                    sys.stderr.write("\n")
                raise CliError(data["error"].get("message") or "the load failed")
    raise CliError("the server closed the load stream before the model was loaded")


def load_bar(fraction: float) -> str:
    width = 30
    filled = int(fraction * width)
    return style("█" * filled, "green", stream=sys.stderr) + "░" * (width - filled) + f" {fraction * 100:5.1f}%"


def print_estimate(result: dict[str, Any]) -> None:
    estimate, offload = result["estimate"], result["gpu_offload"]
    setting = offload["setting"]
    share = f"{setting * 100:.0f}%" if isinstance(setting, int | float) else setting
    print(f"Model: {result['model']}")
    if result.get("draft_model"):  # speculative decoding: its share is already in the totals below
        print(f"Draft Model: {result['draft_model']} ({gib(estimate['draft']['total_bytes'])} of the total)")
    print(f"Context Length: {result['context_length']:,}")
    print(f"GPU Offload: {share} ({offload['layers']}/{offload['total_layers']} layers)")
    print(f"Estimated GPU Memory:   {gib(estimate['gpu_bytes'])}")
    print(f"Estimated Total Memory: {gib(estimate['total_bytes'])}")
    available = result.get("available") or {}
    limit = available.get("ram_limit_bytes")
    within = f" (within a memory limit of {gib(limit)})" if limit is not None else ""
    print(f"Available: RAM {gib(available.get('ram_bytes'))}{within}, GPU {gib(available.get('gpu_bytes'))}")
    print()
    if result["fits"]:
        print("Estimate: " + style("This model fits in this machine's available memory.", "green"))
    else:
        print("Estimate: " + style("This model will not fit in this machine's available memory.", "red"))


def unload_models(args: argparse.Namespace) -> int:
    client = Client.from_args(args)
    if args.identifier and args.all:
        raise CliError("give an identifier or --all, not both")
    if args.identifier:
        targets = [args.identifier]
    else:
        targets = [i["id"] for i in client.get("/api/v1/instances")["instances"]]
        if not targets:
            print("No models are loaded.")
            return 0
        if len(targets) > 1 and not args.all:
            if not sys.stdin.isatty():
                raise CliError(f"{len(targets)} models are loaded ({', '.join(targets)}): name one, or use --all")
            targets = [targets[choose("Model to unload", targets)]]
    for target in targets:
        result = client.post("/api/v1/models/unload", {"instance_id": target})
        print(f'Unloaded "{result["instance_id"]}".')
    return 0


# -- ps -----------------------------------------------------------------------------------------------


def _ms(iso: str | None) -> int | None:
    return int(datetime.fromisoformat(iso).timestamp() * 1000) if iso else None


def instance_json(i: dict[str, Any]) -> dict[str, Any]:
    """`lms ps --json`'s fields; `queued` counts running and waiting requests together as LM Studio's does,
    `running`/`waiting` split it."""
    return {
        "type": i["type"], "modelKey": i["model_key"], "variant": i.get("variant"), "identifier": i["id"],
        "sizeBytes": i.get("size_bytes"), "contextLength": i.get("context_length"),
        "ttlMs": None if i.get("ttl") is None else int(i["ttl"] * 1000),
        "lastUsedTime": _ms(i.get("last_used")), "loadedTime": _ms(i.get("loaded_at")),
        "status": i["status"], "queued": i.get("active", 0) + i.get("queued", 0),
        "running": i.get("active", 0), "waiting": i.get("queued", 0),
        "parallel": i.get("parallel") if i["type"] == "llm" else None,
    }


def _ttl(i: dict[str, Any]) -> str:
    if i.get("ttl") is None:
        return "-"
    used = datetime.fromisoformat(i["last_used"])
    remaining = i["ttl"] - (datetime.now(used.tzinfo) - used).total_seconds()
    return f"{duration(remaining)} / {duration(i['ttl'])}"


def list_instances(args: argparse.Namespace) -> int:
    instances = Client.from_args(args).get("/api/v1/instances")["instances"]
    if args.json:
        print_json([instance_json(i) for i in instances])
        return 0
    if not instances:
        print("No models are loaded. Load one with `lmkube load <model>`.")
        return 0
    rows = [[i["id"], i["variant"] or i["model_key"], i["status"].upper(), human_bytes(i.get("size_bytes")),
             f"{i['context_length']:,}", str(i.get("parallel") or "-"),
             str(i.get("active", 0) + i.get("queued", 0)), _ttl(i), ago(i.get("last_used"))]
            for i in instances]
    print(table(["IDENTIFIER", "MODEL", "STATUS", "SIZE", "CONTEXT", "PARALLEL", "QUEUED", "TTL", "LAST USED"],
                rows))
    return 0
