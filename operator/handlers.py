"""Thin kopf handlers around `lmkube.operator.reconcile`, with `lmkube.operator.schedule` deciding when.

- a LocalModel seen for the first time (created, or listed when the operator starts) or with a spec not
  reconciled yet (`metadata.generation` past `status.observedGeneration`): a pass now. Its other events (the
  operator's own status writes) start none. A watch event rather than kopf's create/update/resume handlers:
  those need kopf's last-handled-configuration annotation, one more PATCH of every new model.
- after each pass, the next one: every `poll_seconds` while the model waits on its pods (downloading,
  loading), since only polling shows their progress; every `resync_seconds` for a settled one (which is also
  what brings back a deleted Secret or PVC), and for one waiting on the cluster (Pending, Scheduling,
  ScaledToZero): what it waits for comes as a watch event on one of its pods, its StatefulSet or its Service,
  which brings the next pass forward. A StatefulSet's own status updates are no such event (the phase comes
  from the pods). For a retry (Failed), backing off from `poll_seconds` to `resync_seconds`, sooner when a
  failed pod's retry is due. The events of one burst (a new model's objects and pods) are gathered for
  `poll_seconds` (at most 2 s) into one pass.
- delete: forget the model, unload it on the pods (best effort, short timeout); kopf then drops its
  finalizer at once (no timer or daemon to wait for) and the garbage collector removes the owned objects.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import gc
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf
from lmkube.operator import clock, crd, resources
from lmkube.operator import reconcile as rc
from lmkube.operator.kube import Kube, load_config
from lmkube.operator.schedule import Key, Schedule
from lmkube.operator.spec import OperatorSettings

log = logging.getLogger("lmkube.operator")

MANAGED = {"app.kubernetes.io/managed-by": "lmkube-operator"}
INSTANCE_LABEL = "app.kubernetes.io/instance"
SETTLED = ("Ready", "Idle")
BUSY = ("Downloading", "Loading")  # waiting on a pod's download or load: only polling shows progress
# Waiting on the cluster (pods to be created, scheduled, started, asked for): watch events bring the next pass.
WAITING = ("Pending", "Scheduling", "ScaledToZero")
KOPF_WORKERS = 16  # kopf's threads for the sync handlers: the delete handler (API reads, unloading) and start-up
PASS_WORKERS = 16  # reconcile passes; a load request blocks one for as long as the load takes
MAX_SETTLE_SECONDS = 2.0  # a burst of watch events is gathered for poll_seconds, but never longer than this


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

    def next_delay(self, before: Mapping[str, Any], after: Mapping[str, Any], previous_delay: float,
                   wall_now: float) -> float:
        """Seconds from a pass that turned status `before` into `after` to the next pass."""
        phase = after.get("phase")
        if phase in BUSY:
            return self.poll_seconds
        if phase in SETTLED or phase in WAITING:
            return self.resync_seconds
        retries = [at for r in after.get("pods") or [] if (at := clock.epoch(r.get("retryAt")) or 0.0) > wall_now]
        if not retries and _failed_by_a_pod(after):
            return self.resync_seconds  # Kubernetes reports the pod's next change: a watch event
        # Waiting on a retry: back off while nothing changes (watch events still come).
        delay = self.poll_seconds if phase != before.get("phase") else previous_delay * 2
        delay = min(max(delay, self.poll_seconds), self.resync_seconds)
        if retries:
            delay = min(delay, max(min(retries) - wall_now, self.poll_seconds))
        return delay


def _failed_by_a_pod(status: Mapping[str, Any]) -> bool:
    """Failed for what a pod's own status says (unschedulable, image pull, crash loop, OOMKilled): the Ready
    condition then gives the PodsReady condition's reason."""
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    pods_ready, ready = conditions.get("PodsReady", {}), conditions.get("Ready", {})
    return (status.get("phase") == "Failed" and pods_ready.get("status") == "False"
            and pods_ready.get("reason") is not None and pods_ready.get("reason") == ready.get("reason"))


class MemoryRelease:
    """Gives freed memory back to the system once a burst of deletions is over (`soon()` not called for
    `quiet_seconds`): first `before()` (closing the API connections the burst opened: each holds buffers and
    objects allocated mid-burst, which keep whole pymalloc arenas from being returned), then a full garbage
    collection, then glibc's `malloc_trim`, without which glibc keeps the free pages that held hundreds of
    models' JSON. One thread for the operator's life: a timer thread per deletion would itself leave thread
    state scattered through the heap."""

    def __init__(self, before: Callable[[], None] = lambda: None, quiet_seconds: float = 5.0) -> None:
        self.before = before
        self.quiet_seconds = quiet_seconds
        self.releases = 0
        self._due: float | None = None
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    def soon(self) -> None:
        with self._changed:
            self._due = time.monotonic() + self.quiet_seconds
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="lmkube-memory-release", daemon=True)
                self._thread.start()
            self._changed.notify()

    def _run(self) -> None:
        while True:
            with self._changed:
                while self._due is None or (left := self._due - time.monotonic()) > 0:
                    self._changed.wait(None if self._due is None else left)
                self._due = None
            try:
                self.before()
            except Exception:
                log.exception("before releasing memory")
            release_memory()
            self.releases += 1


def release_memory() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to ask
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@dataclass
class Runtime:
    """What the handlers share: the API client, options, timing, and the schedule of passes."""

    kube: Kube
    options: rc.Options
    timing: Timing
    schedule: Schedule = field(init=False)
    # kopf.event() needs the context kopf runs handlers in (its settings and its queue of Events to post);
    # passes run on the schedule's threads, so each runs in a copy of one taken in a handler.
    kopf_context: contextvars.Context | None = None
    memory_release: MemoryRelease = field(init=False)

    def __post_init__(self) -> None:
        self.memory_release = MemoryRelease(before=self.kube.close_idle_connections)
        self.schedule = Schedule(self.run_pass, alias=instance_of, workers=PASS_WORKERS,
                                 settle_seconds=min(self.timing.poll_seconds, MAX_SETTLE_SECONDS),
                                 fallback_seconds=self.timing.resync_seconds)

    def run_pass(self, key: Key, previous_delay: float) -> float | None:
        """One reconcile of the LocalModel `key`; the seconds to the next, or None once it is gone."""
        if self.kopf_context is None:
            return self._pass(key, previous_delay)
        return self.kopf_context.copy().run(self._pass, key, previous_delay)

    def _pass(self, key: Key, previous_delay: float) -> float | None:
        namespace, name = key
        body = self.kube.get_local_model(namespace, name)  # the latest, not what an event carried
        if body is None or body["metadata"].get("deletionTimestamp"):
            return None
        before = body.get("status") or {}
        try:
            after = rc.reconcile(self.kube, body, self.options, _emit)
        except Exception:
            log.exception("reconcile of %s/%s failed", namespace, name)
            return min(max(previous_delay * 2, self.timing.retry_seconds), self.timing.resync_seconds)
        delay = self.timing.next_delay(before, after, previous_delay, time.time())
        log.debug("pass of %s/%s: %s, next in %.1f s", namespace, name, after.get("phase"), delay)
        return delay


def instance_of(key: Key) -> tuple[str, str]:
    """(namespace, instance label): what the owned objects and pods of LocalModel `key` carry."""
    return key[0], resources.selector_labels(key[1])[INSTANCE_LABEL]


def key_of(body: Mapping[str, Any]) -> Key:
    return body["metadata"]["namespace"], body["metadata"]["name"]


def _emit(body: Mapping[str, Any], kind: str, reason: str, message: str) -> None:
    if reason == "Pending" and not (body.get("status") or {}).get("phase"):
        return  # where every new model starts: an Event (an API call) per model that says nothing new
    # kopf types the object as its own Body view, but reads only the metadata of any mapping.
    event = dict(body)
    kopf.event(event, type=kind, reason=reason, message=message[:1024])  # type: ignore[arg-type]  # any mapping


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
        settings.persistence.progress_storage = UnmarkedProgress(prefix=crd.GROUP)
        settings.persistence.diffbase_storage = NoDiffBase()
        settings.persistence.finalizer = f"{crd.GROUP}/unload"
        settings.posting.level = logging.WARNING  # kopf's own "handler succeeded" lines are no Events
        settings.watching.server_timeout = 300
        settings.execution.max_workers = KOPF_WORKERS
        runtime.schedule.start()

    @kopf.on.cleanup(registry=registry)
    def stop_passes(**_: Any) -> None:
        runtime.schedule.stop()

    @kopf.on.event(*resource, registry=registry)
    async def reconcile_now(body: kopf.Body, type: str | None, **_: Any) -> None:
        # Async (on kopf's event loop, no worker thread): it only takes the schedule's lock for a moment.
        if runtime.kopf_context is None:
            runtime.kopf_context = contextvars.copy_context()
        if spec_not_reconciled(type, body, runtime.schedule.knows(key_of(body))):
            runtime.schedule.due_in(key_of(body))

    @kopf.on.delete(*resource, registry=registry)
    def unload(body: kopf.Body, **_: Any) -> None:
        runtime.schedule.forget(key_of(body))  # waits for a pass in flight: no load after the unload
        # No pod was ever asked about the model (none ran, as with pods that were never scheduled): nothing to
        # unload, and the finalizer goes without listing the pods first.
        count = rc.unload_all(runtime.kube, body, runtime.options) if ever_examined(body) else 0
        log.info("LocalModel %s/%s deleted: unloaded %d instance(s)", body["metadata"]["namespace"],
                 body["metadata"]["name"], count)
        runtime.memory_release.soon()

    async def owned_changed(body: kopf.Body, type: str | None, **_: Any) -> None:
        if type != "DELETED" and only_status_changed(body):
            return  # a workload's status update (replica counts): the pods' own events say what changed
        instance = (body.get("metadata", {}).get("labels") or {}).get(INSTANCE_LABEL)
        if instance and not runtime.schedule.poke((body["metadata"]["namespace"], instance)):
            # An object of a model that is gone: the garbage collector's tail of a deletion, which allocates too.
            runtime.memory_release.soon()

    for group_version, plural in (("v1", "pods"), ("apps/v1", "statefulsets"), ("v1", "services")):
        kopf.on.event(group_version, plural, labels=MANAGED, registry=registry)(owned_changed)


class NoDiffBase(kopf.DiffBaseStorage):
    """No last-handled configuration: no handler here asks what changed since the last time (a pass reads
    the whole LocalModel), so kopf need not patch it into every new one."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()  # nothing to compare, so no copy of every event's object either

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        pass


class UnmarkedProgress(kopf.AnnotationsProgressStorage):
    """kopf's handler progress in annotations, without its "kopf-managed" marker annotation. The marker tells
    other kopf operators which annotations are kopf's; kopf adds it the first time it stores anything, which is
    now the delete handler's progress (stored and purged in the same patch): a merge patch of its own before
    the finalizer's release, on every deletion."""

    def _store_marker(self, prefix: str, patch: kopf.Patch, body: kopf.Body) -> None:
        pass


def spec_not_reconciled(event_type: str | None, body: Mapping[str, Any], known: bool) -> bool:
    """Whether a LocalModel's watch event calls for a pass: one not known yet, or a spec not reconciled yet.
    Not one being deleted: the delete handler has forgotten it, or is about to."""
    meta = body.get("metadata") or {}
    if event_type == "DELETED" or meta.get("deletionTimestamp"):
        return False
    return not known or (body.get("status") or {}).get("observedGeneration") != meta.get("generation")


def ever_examined(body: Mapping[str, Any]) -> bool:
    """Whether a pass has talked to one of the LocalModel's pods: it keeps a record of each in status.pods,
    written before any load starts."""
    return bool((body.get("status") or {}).get("pods"))


def only_status_changed(body: Mapping[str, Any]) -> bool:
    """A StatefulSet (or an earlier release's Deployment) event whose spec its controller has seen already:
    a status update. Never a pod's: since Kubernetes 1.34 the kubelet writes a pod's observedGeneration too,
    and a pod's status updates are the events a waiting model waits for."""
    if body.get("kind") == "Pod":
        return False
    generation = (body.get("metadata") or {}).get("generation")
    return generation is not None and (body.get("status") or {}).get("observedGeneration") == generation


def build_runtime(settings: OperatorSettings | None = None, timing: Timing | None = None,
                  kube: Kube | None = None) -> Runtime:
    timing = timing or Timing.from_env()
    options = rc.Options(settings=settings or OperatorSettings.from_env(), retry_seconds=timing.retry_seconds)
    kube = kube or Kube(load_config(pool_size=PASS_WORKERS + KOPF_WORKERS))
    return Runtime(kube=kube, options=options, timing=timing)
