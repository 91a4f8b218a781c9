"""The operator's autoscaler: every interval, each LocalModel with `spec.scaling` gets a decision (autoscale.py).

It owns `spec.replicas` of those models: it writes the count there (with the resourceVersion it read, so a
concurrent `kubectl scale` or a wake-up from the gateway is never overwritten blindly), and the reconcile
passes carry it to the StatefulSet as they do any spec change. A count set from outside is accepted and
starts the scale-down delay (see autoscale.decide). Each change is written to status (`desiredReplicas`,
`scaling.lastScaleTime/Reason/Message`) and posted as an Event on the LocalModel.

Which models: those kopf's watch shows (an event handler keeps the set), so the autoscaler covers exactly
the namespaces the operator serves. It runs on its own thread, beside the reconcile schedule.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException
from lmkube.operator import crd
from lmkube.operator.autoscale import Decision, LoadWindow, Memory, Policy, decide
from lmkube.operator.clock import epoch, iso, micro_iso
from lmkube.operator.kube import MERGE_PATCH, Kube
from lmkube.operator.loadprobe import PodLoadProbe
from lmkube.operator.spec import LocalModelSpec, OperatorSettings, parse_spec

log = logging.getLogger("lmkube.operator")

Key = tuple[str, str]
# load(LocalModel body, its parsed spec) -> running + queued requests over its ready replicas, None: unknown.
LoadSource = Callable[[Mapping[str, Any], LocalModelSpec], "float | None"]
DEFAULT_INTERVAL = 5.0


def interval_from_env(environ: Mapping[str, str] | None = None) -> float:
    env = os.environ if environ is None else environ
    return float(env.get("LMKUBE_OPERATOR_AUTOSCALE_INTERVAL") or DEFAULT_INTERVAL)


def memory_of(status: Mapping[str, Any]) -> Memory:
    scaling = status.get("scaling") or {}
    decided = status.get("desiredReplicas")
    return Memory(decided=decided if isinstance(decided, int) else None,
                  last_scale_time=epoch(scaling.get("lastScaleTime")), last_reason=scaling.get("lastScaleReason"),
                  low_demand_since=epoch(scaling.get("lowDemandSince")))


def status_of(decision: Decision, previous: Mapping[str, Any]) -> dict[str, Any]:
    """The status fields the autoscaler owns, after `decision`."""
    memory = decision.memory
    scaling: dict[str, Any] = {
        "load": round(decision.load, 1) if decision.load is not None else None,
        "lastScaleTime": micro_iso(memory.last_scale_time) if memory.last_scale_time is not None else None,
        "lastScaleReason": memory.last_reason,
        "lowDemandSince": micro_iso(memory.low_demand_since) if memory.low_demand_since is not None else None,
        "lastScaleMessage": decision.message if decision.reason else (previous.get("scaling") or {}).get(
            "lastScaleMessage"),
    }
    return {"desiredReplicas": memory.decided, "scaling": scaling}


def _without_nulls(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    return value


@dataclass
class Autoscaler:
    kube: Kube
    load: LoadSource
    interval: float = DEFAULT_INTERVAL
    clock: Callable[[], float] = time.time

    def __post_init__(self) -> None:
        self._keys: set[Key] = set()
        self._windows: dict[Key, LoadWindow] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- what kopf calls -----------------------------------------------------------------------------

    def observe(self, kind: str | None, body: Mapping[str, Any]) -> None:
        """A watch event of a LocalModel: keep the models that have spec.scaling."""
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        with self._lock:
            if kind == "DELETED" or not (body.get("spec") or {}).get("scaling"):
                self._keys.discard(key)
                self._windows.pop(key, None)
            else:
                self._keys.add(key)

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="lmkube-autoscaler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        self._thread = None

    def models(self) -> set[Key]:
        with self._lock:
            return set(self._keys)

    # -- the loop ------------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for key in sorted(self.models()):
                if self._stop.is_set():
                    return
                try:
                    self.step(key)
                except Exception:
                    log.exception("autoscaling %s/%s failed", *key)

    def step(self, key: Key) -> Decision | None:
        """One decision for the LocalModel `key`; None when it is gone, has no (valid) spec.scaling, or the
        count it would write changed meanwhile (the next step decides again)."""
        namespace, name = key
        body = self.kube.get_local_model(namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            self.observe("DELETED", {"metadata": {"namespace": namespace, "name": name}})
            return None
        try:
            spec = parse_spec(body.get("spec") or {})
        except ValueError:
            return None  # the reconcile reports the invalid spec
        if spec.scaling is None:
            self.observe("MODIFIED", body)
            return None
        policy = Policy.of(spec)
        now = self.clock()
        with self._lock:
            window = self._windows.setdefault(key, LoadWindow())
        measured = False
        if spec.replicas > 0:
            load = self.load(body, spec)
            if load is not None:
                window.add(now, load, keep=policy.window)
                measured = True
        else:
            window.clear()
        status = body.get("status") or {}
        decision = decide(policy, spec.replicas, window, now, memory_of(status), measured)
        if decision.changes(spec.replicas) and not self._set_replicas(body, decision.replicas):
            return None
        fields = status_of(decision, status)
        if _without_nulls(fields) != _without_nulls({k: status.get(k) for k in fields}):
            self.kube.patch_status(namespace, name, fields)  # a merge patch: its nulls remove the fields
        if decision.reason:
            log.info("LocalModel %s/%s: %s: %s", namespace, name, decision.reason, decision.message)
            self._event(body, decision.reason, decision.message)
        return decision

    def _set_replicas(self, body: Mapping[str, Any], replicas: int) -> bool:
        meta = body["metadata"]
        patch = {"metadata": {"resourceVersion": meta["resourceVersion"]}, "spec": {"replicas": replicas}}
        try:
            self.kube.custom.patch_namespaced_custom_object(
                crd.GROUP, crd.VERSION, meta["namespace"], crd.PLURAL, meta["name"], patch,
                _content_type=MERGE_PATCH, _preload_content=False)
        except ApiException as error:
            if error.status in (404, 409):  # deleted, or changed since it was read
                return False
            raise
        return True

    def _event(self, body: Mapping[str, Any], reason: str, message: str) -> None:
        meta = body["metadata"]
        when = iso(self.clock())
        event = {
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": crd.API_VERSION, "kind": crd.KIND, "name": meta["name"],
                               "namespace": meta["namespace"], "uid": meta.get("uid")},
            "reason": reason, "message": message[:1024], "type": "Normal",
            "source": {"component": "lmkube-operator"}, "reportingComponent": "lmkube-operator",
            "firstTimestamp": when, "lastTimestamp": when, "count": 1,
        }
        try:
            self.kube.core.create_namespaced_event(meta["namespace"], event, _preload_content=False)
        except ApiException as error:
            log.warning("event %s on %s/%s not posted: %s", reason, meta["namespace"], meta["name"], error.reason)


def build_autoscaler(kube: Kube, settings: OperatorSettings, interval: float | None = None) -> Autoscaler:
    return Autoscaler(kube=kube, load=PodLoadProbe(kube, settings),
                      interval=interval_from_env() if interval is None else interval)


def register(registry: kopf.OperatorRegistry, autoscaler: Autoscaler) -> None:
    """Runs `autoscaler` with the operator: started and stopped with it, fed by its watch of LocalModels."""

    @kopf.on.startup(registry=registry)
    def start_autoscaler(**_: Any) -> None:
        autoscaler.start()

    @kopf.on.cleanup(registry=registry)
    def stop_autoscaler(**_: Any) -> None:
        autoscaler.stop()

    @kopf.on.event(crd.GROUP, crd.VERSION, crd.PLURAL, registry=registry)
    async def follow(body: kopf.Body, type: str | None, **_: Any) -> None:
        # Async (kopf's event loop): it only updates a set under a lock for a moment.
        autoscaler.observe(type, body)
