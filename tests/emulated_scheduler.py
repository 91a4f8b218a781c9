"""The scheduler half of tests/kubelet_emulator.py: which emulated node a Pod fits, and the real scheduler's
wording when none does. Pure functions over raw (JSON) Pods; the emulator does the API calls."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import kubernetes.client
from emulated_pod import now
from kubernetes.client.exceptions import ApiException
from kubernetes.utils import parse_quantity

log = logging.getLogger("kubelet_emulator")
MERGE_PATCH = "application/merge-patch+json"


def pod_requests(pod: Mapping[str, Any]) -> dict[str, float]:
    """The pod's resource requests (a missing request defaults to the limit), plus one `pods`."""
    total: dict[str, float] = {"pods": 1}
    for container in pod["spec"]["containers"]:
        resources = container.get("resources") or {}
        merged = {**(resources.get("limits") or {}), **(resources.get("requests") or {})}
        for name, value in merged.items():
            total[name] = total.get(name, 0) + float(parse_quantity(value))
    return total


def _tolerates(tolerations: list[dict[str, Any]], taint: Mapping[str, Any]) -> bool:
    for t in tolerations:
        if t.get("effect") and t["effect"] != taint["effect"]:
            continue
        if t.get("operator") == "Exists" and (not t.get("key") or t["key"] == taint["key"]):
            return True
        if t.get("key") == taint["key"] and t.get("value", "") == taint.get("value", ""):
            return True
    return False


def _matches_affinity(pod: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    required = ((((pod["spec"].get("affinity") or {}).get("nodeAffinity") or {})
                 .get("requiredDuringSchedulingIgnoredDuringExecution")) or {})
    terms = required.get("nodeSelectorTerms") or []
    if not terms:
        return True

    def expression(e: Mapping[str, Any]) -> bool:
        value, op = labels.get(e["key"]), e["operator"]
        return {"In": value in (e.get("values") or []), "NotIn": value not in (e.get("values") or []),
                "Exists": value is not None, "DoesNotExist": value is None}.get(op, False)

    return any(all(expression(e) for e in term.get("matchExpressions") or []) for term in terms)


def fit_reasons(pod: Mapping[str, Any], labels: Mapping[str, str], taints: Sequence[Mapping[str, Any]],
                allocatable: Mapping[str, float], used: Mapping[str, float]) -> list[tuple[str, bool]]:
    """Why `pod` does not fit a node: [(reason, whether preemption could help)]; empty when it fits.

    The real scheduler's filter order (TaintToleration, NodeAffinity, NodeResourcesFit), first failing
    filter wins; every insufficient resource is listed.
    """
    spec = pod["spec"]
    for taint in taints:
        if taint.get("effect") in ("NoSchedule", "NoExecute") and not _tolerates(spec.get("tolerations") or [],
                                                                                  taint):
            return [(f"node(s) had untolerated taint {{{taint['key']}: {taint.get('value', '')}}}", False)]
    selector = spec.get("nodeSelector") or {}
    if any(labels.get(k) != v for k, v in selector.items()) or not _matches_affinity(pod, labels):
        return [("node(s) didn't match Pod's node affinity/selector", False)]
    return [("Too many pods" if name == "pods" else f"Insufficient {name}", True)
            for name, amount in pod_requests(pod).items()
            if amount and used.get(name, 0) + amount > allocatable.get(name, 0)]


def unschedulable_message(failures: Sequence[Sequence[tuple[str, bool]]], problem: str | None = None,
                          nodes: int | None = None) -> str:
    """The PodScheduled=False message, as kube-scheduler words it, from every node's `fit_reasons`
    (or a pod-level PreFilter `problem` such as a missing PVC, over `nodes` nodes)."""
    total = len(failures) if nodes is None else nodes
    if problem is not None:
        return (f"0/{total} nodes are available: {problem}. preemption: 0/{total} nodes are available: "
                f"{total} Preemption is not helpful for scheduling.")
    if not total:
        return "no nodes available to schedule pods"
    counts: dict[str, int] = {}
    for why in failures:
        for reason, _ in why:
            counts[reason] = counts.get(reason, 0) + 1
    helpful = sum(any(can for _, can in why) for why in failures)
    histogram = ", ".join(sorted(f"{count} {reason}" for reason, count in counts.items()))
    preemption = sorted(f"{count} {text}" for count, text in (
        (helpful, "No preemption victims found for incoming pod"),
        (total - helpful, "Preemption is not helpful for scheduling")) if count)
    return (f"0/{total} nodes are available: {histogram}. preemption: 0/{total} nodes are available: "
            f"{', '.join(preemption)}.")


class SchedulerMixin:
    """The API side of scheduling, for KubeletEmulator: bind pending Pods (Binding subresource, Scheduled
    event) or report PodScheduled=False/Unschedulable (FailedScheduling event); marks mounted PVCs Bound."""

    _core: kubernetes.client.CoreV1Api
    _lock: threading.RLock
    _pods: dict[tuple[str, str], dict[str, Any]]
    _nodes: dict[str, dict[str, Any]]
    _assumed: dict[str, str]
    _unschedulable: dict[str, str]
    _capacity_changed: bool
    _last_schedule: float
    retry_seconds: float

    def _event(self, pod: Mapping[str, Any], kind: str, reason: str, message: str, component: str) -> None:
        raise NotImplementedError

    def _schedule(self, pending: list[dict[str, Any]]) -> None:
        pending = [p for p in pending if not p["metadata"].get("deletionTimestamp")]
        if not pending:
            return
        retry = self._capacity_changed or time.monotonic() - self._last_schedule > self.retry_seconds
        self._capacity_changed = False
        pending.sort(key=lambda p: p["metadata"].get("creationTimestamp", ""))
        attempted = False
        for pod in pending:
            uid = pod["metadata"]["uid"]
            if uid in self._unschedulable and not retry:
                continue
            attempted = True
            try:
                self._schedule_one(pod)
            except ApiException as error:
                if error.status not in (404, 409):
                    raise
        if attempted:
            self._last_schedule = time.monotonic()

    def _used(self, node: str) -> dict[str, float]:
        used: dict[str, float] = {}
        with self._lock:
            pods = list(self._pods.values())
        for pod in pods:
            # A pod bound a moment ago may not have reached the watch cache yet: count it where it was bound.
            bound = pod["spec"].get("nodeName") or self._assumed.get(pod["metadata"]["uid"])
            if bound == node and pod.get("status", {}).get("phase") not in ("Succeeded", "Failed"):
                for name, value in pod_requests(pod).items():
                    used[name] = used.get(name, 0) + value
        return used

    def _claims_problem(self, pod: Mapping[str, Any]) -> str | None:
        """A missing PVC (the scheduler's PreFilter error); existing Pending claims are marked Bound."""
        namespace = pod["metadata"]["namespace"]
        for volume in pod["spec"].get("volumes") or []:
            if "persistentVolumeClaim" not in volume:
                continue
            claim = volume["persistentVolumeClaim"]["claimName"]
            try:
                pvc = json.loads(self._core.read_namespaced_persistent_volume_claim(
                    claim, namespace, _preload_content=False).data)
            except ApiException as error:
                if error.status == 404:
                    return f'persistentvolumeclaim "{claim}" not found'
                raise
            if pvc["metadata"].get("deletionTimestamp"):
                return f'persistentvolumeclaim "{claim}" is being deleted'
            if pvc.get("status", {}).get("phase") != "Bound":
                requested = pvc["spec"].get("resources", {}).get("requests", {}).get("storage", "1Gi")
                status = {"phase": "Bound", "accessModes": pvc["spec"].get("accessModes") or ["ReadWriteOnce"],
                          "capacity": {"storage": requested}}
                self._core.patch_namespaced_persistent_volume_claim_status(
                    claim, namespace, {"status": status}, _content_type=MERGE_PATCH, _preload_content=False)
        return None

    def _schedule_one(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        nodes = list(self._nodes)
        problem = self._claims_problem(pod)
        if problem is not None:
            self._unschedulable_status(pod, unschedulable_message([], problem=problem, nodes=len(nodes)))
            return
        failures: list[list[tuple[str, bool]]] = []
        for node in nodes:
            info = self._nodes[node]
            why = fit_reasons(pod, info["labels"], info["taints"], info["allocatable"], self._used(node))
            if not why:
                body = {"apiVersion": "v1", "kind": "Binding", "metadata": {"name": meta["name"], "uid": meta["uid"]},
                        "target": {"apiVersion": "v1", "kind": "Node", "name": node}}
                self._core.create_namespaced_pod_binding(meta["name"], meta["namespace"], body,
                                                         _preload_content=False)
                self._unschedulable.pop(meta["uid"], None)
                self._assumed[meta["uid"]] = node
                log.info("scheduled %s/%s on %s", meta["namespace"], meta["name"], node)
                self._event(pod, "Normal", "Scheduled",
                            f"Successfully assigned {meta['namespace']}/{meta['name']} to {node}", "default-scheduler")
                return
            failures.append(why)
        self._unschedulable_status(pod, unschedulable_message(failures))

    def _unschedulable_status(self, pod: dict[str, Any], message: str) -> None:
        meta = pod["metadata"]
        if self._unschedulable.get(meta["uid"]) == message:
            return
        condition = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message,
                     "lastProbeTime": None, "lastTransitionTime": now()}
        body = {"metadata": {"uid": meta["uid"]}, "status": {"conditions": [condition]}}
        self._core.patch_namespaced_pod_status(meta["name"], meta["namespace"], body, _content_type=MERGE_PATCH,
                                               _preload_content=False)
        self._unschedulable[meta["uid"]] = message
        log.info("%s/%s unschedulable: %s", meta["namespace"], meta["name"], message)
        self._event(pod, "Warning", "FailedScheduling", message, "default-scheduler")
