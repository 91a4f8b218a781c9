"""A LocalModel's load, read from its pods: the requests running and queued on each ready replica.

Each model-server pod's `/metrics` has, per loaded instance, `llamacpp:requests_processing` (running: in a
slot) and `llamacpp:requests_deferred` (queued for a slot), the same gauges llama-server exports. The sum
over the ready pods is the load the autoscaler averages. A pod with nothing loaded exports neither; when no
pod does, the load is unknown (None), not zero: a model still loading must not look idle.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import httpx
from lmkube.operator import observe, resources
from lmkube.operator.kube import Kube
from lmkube.operator.observe import PodView
from lmkube.operator.spec import LocalModelSpec, OperatorSettings

log = logging.getLogger("lmkube.operator")

LOAD_GAUGES = ("llamacpp:requests_processing", "llamacpp:requests_deferred")
TIMEOUT = 3.0


def load_from_metrics(text: str) -> float | None:
    """Running + queued requests over the loaded instances in a Prometheus text page; None: nothing loaded."""
    total, seen = 0.0, False
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in LOAD_GAUGES:
            seen = True
            total += float(line.rsplit(" ", 1)[1])
    return total if seen else None


class PodLoadProbe:
    """Reads the load of a LocalModel's ready pods (called from the autoscaler's thread)."""

    def __init__(self, kube: Kube, settings: OperatorSettings,
                 pod_url: Callable[[PodView, OperatorSettings], str] = lambda pod, s: f"http://{pod.ip}:{s.port}",
                 transport: httpx.BaseTransport | None = None) -> None:
        self.kube = kube
        self.settings = settings
        self.pod_url = pod_url
        self.client = httpx.Client(timeout=TIMEOUT, transport=transport)

    def close(self) -> None:
        self.client.close()

    def __call__(self, body: Mapping[str, Any], spec: LocalModelSpec) -> float | None:
        meta = body["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        pods = [p for p in observe.views(self.kube.list_pods(namespace, resources.selector_labels(name)),
                                         resources.POD_HASH_ANNOTATION) if p.ready]
        if not pods:
            return None
        token = self.kube.secret_value(namespace, *resources.token_ref(name, spec))
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        loads = [self._pod_load(pod, headers) for pod in pods]
        measured = [load for load in loads if load is not None]
        return sum(measured) if measured else None

    def _pod_load(self, pod: PodView, headers: Mapping[str, str]) -> float | None:
        url = f"{self.pod_url(pod, self.settings)}/metrics"
        try:
            response = self.client.get(url, headers=dict(headers))
            response.raise_for_status()
            return load_from_metrics(response.text)
        except (httpx.HTTPError, ValueError, IndexError) as exc:
            log.debug("load of pod %s unknown: %s", pod.name, exc)
            return None
