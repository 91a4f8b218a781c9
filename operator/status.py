"""The LocalModel's `status` from what a reconcile observed: phase, conditions, download progress.

Pure functions. The reconciler decides a `PodState` for every pod of the StatefulSet; `summarize`
folds them (with the pods' own health) into one phase, `conditions` renders the four standard
conditions, keeping `lastTransitionTime` of a condition whose status did not change.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from lmkube.operator.observe import PodView

log = logging.getLogger("lmkube.operator")


class _StatusWriter(Protocol):
    def patch_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None: ...


# Stages of one pod, in the order a pod goes through them.
WAITING, DOWNLOADING, LOADING, READY, IDLE, FAILED = "Waiting", "Downloading", "Loading", "Ready", "Idle", "Failed"
SCALED_TO_ZERO = "ScaledToZero"  # a phase of the LocalModel: no pods asked for; its files stay on the volume


@dataclass(frozen=True)
class Progress:
    downloaded_bytes: int = 0
    total_bytes: int = 0
    bytes_per_second: float = 0.0

    @property
    def percent(self) -> float:
        if self.total_bytes <= 0:
            return 0.0
        return round(min(100.0, 100.0 * self.downloaded_bytes / self.total_bytes), 1)

    def as_status(self) -> dict[str, Any]:
        return {"downloadedBytes": self.downloaded_bytes, "totalBytes": self.total_bytes, "percent": self.percent,
                "bytesPerSecond": round(max(self.bytes_per_second, 0.0), 1)}


DONE = Progress(1, 1)  # a download that finished (or was never needed): 100 %


@dataclass(frozen=True)
class PodState:
    """Where the model stands on one ready pod."""

    name: str
    stage: str
    reason: str = ""
    message: str = ""
    progress: Progress | None = None
    context_length: int | None = None
    variant: str | None = None


@dataclass(frozen=True)
class Summary:
    phase: str
    reason: str
    message: str
    ready_replicas: int
    progress: Progress | None
    pods_ready: tuple[str, str, str]  # (status, reason, message) of the PodsReady condition
    downloaded: tuple[str, str, str]
    loaded: tuple[str, str, str]
    pods: int = 0  # pods of the current spec, ready or not (the scale subresource's status.replicas)


def load_status(phase: str) -> dict[str, Any] | None:
    """`status.load` as a pass leaves it: 0 % while Loading (the load itself moves it, `LoadReporter`), 100 %
    once the model is served; none in the other phases."""
    if phase == LOADING:
        return {"percent": 0.0}
    return {"percent": 100.0} if phase == READY else None


class LoadReporter:
    """Writes a pod's load progress (the server's streamed load) to `status.load.percent` while the load runs,
    so that `kubectl get lm` shows it; a write per `STEP` percent, and a failed write never fails the load."""

    STEP = 5.0

    def __init__(self, kube: _StatusWriter, namespace: str, name: str) -> None:
        self.kube = kube
        self.namespace = namespace
        self.name = name
        self.percent = 0.0

    def __call__(self, fraction: float) -> None:
        percent = round(min(max(fraction, 0.0), 1.0) * 100, 1)
        if percent - self.percent < self.STEP and not (percent == 100.0 and self.percent < 100.0):
            return
        self.percent = percent
        try:
            self.kube.patch_status(self.namespace, self.name, {"load": {"percent": percent}})
        except Exception as exc:  # the next pass writes the whole status anyway
            log.info("could not write the load progress of %s/%s: %s", self.namespace, self.name, exc)


def summarize(replicas: int, pods: Sequence[PodView], states: Sequence[PodState]) -> Summary:
    """One phase for the LocalModel: Ready only when every desired replica serves the model."""
    serving = [s for s in states if s.stage in (READY, IDLE)]
    ready_pods = [p for p in pods if p.ready]
    failing_pods = [p for p in pods if p.failure is not None]
    failed_states = [s for s in states if s.stage == FAILED]
    downloading = [s for s in states if s.stage == DOWNLOADING]
    loading = [s for s in states if s.stage == LOADING]
    progress = _slowest(downloading)

    if len(ready_pods) >= replicas and replicas > 0:
        pods_ready = ("True", "PodsReady", f"{len(ready_pods)}/{replicas} pods ready")
    elif failing_pods:
        failure = failing_pods[0].failure
        assert failure is not None
        pods_ready = ("False", failure.reason, failure.message)
    else:
        pods_ready = ("False", "PodsNotReady", f"{len(ready_pods)}/{replicas} pods ready")

    if not states:
        downloaded = loaded = ("Unknown", "NoReadyPods", "no ready pod to ask")
    else:
        downloaded = _condition(states, (LOADING, READY, IDLE), "Downloaded", "all ready pods have the model")
        loaded = _condition(states, (READY,), "Loaded", "the model is loaded on every ready pod")

    if replicas == 0:
        phase, reason = SCALED_TO_ZERO, SCALED_TO_ZERO
        message = "spec.replicas is 0: no pod runs; the model files stay on the volume for the next start"
    elif len(serving) >= replicas:
        phase = READY if any(s.stage == READY for s in serving) else IDLE
        reason = phase
        message = (f"serving on {len(serving)} pod(s)" if phase == READY
                   else "unloaded after the idle ttl; the server loads it again on the next request")
    elif failed_states:
        phase, reason, message = FAILED, failed_states[0].reason, failed_states[0].message
    elif failing_pods:
        failure = failing_pods[0].failure
        assert failure is not None
        phase, reason, message = FAILED, failure.reason, failure.message
    elif downloading:
        phase, reason = DOWNLOADING, "Downloading"
        message = downloading[0].message or "downloading the model"
    elif loading:
        phase, reason, message = LOADING, "Loading", loading[0].message or "loading the model"
    elif pods:
        waiting = [p for p in pods if not p.ready]
        unscheduled = [p for p in waiting if not p.scheduled]
        phase, reason = "Scheduling", "PodsNotReady"
        if unscheduled:
            message = f"waiting for pod {unscheduled[0].name} to be scheduled"
        elif waiting:
            message = f"waiting for pod {waiting[0].name} to become ready"
        else:
            message = "waiting for the pods to be checked"
    else:
        phase, reason, message = "Pending", "NoPods", "waiting for the StatefulSet to create pods"
    return Summary(phase, reason, message, len(serving), progress, pods_ready, downloaded, loaded, len(pods))


def _condition(states: Sequence[PodState], good: tuple[str, ...], reason: str, message: str) -> tuple[str, str, str]:
    bad = [s for s in states if s.stage not in good]
    if not bad:
        return "True", reason, message
    first = bad[0]
    if first.stage == IDLE:
        return "False", "IdleUnloaded", "unloaded after the idle ttl"
    return "False", first.reason or first.stage, first.message or first.stage


def _slowest(states: Sequence[PodState]) -> Progress | None:
    known = [s.progress for s in states if s.progress is not None]
    return min(known, key=lambda p: (p.percent, p.downloaded_bytes)) if known else None


def set_condition(conditions: Sequence[Mapping[str, Any]], kind: str, status: str, reason: str, message: str,
                  generation: int | None, now: str) -> list[dict[str, Any]]:
    """`conditions` with `kind` set; lastTransitionTime moves only when the status changes."""
    result: list[dict[str, Any]] = []
    found = False
    for existing in conditions:
        if existing.get("type") != kind:
            result.append(dict(existing))
            continue
        found = True
        changed = existing.get("status") != status
        result.append(_make(kind, status, reason, message, generation,
                            now if changed else existing.get("lastTransitionTime") or now))
    if not found:
        result.append(_make(kind, status, reason, message, generation, now))
    return result


def _make(kind: str, status: str, reason: str, message: str, generation: int | None, when: str) -> dict[str, Any]:
    condition: dict[str, Any] = {"type": kind, "status": status, "reason": reason, "message": message[:32000],
                                 "lastTransitionTime": when}
    if generation is not None:
        condition["observedGeneration"] = generation
    return condition


def conditions(previous: Sequence[Mapping[str, Any]], summary: Summary, generation: int | None,
               now: str) -> list[dict[str, Any]]:
    result: Sequence[Mapping[str, Any]] = previous
    for kind, (status, reason, message) in (("PodsReady", summary.pods_ready), ("Downloaded", summary.downloaded),
                                            ("Loaded", summary.loaded)):
        result = set_condition(result, kind, status, reason, message, generation, now)
    ready = "True" if summary.phase in (READY, IDLE) else "False"
    return set_condition(result, "Ready", ready, summary.reason, summary.message, generation, now)


def failed_conditions(previous: Sequence[Mapping[str, Any]], reason: str, message: str, generation: int | None,
                      now: str) -> list[dict[str, Any]]:
    """Conditions for a LocalModel the operator cannot act on at all (an invalid spec)."""
    result: Sequence[Mapping[str, Any]] = previous
    for kind in ("PodsReady", "Downloaded", "Loaded"):
        result = set_condition(result, kind, "Unknown", reason, message, generation, now)
    return set_condition(result, "Ready", "False", reason, message, generation, now)
