"""The pods' readiness gate: a model-server pod is Ready only once the operator has loaded the model into it.

The pod template lists `resources.MODEL_LOADED_CONDITION` under `readinessGates`, so the kubelet reports the pod
Ready only when its server container is ready (it answers /health) *and* that condition in the pod's status is
True. The operator writes the condition (a `pods/status` patch) from what its reconcile saw on the pod. What
counts a pod as available then waits for the model, not for the server to listen: the StatefulSet's rolling
update (it replaces the next pod only once the new one is Ready), the Service's endpoints, the gateway.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from lmkube.operator import resources
from lmkube.operator import status as st
from lmkube.operator.kube import Kube
from lmkube.operator.observe import PodView

log = logging.getLogger("lmkube.operator")


def model_loaded_gate(pod: PodView, state: st.PodState | None, record: Mapping[str, Any] | None) -> bool | None:
    """What the pod's gate should say now, from this pass's `state` of the pod (None: its server was not ready,
    so not asked) and its record in status.pods from the pass before; None: leave the gate as it is.

    True once the model is loaded, or unloaded by the idle TTL (the server loads it again on the next request,
    which must be able to reach the pod). False while the pod downloads or loads, when a download or load
    failed, and as soon as its server restarted: a new server has nothing loaded, and its /health would make
    the pod Ready again before the next load. Left alone when the operator could not reach a server the kubelet
    sees running (a busy server is no reason to take it out of service), and while a server that has not
    restarted is briefly not ready.
    """
    if state is None:
        restarted = bool(pod.model_loaded) and (record or {}).get("serverId") != pod.server_id
        return False if restarted else None
    if state.stage in (st.READY, st.IDLE):
        return True
    if state.stage == st.FAILED and state.reason == "PodUnreachable":
        return None
    return False


def set_model_loaded_gates(kube: Kube, namespace: str, pods: list[PodView], states: Mapping[str, st.PodState],
                           records: Mapping[str, Mapping[str, Any]], now: str,
                           gates: dict[str, bool | None]) -> None:
    """Writes the gate of each of `pods` whose gate should change (`states` and `records` by pod name). `gates`:
    each pod's gate as it stands (from the pods as listed, then as written here: a pass may write twice)."""
    for pod in pods:
        state = states.get(pod.name)
        loaded = model_loaded_gate(pod, state, records.get(pod.name))
        if loaded is None or loaded == gates.get(pod.name, pod.model_loaded):
            continue
        if loaded:
            reason, message = "Loaded", "the model is loaded"
        elif state is not None:
            reason, message = state.reason, state.message or "the model is not loaded"
        else:
            reason, message = "ServerRestarted", "the server restarted: the model is not loaded"
        condition = {"type": resources.MODEL_LOADED_CONDITION, "status": "True" if loaded else "False",
                     "reason": reason, "message": message[:1024], "lastTransitionTime": now}
        try:
            kube.set_pod_condition(namespace, pod.name, pod.uid, condition)
            gates[pod.name] = loaded
        except Exception as exc:  # e.g. a Role without pods/status: the pod stays not Ready; the pass goes on
            log.warning("could not set %s=%s on pod %s/%s: %s", resources.MODEL_LOADED_CONDITION,
                        condition["status"], namespace, pod.name, exc)
