"""What the Pods of a LocalModel's StatefulSet say about themselves, from their `status` (plain JSON dicts).

A pod is *ready* when its server container is (the ContainersReady condition: the server answers /health), it
has an IP and is not being deleted. That is not the pod's own Ready condition: the pod's readiness gate
(`resources.MODEL_LOADED_CONDITION`, its `model_loaded`) holds that back until the operator has loaded the model
into it, and the operator talks to the server before that. A pod that is not ready may carry a *failure* the
user has to act on (no node fits, the image cannot be pulled, the server keeps crashing, a referenced Secret is
missing); one that is merely starting carries none.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from lmkube.operator import clock

# Container waiting reasons that will not go away by waiting a few seconds.
_PULL_REASONS = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"}
_CONFIG_REASONS = {"CreateContainerConfigError", "CreateContainerError", "RunContainerError"}
# The StatefulSet controller creates a replica's claim and its pod together, so the scheduler's first try often
# finds the claim not bound yet; binding (or a cloud disk being provisioned) takes seconds to a minute. Only a
# claim still unbound after this long is the user's to fix (no StorageClass, no matching PersistentVolume).
VOLUME_BIND_GRACE_SECONDS = 60.0
_UNBOUND_CLAIM_WORDS = ("unbound immediate PersistentVolumeClaims", "persistentvolumeclaim")


@dataclass(frozen=True)
class PodFailure:
    reason: str  # a condition reason: Unschedulable, ImagePullFailed, CrashLoopBackOff, ...
    message: str


@dataclass(frozen=True)
class PodView:
    name: str
    uid: str
    ip: str | None
    ready: bool
    scheduled: bool
    terminating: bool
    server_id: str  # changes whenever the server process restarts (container id + restart count)
    pod_hash: str | None  # the pod-spec-hash annotation of the template the pod came from
    failure: PodFailure | None
    # The server container's memory limit (as written in the pod spec) and whether the kernel's OOM
    # killer ended its last run: a load that does not fit the limit kills the server, not the request.
    memory_limit: str | None = None
    oom_killed: bool = False
    # The readiness gate's condition: True/False as the operator last set it, None when it never did.
    model_loaded: bool | None = None


def _conditions(pod: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {c.get("type", ""): c for c in (pod.get("status") or {}).get("conditions") or []}


def pod_failure(pod: Mapping[str, Any], now: float | None = None) -> PodFailure | None:
    """The actionable reason a pod does not serve, or None if it is fine or just starting."""
    status = pod.get("status") or {}
    name = (pod.get("metadata") or {}).get("name", "?")
    scheduled = _conditions(pod).get("PodScheduled")
    if scheduled is not None and scheduled.get("status") == "False":
        message = scheduled.get("message") or "no node can run the pod"
        if any(words in message for words in _UNBOUND_CLAIM_WORDS):
            created = clock.epoch((pod.get("metadata") or {}).get("creationTimestamp"))
            if created is not None and (time.time() if now is None else now) - created < VOLUME_BIND_GRACE_SECONDS:
                return None
            message += ("; the model volume's claim has not bound: check that spec.storage.storageClassName "
                        "(or the cluster's default StorageClass) can provision it, or that a PersistentVolume "
                        "matches it")
        reason = scheduled.get("reason") or "Unschedulable"
        return PodFailure("Unschedulable" if reason == "Unschedulable" else reason,
                          f"pod {name} cannot be scheduled: {message}")
    for container in [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]:
        waiting = (container.get("state") or {}).get("waiting") or {}
        reason = waiting.get("reason")
        detail = waiting.get("message") or reason
        if reason in _PULL_REASONS:
            return PodFailure("ImagePullFailed", f"pod {name}: cannot pull image {container.get('image')!r} "
                                                 f"({reason}: {detail})")
        if reason == "CrashLoopBackOff":
            last = (container.get("lastState") or {}).get("terminated") or {}
            if last.get("reason") == "OOMKilled":
                return PodFailure("OOMKilled", f"pod {name}: the kernel killed the server (OOMKilled) for going "
                                               f"over its memory limit ({container_memory_limit(pod) or 'none set'}); "
                                               "raise spec.resources.limits.memory or lower spec.contextLength")
            exit_info = f"; last exit code {last['exitCode']}" if "exitCode" in last else ""
            return PodFailure("CrashLoopBackOff", f"pod {name}: the server keeps crashing "
                                                  f"({container.get('restartCount', 0)} restarts{exit_info}); "
                                                  "see kubectl logs --previous")
        if reason in _CONFIG_REASONS:
            return PodFailure(reason, f"pod {name}: {detail}")
    if status.get("phase") == "Failed":
        return PodFailure("PodFailed", f"pod {name} failed: {status.get('message') or status.get('reason') or ''}")
    return None


def container_memory_limit(pod: Mapping[str, Any]) -> str | None:
    """resources.limits.memory of the pod's first container (the server), as written."""
    containers = (pod.get("spec") or {}).get("containers") or [{}]
    return ((containers[0].get("resources") or {}).get("limits") or {}).get("memory")


def _oom_killed(pod: Mapping[str, Any]) -> bool:
    for container in (pod.get("status") or {}).get("containerStatuses") or []:
        for state in (container.get("state") or {}, container.get("lastState") or {}):
            if (state.get("terminated") or {}).get("reason") == "OOMKilled":
                return True
    return False


def _server_id(pod: Mapping[str, Any]) -> str:
    uid = (pod.get("metadata") or {}).get("uid", "")
    for container in (pod.get("status") or {}).get("containerStatuses") or []:
        running = (container.get("state") or {}).get("running") or {}
        return f"{uid}/{container.get('containerID', '')}/{container.get('restartCount', 0)}/{running.get('startedAt')}"
    return uid


def _status_of(condition: Mapping[str, Any] | None) -> bool | None:
    return None if condition is None else condition.get("status") == "True"


def view(pod: Mapping[str, Any], hash_annotation: str, gate: str | None = None,
         now: float | None = None) -> PodView:
    """`gate`: the condition type of the pods' readiness gate, read into `model_loaded`."""
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    conditions = _conditions(pod)
    terminating = meta.get("deletionTimestamp") is not None
    # ContainersReady is the kubelet's; a pod status written without it (older clusters) has Ready alone.
    server_ready = _status_of(conditions.get("ContainersReady", conditions.get("Ready")))
    ready = bool(server_ready) and bool(status.get("podIP")) and not terminating
    scheduled = bool((pod.get("spec") or {}).get("nodeName")) or conditions.get("PodScheduled", {}).get(
        "status") == "True"
    return PodView(
        name=meta.get("name", ""), uid=meta.get("uid", ""), ip=status.get("podIP"), ready=ready,
        scheduled=scheduled, terminating=terminating, server_id=_server_id(pod),
        pod_hash=(meta.get("annotations") or {}).get(hash_annotation),
        failure=None if ready else pod_failure(pod, now),
        memory_limit=container_memory_limit(pod), oom_killed=_oom_killed(pod),
        model_loaded=_status_of(conditions.get(gate)) if gate else None,
    )


def views(pods: Iterable[Mapping[str, Any]], hash_annotation: str, gate: str | None = None,
          now: float | None = None) -> list[PodView]:
    """Views of the pods, oldest name first so the order is stable between reconciles."""
    return sorted((view(p, hash_annotation, gate, now) for p in pods), key=lambda v: v.name)
