"""Builders for the objects a LocalModel owns: token Secret, Service and the StatefulSet with its volumes.

Plain functions from a parsed `LocalModelSpec` (see `lmkube.operator.spec`) to Kubernetes JSON
dicts, plus the request bodies the operator sends to the server. No kopf and no API calls: the
handlers create-or-update what these return, so every builder is deterministic for a given input.

Choices (see also the docstrings):
- The pods are a StatefulSet's: with the default storage every replica gets its own ReadWriteOnce cache volume
  from `volumeClaimTemplates` (`models-lm-<name>-<ordinal>`), downloads the model into it once and keeps it
  across restarts, rollouts and scale to zero (`whenScaled: Retain`); the claims go with the StatefulSet
  (`whenDeleted: Delete`), i.e. with the LocalModel. With `storage.existingClaim` every pod mounts that claim
  (ReadWriteMany for several replicas; the servers take turns downloading into it). `podManagementPolicy:
  Parallel`: replicas start and stop together, not one after another. A rollout replaces one pod at a time,
  deleting it before creating its successor (a volume is never attached twice, a GPU never needed twice).
  `spec.replicas` of the StatefulSet is the one replica count (what an autoscaler or `kubectl scale` sets).
- A pod is Ready only once its model is loaded: the pod template has the readiness gate `MODEL_LOADED_CONDITION`,
  which the operator sets True in the pod's status after its load request succeeded (and False while the pod
  downloads, loads or failed, or its server restarted). The server's own /health probe only says it listens.
  So a rollout (which waits for each new pod to be Ready before replacing the next), the Service's endpoints
  and the gateway only ever count pods that serve the model.
- `LMKUBE_HOME` is `<models dir>/.lmkube`: downloads.json, presets and stored conversations live on
  the persistent cache volume (surviving restarts, writable by uid 1000 through fsGroup), the image's
  home directory need not be writable, and the model scanner skips dot folders.
- The pod template carries `POD_HASH_ANNOTATION`, a digest of the rendered pod spec (plus an optional
  `secret_version`). model, variant, contextLength and gpu.offload are not rendered into the pod (the
  operator (re)loads them through /api/v1/models/load), so changing them leaves the pods alone; image,
  GPU count, resources, env, parallel, ttl, scheduling knobs... change the pod spec and roll it.
  Handlers compare the annotation on the live StatefulSet with the desired one instead of deep-diffing
  objects the API server has defaulted.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lmkube.operator.spec import MCP_DIR, LocalModelSpec, OperatorSettings

ANNOTATION_PREFIX = "lmkube.dev"  # the LocalModel API group (operator/crd.py)
POD_HASH_ANNOTATION = f"{ANNOTATION_PREFIX}/pod-spec-hash"
# The pods' readiness gate: True once the operator has loaded the model into the pod (reconcile.py sets it).
MODEL_LOADED_CONDITION = f"{ANNOTATION_PREFIX}/model-loaded"
TOKEN_KEY = "token"  # key of the operator-generated token Secret
CONTAINER_NAME = "lmkube"
VOLUME_NAME = "models"
MCP_VOLUME_NAME = "mcp"
PORT_NAME = "http"
RUN_AS = 1000
MAX_NAME = 63  # DNS-1123 / DNS-1035 label: Service names and label values
MAX_STATEFULSET_NAME = 52  # 63 less the "-<hash>" of the controller-revision-hash label on its pods

_DEFAULT_SETTINGS = OperatorSettings()


@dataclass(frozen=True)
class Names:
    statefulset: str
    service: str
    legacy_pvc: str  # the one cache claim of releases that ran a Deployment; removed when the StatefulSet comes
    secret: str


def _hash(text: str, n: int = 8) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def _label_safe(name: str, prefix: str = "", suffix: str = "", limit: int = MAX_NAME) -> str:
    """`prefix + name + suffix` as a DNS-1123 label (<= `limit` <= 63, [a-z0-9-], alnum ends).

    When `name` had to change (invalid characters such as dots, or too long) a hash of the original
    name is added so that distinct LocalModels never share a name.
    """
    clean = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    candidate = f"{prefix}{clean}{suffix}"
    if clean == name and len(candidate) <= limit:
        return candidate
    tag = f"-{_hash(name)}"
    room = limit - len(prefix) - len(suffix) - len(tag)
    return f"{prefix}{clean[:room].rstrip('-')}{tag}{suffix}"


def names(lm_name: str) -> Names:
    """Names of the owned objects: `lm-<name>` (StatefulSet, Service), `lm-<name>-token`; and the older
    `lm-<name>-models`."""
    base = _label_safe(lm_name, "lm-")
    # The StatefulSet controller labels each pod `controller-revision-hash: <statefulset>-<10 characters>`.
    return Names(statefulset=_label_safe(lm_name, "lm-", limit=MAX_STATEFULSET_NAME), service=base,
                 legacy_pvc=_label_safe(lm_name, "lm-", "-models"),
                 secret=_label_safe(lm_name, "lm-", "-token"))


def _label_value(value: str) -> str:
    if len(value) <= MAX_NAME and re.fullmatch(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]", value):
        return value
    return _label_safe(value)


def selector_labels(name: str) -> dict[str, str]:
    """The StatefulSet's (immutable) selector and the Service's selector."""
    return {
        "app.kubernetes.io/name": "lmkube",
        "app.kubernetes.io/instance": _label_value(name),
        "app.kubernetes.io/component": "model-server",
    }


def selector_string(name: str) -> str:
    """The pods' selector as a label-selector string (status.selector, which the scale subresource reports)."""
    return ",".join(f"{key}={value}" for key, value in sorted(selector_labels(name).items()))


def labels(name: str) -> dict[str, str]:
    return {**selector_labels(name), "app.kubernetes.io/managed-by": "lmkube-operator"}


# The Gateway API Inference Extension's endpoint picker reads a pod's metrics under the names of the engine this
# label names; "vllm" selects the `vllm:*` gauges the server exports (server/gie_metrics.py).
ENGINE_TYPE_LABEL = "llm-d.ai/engine-type"
ENGINE_TYPE = "vllm"


def pod_labels(name: str) -> dict[str, str]:
    """The model-server pods' labels: `labels(name)` and the endpoint picker's engine type."""
    return {**labels(name), ENGINE_TYPE_LABEL: ENGINE_TYPE}


def owner_reference(body: Mapping[str, Any]) -> dict[str, Any]:
    """An ownerReference to a LocalModel from its body (apiVersion, kind, metadata.name/uid)."""
    meta = body["metadata"]
    return {"apiVersion": body["apiVersion"], "kind": body["kind"], "name": meta["name"], "uid": meta["uid"],
            "controller": True, "blockOwnerDeletion": True}


def _metadata(name: str, namespace: str, lm_name: str, owner: Mapping[str, Any] | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": labels(lm_name)}
    if owner is not None:
        meta["ownerReferences"] = [dict(owner)]
    return meta


def token_secret(name: str, namespace: str, token: str, owner: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The operator-generated token Secret (key `token`). Create it once; never overwrite its token."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _metadata(names(name).secret, namespace, name, owner),
        "type": "Opaque",
        "stringData": {TOKEN_KEY: token},
    }


def gateway_secret_name(name: str, gateway_token: str) -> str:
    """`lm-<name>-gw-<digest>`: a new token makes a new Secret (created once, never patched) and rolls the pods."""
    return _label_safe(name, "lm-", f"-gw-{_hash(gateway_token)}")


def gateway_secret(name: str, namespace: str, gateway_token: str,
                   owner: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The gateway's credential in the LocalModel's namespace, where its pods can reference it."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _metadata(gateway_secret_name(name, gateway_token), namespace, name, owner),
        "type": "Opaque",
        "stringData": {TOKEN_KEY: gateway_token},
    }


def _token_env(name: str, spec: LocalModelSpec, settings: OperatorSettings) -> list[dict[str, Any]]:
    """LMKUBE_API_TOKENS: the model's own token, and the gateway's when the operator has one (Kubernetes
    expands `$(VAR)` from the variables before it)."""
    secret_name, secret_key = token_ref(name, spec)
    own = {"secretKeyRef": {"name": secret_name, "key": secret_key}}
    if not settings.gateway_token:
        return [{"name": "LMKUBE_API_TOKENS", "valueFrom": own}]
    gateway = {"secretKeyRef": {"name": gateway_secret_name(name, settings.gateway_token), "key": TOKEN_KEY}}
    return [{"name": "LMKUBE_MODEL_TOKEN", "valueFrom": own}, {"name": "LMKUBE_GATEWAY_TOKEN", "valueFrom": gateway},
            {"name": "LMKUBE_API_TOKENS", "value": "$(LMKUBE_MODEL_TOKEN),$(LMKUBE_GATEWAY_TOKEN)"}]


def token_ref(name: str, spec: LocalModelSpec) -> tuple[str, str]:
    """(Secret name, key) holding the API token: the user's auth.secretRef, else the operator's Secret."""
    if spec.auth is not None:
        return spec.auth.name, spec.auth.key
    return names(name).secret, TOKEN_KEY


def claim_name(template: str, statefulset: str, ordinal: int) -> str:
    """The StatefulSet controller's name for replica `ordinal`'s claim from the claim template `template`."""
    return f"{template}-{statefulset}-{ordinal}"


def replica_claim(name: str, ordinal: int) -> str:
    """The cache claim of LocalModel `name`'s replica `ordinal`."""
    return claim_name(VOLUME_NAME, names(name).statefulset, ordinal)


def claim_template(name: str, spec: LocalModelSpec) -> dict[str, Any] | None:
    """The per-replica ReadWriteOnce cache claim, or None when spec.storage.existingClaim names one to share."""
    if spec.storage.existing_claim:
        return None
    claim_spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": spec.storage.size}},
    }
    if spec.storage.storage_class_name is not None:
        claim_spec["storageClassName"] = spec.storage.storage_class_name
    return {"metadata": {"name": VOLUME_NAME, "labels": labels(name)}, "spec": claim_spec}


def service(name: str, namespace: str, settings: OperatorSettings | None = None,
            owner: Mapping[str, Any] | None = None) -> dict[str, Any]:
    settings = settings or _DEFAULT_SETTINGS
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(names(name).service, namespace, name, owner),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(name),
            "ports": [{"name": PORT_NAME, "port": settings.port, "targetPort": PORT_NAME, "protocol": "TCP"}],
        },
    }


def endpoint(name: str, namespace: str, settings: OperatorSettings | None = None) -> str:
    """The in-cluster base URL of a LocalModel's server."""
    settings = settings or _DEFAULT_SETTINGS
    return f"http://{names(name).service}.{namespace}.svc:{settings.port}"


def image(spec: LocalModelSpec, settings: OperatorSettings | None = None) -> str:
    """spec.image, else the CUDA image when the pod gets GPUs, else the CPU image."""
    settings = settings or _DEFAULT_SETTINGS
    return spec.image or (settings.cuda_image if spec.gpu.count > 0 else settings.cpu_image)


def serve_args(spec: LocalModelSpec, settings: OperatorSettings | None = None) -> list[str]:
    """`lmkube serve` arguments. The token comes from LMKUBE_API_TOKENS; the model from a load request.

    `--ttl` is always passed: spec.ttl, or 0 (never unload) when unset, as the CRD documents. It
    covers a JIT load (a request arriving before the operator's load request after a restart, or after
    an idle unload), which would otherwise get the server's own default of 3600 s.
    """
    settings = settings or _DEFAULT_SETTINGS
    args = ["serve", "--host", "0.0.0.0", "--port", str(settings.port), "--models-dir", settings.models_dir,
            "--parallel", str(spec.parallel), "--ttl", str(spec.ttl or 0)]
    args += spec.sampling.serve_flags()
    if spec.mcp is not None:
        args += ["--mcp-json", f"{MCP_DIR}/{spec.mcp.key}"]
    if settings.inference_pool is not None:
        args.append("--public-metrics")  # the endpoint picker scrapes /metrics without a token
    return args


def _mount_mcp_json(spec: LocalModelSpec, pod: dict[str, Any]) -> None:
    """Mounts spec.mcp's ConfigMap or Secret: all its keys, so mcp.json can run a script shipped next to
    it; whole (no subPath), so an edit reaches the running pod (the server reads mcp.json per request)."""
    if spec.mcp is None:
        return
    source: dict[str, Any] = {"configMap": {"name": spec.mcp.name}} if spec.mcp.kind == "configMap" \
        else {"secret": {"secretName": spec.mcp.name}}
    pod["volumes"].append({"name": MCP_VOLUME_NAME, **source})
    pod["containers"][0]["volumeMounts"].append({"name": MCP_VOLUME_NAME, "mountPath": MCP_DIR, "readOnly": True})


def container_resources(spec: LocalModelSpec) -> dict[str, Any]:
    """spec.resources with the GPU limit `{gpu.resource: gpu.count}` set when gpu.count > 0.

    Extended resources cannot be overcommitted, so a request for the GPU resource, if the user gave one,
    is made equal to the limit.
    """
    resources = copy.deepcopy(dict(spec.resources))
    if spec.gpu.count > 0:
        count = str(spec.gpu.count)
        resources["limits"] = {**resources.get("limits", {}), spec.gpu.resource: count}
        if spec.gpu.resource in resources.get("requests", {}):
            resources["requests"] = {**resources["requests"], spec.gpu.resource: count}
    return resources


def _probe(*, period: int, failures: int, timeout: int = 5) -> dict[str, Any]:
    return {"httpGet": {"path": "/health", "port": PORT_NAME}, "periodSeconds": period,
            "timeoutSeconds": timeout, "failureThreshold": failures}


def pod_template(name: str, spec: LocalModelSpec, settings: OperatorSettings | None = None,
                 secret_version: str | None = None) -> dict[str, Any]:
    """The StatefulSet's pod template, with the POD_HASH_ANNOTATION over everything else in it."""
    settings = settings or _DEFAULT_SETTINGS
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": image(spec, settings),
        "command": ["lmkube"],
        "args": serve_args(spec, settings),
        "ports": [{"name": PORT_NAME, "containerPort": settings.port, "protocol": "TCP"}],
        "env": [
            {"name": "LMKUBE_HOME", "value": f"{settings.models_dir.rstrip('/')}/.lmkube"},
            *_token_env(name, spec, settings),
            *copy.deepcopy(list(spec.env)),
        ],
        "resources": container_resources(spec),
        "volumeMounts": [{"name": VOLUME_NAME, "mountPath": settings.models_dir}],
        # The server answers /health as soon as it listens; models load later, through the API.
        "startupProbe": _probe(period=5, failures=60),
        "readinessProbe": _probe(period=10, failures=3),
        "livenessProbe": _probe(period=20, failures=3),
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS,
            "runAsGroup": RUN_AS,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    if settings.image_pull_policy:
        container["imagePullPolicy"] = settings.image_pull_policy
    pod: dict[str, Any] = {
        "containers": [container],
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS,
            "runAsGroup": RUN_AS,
            "fsGroup": RUN_AS,
            # A cache of large model files: do not chown it recursively on every start.
            "fsGroupChangePolicy": "OnRootMismatch",
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        # The server never talks to the Kubernetes API, and service links would inject LMKUBE_*-like
        # variables for any Service whose name starts with "lmkube".
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        # Ready only once the operator has loaded the model into the pod (see the module's docstring).
        "readinessGates": [{"conditionType": MODEL_LOADED_CONDITION}],
        "volumes": [],
    }
    if spec.storage.existing_claim:  # else the StatefulSet's volumeClaimTemplates give each pod its own
        pod["volumes"].append({"name": VOLUME_NAME,
                               "persistentVolumeClaim": {"claimName": spec.storage.existing_claim}})
    _mount_mcp_json(spec, pod)
    if not pod["volumes"]:
        del pod["volumes"]
    if spec.node_selector:
        pod["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod["tolerations"] = copy.deepcopy(list(spec.tolerations))
    if spec.affinity:
        pod["affinity"] = copy.deepcopy(dict(spec.affinity))
    if spec.runtime_class_name:
        pod["runtimeClassName"] = spec.runtime_class_name
    if spec.priority_class_name:
        pod["priorityClassName"] = spec.priority_class_name
    if spec.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": s} for s in spec.image_pull_secrets]
    pod_meta_labels = pod_labels(name)
    return {
        "metadata": {
            "labels": pod_meta_labels,
            "annotations": {POD_HASH_ANNOTATION: pod_hash(pod, secret_version, pod_meta_labels)},
        },
        "spec": pod,
    }


def pod_hash(pod_spec: Mapping[str, Any], secret_version: str | None = None,
             pod_meta_labels: Mapping[str, str] | None = None) -> str:
    """Digest of a rendered pod spec (and the token Secret's version and the pods' labels, when given)."""
    canonical = json.dumps({"pod": pod_spec, "secret": secret_version, "labels": pod_meta_labels},
                           sort_keys=True, separators=(",", ":"))
    return _hash(canonical, 16)


def statefulset(name: str, namespace: str, spec: LocalModelSpec, settings: OperatorSettings | None = None,
                owner: Mapping[str, Any] | None = None, secret_version: str | None = None) -> dict[str, Any]:
    """The StatefulSet running `lmkube serve` (see the module's docstring for its choices).

    `secret_version` (e.g. the token Secret's resourceVersion or a digest of its data) goes into the pod
    hash: the token reaches the pod as an env var, read once at start, so a rotated token must roll it.
    """
    body: dict[str, Any] = {
        "replicas": spec.replicas,
        "serviceName": names(name).service,
        "podManagementPolicy": "Parallel",
        "updateStrategy": {"type": "RollingUpdate"},
        "persistentVolumeClaimRetentionPolicy": {"whenDeleted": "Delete", "whenScaled": "Retain"},
        "selector": {"matchLabels": selector_labels(name)},
        "revisionHistoryLimit": 3,
        "template": pod_template(name, spec, settings, secret_version),
    }
    template = claim_template(name, spec)
    if template is not None:
        body["volumeClaimTemplates"] = [template]
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _metadata(names(name).statefulset, namespace, name, owner),
        "spec": body,
    }


def load_model_id(spec: LocalModelSpec) -> str:
    """The `model` of a load request: the server's key (`org/name`, lower-case) and `@variant` if set."""
    return f"{spec.model_key}@{spec.variant.lower()}" if spec.variant else spec.model_key


def load_request(spec: LocalModelSpec) -> dict[str, Any]:
    """Body of POST /api/v1/models/load. With no GPU in the pod, `gpu` is "off" whatever offload says."""
    body: dict[str, Any] = {
        "model": load_model_id(spec),
        "gpu": spec.gpu.offload if spec.gpu.count > 0 else "off",
        "parallel": spec.parallel,
    }
    if spec.context_length is not None:
        body["context_length"] = spec.context_length
    if spec.ttl is not None:
        body["ttl"] = spec.ttl
    return body


def download_request(spec: LocalModelSpec) -> dict[str, Any]:
    """Body of POST /api/v1/models/download: spec.model as written (repo id or URL), variant as quantization."""
    body: dict[str, Any] = {"model": spec.model}
    if spec.variant:
        body["quantization"] = spec.variant
    return body
