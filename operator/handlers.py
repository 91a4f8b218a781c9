"""Thin kopf handlers around `lmkube.operator.reconcile`.

- create / update / resume of a LocalModel: reconcile now.
- a timer per LocalModel (every `poll_seconds`): reconcile while the model is on its way (downloading,
  loading, failed and waiting to retry, pods not ready), when one of its pods, its Deployment or its
  Service changed (a watch on those marks it), and at least every `resync_seconds` otherwise, which is
  also what brings back a deleted Secret or PVC.
- delete: unload the model on the pods, best effort with a short timeout, then kopf drops its finalizer
  and the garbage collector removes the owned objects.

Handlers are sync (kopf runs them in worker threads); one lock per LocalModel keeps a timer tick and an
event handler from reconciling the same object at once.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf
from lmkube.operator import crd, resources
from lmkube.operator import reconcile as rc
from lmkube.operator.kube import Kube, load_config
from lmkube.operator.spec import OperatorSettings

log = logging.getLogger("lmkube.operator")

MANAGED = {"app.kubernetes.io/managed-by": "lmkube-operator"}
INSTANCE_LABEL = "app.kubernetes.io/instance"
SETTLED = ("Ready", "Idle")


@dataclass(frozen=True)
class Timing:
    poll_seconds: float = 2.0
    resync_seconds: float = 30.0
    retry_seconds: float = 5.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Timing:
        """From LMKUBE_OPERATOR_POLL_SECONDS, _RESYNC_SECONDS and _RETRY_SECONDS."""
        env = os.environ if environ is None else environ
        default = cls()
        return cls(
            poll_seconds=float(env.get("LMKUBE_OPERATOR_POLL_SECONDS") or default.poll_seconds),
            resync_seconds=float(env.get("LMKUBE_OPERATOR_RESYNC_SECONDS") or default.resync_seconds),
            retry_seconds=float(env.get("LMKUBE_OPERATOR_RETRY_SECONDS") or default.retry_seconds),
        )


@dataclass
class Runtime:
    """What the handlers share: the API client, options, and per-LocalModel bookkeeping."""

    kube: Kube
    options: rc.Options
    timing: Timing
    locks: dict[str, threading.Lock] = field(default_factory=dict)
    last_run: dict[str, float] = field(default_factory=dict)
    triggered: set[tuple[str, str]] = field(default_factory=set)  # (namespace, instance label)
    guard: threading.Lock = field(default_factory=threading.Lock)

    def lock(self, uid: str) -> threading.Lock:
        with self.guard:
            return self.locks.setdefault(uid, threading.Lock())

    def trigger(self, namespace: str, instance: str) -> None:
        with self.guard:
            self.triggered.add((namespace, instance))

    def take_trigger(self, namespace: str, name: str) -> bool:
        key = (namespace, resources.labels(name)[INSTANCE_LABEL])
        with self.guard:
            if key in self.triggered:
                self.triggered.discard(key)
                return True
            return False


def _emit(body: Mapping[str, Any], kind: str, reason: str, message: str) -> None:
    kopf.event(dict(body), type=kind, reason=reason, message=message[:1024])


def _run(runtime: Runtime, body: Mapping[str, Any]) -> dict[str, Any]:
    uid = body["metadata"]["uid"]
    with runtime.lock(uid):
        meta = body["metadata"]
        # The body kopf handed over may be a few events old: act on the latest.
        fresh = runtime.kube.get_local_model(meta["namespace"], meta["name"]) or dict(body)
        if fresh.get("metadata", {}).get("deletionTimestamp"):
            return fresh.get("status") or {}
        status = rc.reconcile(runtime.kube, fresh, runtime.options, _emit)
        runtime.last_run[uid] = time.monotonic()
        return status


def register(registry: kopf.OperatorRegistry, runtime: Runtime) -> None:
    """Registers the handlers on `registry` (a fresh one per operator, so tests can run several)."""
    resource = (crd.GROUP, crd.VERSION, crd.PLURAL)

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # A fresh registry has none of kopf's default handlers: log in the way `Kube` does.
        return kopf.login_via_client(**kwargs)

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        # Kopf's bookkeeping goes into annotations: the CRD's status schema is strict (no status.kopf).
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=crd.GROUP)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=crd.GROUP, key="last-handled-configuration")
        settings.persistence.finalizer = f"{crd.GROUP}/unload"
        settings.posting.level = logging.WARNING  # kopf's own "handler succeeded" lines are no Events
        settings.watching.server_timeout = 300
        settings.execution.max_workers = 16

    @kopf.on.create(*resource, registry=registry)
    @kopf.on.update(*resource, registry=registry)
    @kopf.on.resume(*resource, registry=registry)
    def reconcile_now(body: kopf.Body, **_: Any) -> None:
        try:
            _run(runtime, body)
        except Exception as exc:
            raise kopf.TemporaryError(f"reconcile failed: {exc}", delay=runtime.timing.retry_seconds) from exc

    @kopf.timer(*resource, registry=registry, interval=runtime.timing.poll_seconds)
    def poll(body: kopf.Body, **_: Any) -> None:
        meta = body["metadata"]
        phase = (body.get("status") or {}).get("phase")
        since = time.monotonic() - runtime.last_run.get(meta["uid"], 0.0)
        triggered = runtime.take_trigger(meta["namespace"], meta["name"])
        stale = (body.get("status") or {}).get("observedGeneration") != meta.get("generation")
        if phase in SETTLED and not triggered and not stale and since < runtime.timing.resync_seconds:
            return
        try:
            _run(runtime, body)
        except Exception:
            log.exception("reconcile of %s/%s failed", meta["namespace"], meta["name"])

    @kopf.on.delete(*resource, registry=registry)
    def unload(body: kopf.Body, **_: Any) -> None:
        count = rc.unload_all(runtime.kube, body, runtime.options)
        log.info("LocalModel %s/%s deleted: unloaded %d instance(s)", body["metadata"]["namespace"],
                 body["metadata"]["name"], count)

    def owned_changed(body: kopf.Body, **_: Any) -> None:
        instance = (body.get("metadata", {}).get("labels") or {}).get(INSTANCE_LABEL)
        if instance:
            runtime.trigger(body["metadata"]["namespace"], instance)

    for group_version, plural in (("v1", "pods"), ("apps/v1", "deployments"), ("v1", "services")):
        kopf.on.event(group_version, plural, labels=MANAGED, registry=registry)(owned_changed)


def build_runtime(settings: OperatorSettings | None = None, timing: Timing | None = None) -> Runtime:
    timing = timing or Timing.from_env()
    options = rc.Options(settings=settings or OperatorSettings.from_env(), retry_seconds=timing.retry_seconds)
    return Runtime(kube=Kube(load_config()), options=options, timing=timing)
