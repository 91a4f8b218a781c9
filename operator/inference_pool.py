"""The InferencePool (Gateway API Inference Extension, `inference.networking.k8s.io/v1`) of a LocalModel.

With the chart's `inferenceExtension.enabled` the operator creates one per LocalModel, named like its Service,
selecting its model-server pods on the server's port and pointing at an endpoint picker. A gateway that
implements GIE (Istio, kgateway, Envoy Gateway, GKE) then routes an HTTPRoute's `backendRef` to the pool and lets
the picker choose the pod per request from the gauges the servers export (server/gie_metrics.py). The pool is
owned by its LocalModel, so the garbage collector deletes it with it.

GIE's CRD is the cluster's to install (the gateway's installation does). Without it, or without the right to
write pools, the model is served as usual: the pool is skipped and the `InferencePool` condition (and a Warning
Event when that changes) say why.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubernetes.client.exceptions import ApiException
from lmkube.operator import resources
from lmkube.operator.kube import CUSTOM_KINDS, Kube
from lmkube.operator.spec import InferencePoolSettings, OperatorSettings

log = logging.getLogger("lmkube.operator")

KIND = "InferencePool"
GROUP, VERSION, PLURAL = CUSTOM_KINDS[KIND]
API_VERSION = f"{GROUP}/{VERSION}"
CONDITION = "InferencePool"


@dataclass(frozen=True)
class PoolOutcome:
    """The `InferencePool` condition of a LocalModel: status ("True"/"False"), reason and message."""

    status: str
    reason: str
    message: str


def pool_name(name: str) -> str:
    return resources.names(name).service


def endpoint_picker(name: str, pool: InferencePoolSettings) -> str:
    return pool.endpoint_picker.replace("{pool}", pool_name(name))


def inference_pool(name: str, namespace: str, settings: OperatorSettings,
                   owner: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The InferencePool selecting LocalModel `name`'s pods (settings.inference_pool must be set)."""
    pool = settings.inference_pool
    assert pool is not None, "inference pools are not enabled"
    meta: dict[str, Any] = {"name": pool_name(name), "namespace": namespace, "labels": resources.labels(name)}
    if owner is not None:
        meta["ownerReferences"] = [dict(owner)]
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": meta,
        "spec": {
            "selector": {"matchLabels": resources.selector_labels(name)},
            "targetPorts": [{"number": settings.port}],
            # A Service in the pool's namespace (group "" and kind Service are the API's defaults).
            "endpointPickerRef": {"name": endpoint_picker(name, pool), "port": {"number": pool.endpoint_picker_port},
                                  "failureMode": pool.failure_mode},
        },
    }


def _projection(spec: Mapping[str, Any]) -> tuple[Any, ...]:
    """What the operator sets in a pool's spec, with the API's defaults filled in, to compare live and desired."""
    ref = spec.get("endpointPickerRef") or {}
    return (spec.get("selector"), [p.get("number") for p in spec.get("targetPorts") or []], ref.get("name"),
            (ref.get("port") or {}).get("number"), ref.get("failureMode") or "FailClose", ref.get("kind") or "Service",
            ref.get("group") or "")


def ensure_inference_pool(kube: Kube, body: Mapping[str, Any], settings: OperatorSettings) -> PoolOutcome | None:
    """Creates or updates the LocalModel's InferencePool; None when inference pools are not enabled."""
    if settings.inference_pool is None:
        return None
    meta = body["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    want = inference_pool(name, namespace, settings, resources.owner_reference(body))
    pool = want["metadata"]["name"]
    try:
        live = kube.get(KIND, namespace, pool)
        if live is None:
            kube.create(want)
        elif _projection(live.get("spec") or {}) != _projection(want["spec"]):
            kube.patch(KIND, namespace, pool, {"spec": want["spec"]})
    except ApiException as error:
        if error.status == 404:
            return PoolOutcome("False", "CRDNotInstalled",
                               f"InferencePool {pool} not created: the cluster has no {PLURAL}.{GROUP} ({VERSION}) "
                               "resource; install the Gateway API Inference Extension's CRDs")
        if error.status == 403:
            return PoolOutcome("False", "Forbidden", f"InferencePool {pool} not created: the operator may not write "
                                                     f"{PLURAL}.{GROUP} in namespace {namespace} ({error.reason})")
        if error.status == 422:
            return PoolOutcome("False", "Invalid", f"InferencePool {pool} rejected: {_message(error)}")
        raise
    picker = want["spec"]["endpointPickerRef"]
    return PoolOutcome("True", "Created", f"InferencePool {pool} selects this model's pods on port {settings.port}; "
                                          f"endpoint picker Service {picker['name']}:{picker['port']['number']}")


def _message(error: ApiException) -> str:
    try:
        return str(json.loads(error.body or "").get("message") or error.reason)
    except (TypeError, ValueError):
        return str(error.reason)
