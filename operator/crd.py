"""The LocalModel CustomResourceDefinition (`localmodels.lmkube.dev`), from one source.

`charts/lmkube/crds/localmodels.lmkube.dev.yaml` is generated from this module and never edited by
hand (a test regenerates it and compares byte for byte):

    .venv/bin/python -P -m lmkube.operator.crd > charts/lmkube/crds/localmodels.lmkube.dev.yaml

(`-P`: from the repository root, the `lmkube/` folder there would otherwise shadow the installed
`lmkube` package, which is the one that contains `lmkube.operator`.)
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import yaml

GROUP = "lmkube.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "LocalModel"
PLURAL = "localmodels"
SINGULAR = "localmodel"
SHORT_NAMES = ["lm"]
NAME = f"{PLURAL}.{GROUP}"
CRD_FILE = f"{NAME}.yaml"

# Defaults (the apiserver fills these in from the schema's `default`s).
DEFAULT_GPU_COUNT = 1
DEFAULT_GPU_RESOURCE = "nvidia.com/gpu"
DEFAULT_GPU_OFFLOAD = "max"
DEFAULT_PARALLEL = 4
MAX_PARALLEL = 256
DEFAULT_REPLICAS = 1
DEFAULT_MCP_KEY = "mcp.json"
MCP_DIR = "/etc/lmkube/mcp"  # where spec.mcp's ConfigMap or Secret is mounted (operator/resources.py)

PHASES = ["Pending", "Scheduling", "Downloading", "Loading", "Ready", "Idle", "ScaledToZero", "Failed"]
CONDITION_STATUSES = ["True", "False", "Unknown"]

# `30m`, `1h30m`, `45s`, `2h`, or plain seconds as a string ("90"); integers are plain seconds.
TTL_PATTERN = r"^([0-9]+|[0-9]+h([0-9]+m)?([0-9]+s)?|[0-9]+m([0-9]+s)?|[0-9]+s)$"
# "max" (every layer on the GPU), "off" (none), or the fraction of layers 0-1 as a string ("0.5").
OFFLOAD_PATTERN = r"^(max|off|0([.][0-9]*)?|[.][0-9]+|1([.]0*)?)$"
# A duration for spec.scaling: `30s`, `5m`, `1h30m`, or plain seconds (a string or an integer).
DURATION_PATTERN = TTL_PATTERN
# Kubernetes resource.Quantity, as controller-gen writes it.
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
# RFC 1123 subdomain (names of Secrets, PVCs, classes).
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"


def _string(description: str, **extra: Any) -> dict[str, Any]:
    return {"type": "string", "description": description, **extra}


def _integer(description: str, **extra: Any) -> dict[str, Any]:
    return {"type": "integer", "format": "int32", "description": description, **extra}


def _name(description: str) -> dict[str, Any]:
    return _string(description, minLength=1, maxLength=253, pattern=DNS_SUBDOMAIN_PATTERN)


def _free_object(description: str) -> dict[str, Any]:
    return {"type": "object", "description": description, "x-kubernetes-preserve-unknown-fields": True}


def _free_list(description: str, required: list[str] | None = None) -> dict[str, Any]:
    items: dict[str, Any] = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    if required:
        items["required"] = required
        items["properties"] = {name: {"type": "string"} for name in required}
    return {"type": "array", "description": description, "items": items}


def spec_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "description": "The model to serve and how to run it.",
        "required": ["model"],
        "properties": {
            "model": _string(
                "The model: a Hugging Face repository id (`owner/name`), a Hugging Face URL, or a model key.",
                minLength=1, maxLength=1024,
            ),
            "variant": _string(
                "The variant (quantization/file) to serve; the default variant rule picks one when unset.",
                minLength=1,
            ),
            "contextLength": _integer("Context length in tokens; the model's default when unset.", minimum=1),
            "ttl": {
                "description": (
                    "Unload the model after this much idle time: a duration (`45s`, `30m`, `1h30m`) or "
                    "plain seconds. Never unloaded when unset."
                ),
                "x-kubernetes-int-or-string": True,
                "pattern": TTL_PATTERN,
                "minimum": 1,
            },
            "gpu": {
                "type": "object",
                "description": "GPUs per replica. `count: 0` runs on CPU.",
                "default": {},
                "properties": {
                    "count": _integer("GPUs per replica; 0 = CPU only.", minimum=0, default=DEFAULT_GPU_COUNT),
                    "resource": _string(
                        "The extended resource name requested for the GPUs.",
                        minLength=1, default=DEFAULT_GPU_RESOURCE,
                    ),
                    "offload": {
                        "description": (
                            "How much of the model goes on the GPU: `max`, `off`, or a fraction of the layers "
                            "between 0 and 1 (number or string)."
                        ),
                        # A number or a string: neither int-or-string nor a typed schema allows both, and CEL
                        # cannot see untyped fields. So the field is untyped, and each validation below only
                        # applies to its own JSON type: strings must match the pattern, numbers lie in 0..1,
                        # and objects, lists and booleans are refused.
                        "x-kubernetes-preserve-unknown-fields": True,
                        "default": DEFAULT_GPU_OFFLOAD,
                        "pattern": OFFLOAD_PATTERN,
                        "minimum": 0,
                        "maximum": 1,
                        "maxProperties": 0,
                        "maxItems": 0,
                        "not": {"enum": [True, False, {}, []]},
                    },
                },
            },
            "parallel": _integer(
                "Requests served concurrently per replica (llama.cpp slots).",
                minimum=1, maximum=MAX_PARALLEL, default=DEFAULT_PARALLEL,
            ),
            "replicas": _integer("Number of server replicas; 0 scales to zero.", minimum=0, default=DEFAULT_REPLICAS),
            "scaling": scaling_schema(),
            "sampling": sampling_schema(),
            "storage": {
                "type": "object",
                "description": "Where the model files are stored (a PersistentVolumeClaim).",
                "properties": {
                    "size": {
                        "description": "Size of the cache volume each replica gets (e.g. `20Gi`).",
                        "x-kubernetes-int-or-string": True,
                        "pattern": QUANTITY_PATTERN,
                    },
                    "storageClassName": _name("StorageClass of the replicas' cache volumes."),
                    "existingClaim": _name("Mount this existing PersistentVolumeClaim in every replica instead "
                                            "(ReadWriteMany for more than one)."),
                },
            },
            "auth": {
                "type": "object",
                "description": "Require a bearer token on the model's API.",
                "properties": {
                    "secretRef": {
                        "type": "object",
                        "description": "Secret (in the LocalModel's namespace) holding the API token.",
                        "required": ["name"],
                        "properties": {
                            "name": _name("Name of the Secret."),
                            "key": _string("Key in the Secret; the operator's default key when unset.", minLength=1),
                        },
                    },
                },
            },
            "aliases": {
                "type": "array",
                "description": "More names `lmkube gateway` routes to this model (besides its key, its name and "
                               "`namespace/name`), e.g. `gpt-4o-mini` for clients that cannot be reconfigured.",
                "maxItems": 32,
                "items": _string("An alias.", minLength=1, maxLength=256),
                "x-kubernetes-list-type": "set",
            },
            "image": _string("Server container image; the operator's default when unset.", minLength=1),
            "resources": _free_object("Container resources (requests/limits), as in a Pod spec."),
            "nodeSelector": {
                "type": "object",
                "description": "Node labels the server Pods must match.",
                "additionalProperties": {"type": "string"},
            },
            "tolerations": _free_list("Pod tolerations, as in a Pod spec."),
            "affinity": _free_object("Pod affinity, as in a Pod spec."),
            "runtimeClassName": _name("Pod runtimeClassName."),
            "priorityClassName": _name("Pod priorityClassName."),
            "env": _free_list("Extra container environment variables, as in a Pod spec.", required=["name"]),
            "mcp": {
                "type": "object",
                "description": "The server's mcp.json (MCP servers for /api/v1/chat integrations and /v1/responses "
                               "mcp tools), from a ConfigMap or a Secret in the LocalModel's namespace, mounted "
                               f"read-only at {MCP_DIR} with its other keys (e.g. a stdio server's script).",
                "maxProperties": 1,
                "properties": {
                    kind: {
                        "type": "object",
                        "description": f"The {what} holding mcp.json.",
                        "required": ["name"],
                        "properties": {
                            "name": _name(f"Name of the {what}."),
                            "key": _string(f"Key of mcp.json in the {what}; `{DEFAULT_MCP_KEY}` when unset.",
                                           minLength=1, pattern=r"^[-._a-zA-Z0-9]+$"),
                        },
                    } for kind, what in (("configMapRef", "ConfigMap"), ("secretRef", "Secret"))
                },
            },
            "imagePullSecrets": {
                "type": "array",
                "description": "Secrets for pulling the image.",
                "items": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {"name": _name("Name of the Secret.")},
                },
            },
        },
    }


def _duration(description: str) -> dict[str, Any]:
    return {"description": description, "x-kubernetes-int-or-string": True, "pattern": DURATION_PATTERN,
            "minimum": 0}


def scaling_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "description": (
            "Replicas that follow demand: the operator's autoscaler sets spec.replicas between minReplicas and "
            "maxReplicas from the requests running and queued on the replicas. Leave it unset to drive "
            "spec.replicas yourself (`kubectl scale`, an HorizontalPodAutoscaler or KEDA)."
        ),
        "properties": {
            "minReplicas": _integer("Fewest replicas; 0 lets an idle model scale to zero (a request through "
                                    "`lmkube gateway` brings it back).", minimum=0, default=1),
            "maxReplicas": _integer("Most replicas.", minimum=1),
            "targetRequests": _integer("Running + queued requests one replica should carry, averaged over "
                                       "`window`; spec.parallel when unset.", minimum=1),
            "scaleDownDelay": _duration("How long demand must stay lower before replicas are removed, and the "
                                        "least time between a scale change and a scale-down (`5m` when unset)."),
            "window": _duration("The time the load is averaged over (`60s` when unset)."),
        },
        "x-kubernetes-validations": [{"rule": "!has(self.maxReplicas) || self.minReplicas <= self.maxReplicas",
                                      "message": "minReplicas must not exceed maxReplicas"}],
    }


def sampling_schema() -> dict[str, Any]:
    def number(description: str, **bounds: Any) -> dict[str, Any]:
        return {"type": "number", "description": description, **bounds}
    return {
        "type": "object",
        "description": (
            "Sampling for requests that leave a parameter out (the server's --temp, --top-k, --top-p, --min-p and "
            "--repeat-penalty); a request's own value wins. Agent clients such as Claude Code send no "
            "temperature: `temperature: 0` makes a small model's tool calls the same every time."
        ),
        "properties": {
            "temperature": number("0: greedy (the server's default is 0.8).", minimum=0),
            "topK": _integer("0: off (default 40).", minimum=0),
            "topP": number("1: off (default 0.95).", minimum=0, maximum=1),
            "minP": number("0: off (default 0.05).", minimum=0, maximum=1),
            "repeatPenalty": number("1: off (the default).", minimum=0, exclusiveMinimum=True),
        },
    }


def status_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "description": "Observed state, written by the operator.",
        "properties": {
            "phase": _string("Lifecycle phase.", enum=list(PHASES)),
            "download": {
                "type": "object",
                "description": "Model download progress.",
                "properties": {
                    "downloadedBytes": {"type": "integer", "format": "int64", "minimum": 0},
                    "totalBytes": {"type": "integer", "format": "int64", "minimum": 0},
                    "percent": {"type": "number", "minimum": 0, "maximum": 100},
                    "bytesPerSecond": {"type": "number", "minimum": 0},
                },
            },
            "load": {
                "type": "object",
                "description": "Model load progress: moves while the server loads the weights (Loading), 100 once "
                               "the model is served.",
                "properties": {"percent": {"type": "number", "minimum": 0, "maximum": 100}},
            },
            "endpoint": _string("In-cluster base URL of the model's API."),
            "modelKey": _string("The key the server lists the model under."),
            "variant": _string("The variant being served."),
            "contextLength": _integer("The context length loaded.", minimum=1),
            "readyReplicas": _integer("Replicas ready to serve.", minimum=0),
            "replicas": _integer("Model-server pods of the current spec (the scale subresource's status).", minimum=0),
            "selector": _string("Label selector of the model-server pods (for the scale subresource: HPA, KEDA)."),
            "desiredReplicas": _integer("The replica count the autoscaler last decided on.", minimum=0),
            "scaling": {
                "type": "object",
                "description": "The autoscaler's last decision and what it saw (spec.scaling only).",
                "properties": {
                    "load": {"type": "number", "minimum": 0,
                             "description": "Running + queued requests over all replicas, averaged over the window."},
                    "lastScaleTime": _string("When the replica count last changed.", format="date-time"),
                    "lastScaleReason": _string("Why: ScaleUp, ScaleDown, ScaleToZero, ScaleFromZero, OutOfRange, "
                                               "External."),
                    "lastScaleMessage": _string("The decision in words."),
                    "lowDemandSince": _string("Since when demand has been below the replica count (a scale-down "
                                              "waits scaleDownDelay from here).", format="date-time"),
                },
            },
            "observedGeneration": {"type": "integer", "format": "int64", "minimum": 0},
            "message": _string("Human-readable detail about the phase."),
            "pods": {
                "type": "array",
                "description": "The operator's bookkeeping per model-server pod (download job, loaded instance, "
                               "retry back-off), so that a restarted operator resumes where it was.",
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["name"],
                "items": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {
                        "name": _string("Pod name."),
                        "serverId": _string("Identity of the server process the rest refers to."),
                        "phase": _string("Where the model stands on this pod.", enum=list(PHASES)),
                        "message": _string("Detail for this pod."),
                        "jobId": _string("The server's download job id."),
                        "jobFor": _string("Fingerprint of the download request the job is for."),
                        "downloaded": _string("Fingerprint of the download request that completed."),
                        "loaded": _string("Fingerprint of the load request that succeeded."),
                        "instanceId": _string("The loaded instance's id."),
                        "failedFor": _string("Fingerprint of the request that failed."),
                        "reason": _string("Condition reason of the failure."),
                        "attempts": _integer("Consecutive failed attempts.", minimum=0),
                        "retryAt": _string("Earliest time of the next attempt.", format="date-time"),
                        "loadAttempt": _string("Fingerprint of the load request last sent to this server."),
                        "estimateBytes": _integer("The server's memory estimate for that load.", minimum=0,
                                                  format="int64"),
                        "oomKilledBy": _string("Fingerprint of a load during which the kernel killed the server "
                                               "for its memory limit (not retried on the same pod)."),
                    },
                },
            },
            "conditions": {
                "type": "array",
                "description": "Standard conditions (Ready, Downloaded, ...).",
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["type"],
                "items": {
                    "type": "object",
                    "required": ["type", "status"],
                    "properties": {
                        "type": _string("Condition type.", minLength=1, maxLength=316),
                        "status": _string("Condition status.", enum=list(CONDITION_STATUSES)),
                        "reason": _string("Machine-readable reason (CamelCase).", maxLength=1024),
                        "message": _string("Human-readable message.", maxLength=32768),
                        "lastTransitionTime": _string("When the status last changed.", format="date-time"),
                        "observedGeneration": {"type": "integer", "format": "int64", "minimum": 0},
                    },
                },
            },
        },
    }


PRINTER_COLUMNS = [
    {"name": "Model", "type": "string", "jsonPath": ".spec.model"},
    {"name": "Variant", "type": "string", "jsonPath": ".status.variant"},
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Progress", "type": "number", "jsonPath": ".status.download.percent",
     "description": "Download progress in percent"},
    {"name": "Load", "type": "number", "jsonPath": ".status.load.percent",
     "description": "Model load progress in percent"},
    {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas", "description": "Ready replicas"},
    {"name": "Endpoint", "type": "string", "jsonPath": ".status.endpoint"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def crd() -> dict[str, Any]:
    """The CustomResourceDefinition as a dict (a fresh copy each call)."""
    return copy.deepcopy({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": NAME, "labels": {"app.kubernetes.io/part-of": "lmkube"}},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND, "listKind": f"{KIND}List", "plural": PLURAL, "singular": SINGULAR,
                "shortNames": list(SHORT_NAMES), "categories": ["lmkube"],
            },
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}, "scale": {
                    "specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas",
                    "labelSelectorPath": ".status.selector"}},
                "additionalPrinterColumns": PRINTER_COLUMNS,
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": "A model served by lmkube (LM Studio-compatible API over llama.cpp).",
                    "required": ["spec"],
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "metadata": {"type": "object"},
                        "spec": spec_schema(),
                        "status": status_schema(),
                    },
                }},
            }],
        },
    })


def render() -> str:
    """The CRD file's exact text."""
    header = (
        "# Generated by `python -m lmkube.operator.crd` from operator/crd.py -- do not edit by hand.\n"
    )
    return header + yaml.safe_dump(crd(), sort_keys=False, width=100, default_flow_style=False)


if __name__ == "__main__":
    sys.stdout.write(render())
