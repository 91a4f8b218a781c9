"""The level-triggered reconcile of one LocalModel: owned objects, then the model on every ready pod.

`reconcile()` is safe to call at any time and any number of times: it reads the LocalModel, the
objects it owns and the pods, acts on whatever differs from the spec, and writes the status. What
must survive an operator restart (a pod's download job id, the instance it loaded, the retry back-off)
is kept in `status.pods`, keyed by pod name and by a fingerprint of the request it belongs to, so a
changed spec never reuses a record made for an older one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from lmkube.operator import clock, observe, resources
from lmkube.operator import status as st
from lmkube.operator.inference_pool import CONDITION as POOL_CONDITION
from lmkube.operator.inference_pool import ensure_inference_pool
from lmkube.operator.kube import Kube
from lmkube.operator.observe import PodView
from lmkube.operator.podclient import LoadedInstance, PodAuthError, PodClient, PodError, PodUnreachable
from lmkube.operator.readiness import set_model_loaded_gates
from lmkube.operator.spec import LocalModelSpec, OperatorSettings, parse_spec
from lmkube.operator.statefulset import ensure_statefulset

from lmkube.random_ids import new_token

log = logging.getLogger("lmkube.operator")

# emit(body, type, reason, message): a Kubernetes Event on the LocalModel.
Emit = Callable[[Mapping[str, Any], str, str, str], None]
MAX_BACKOFF = 300.0


class PodConnector(Protocol):
    """Opens a client of one pod's /api/v1: `PodClient` itself, or a fake in the unit tests."""

    def __call__(self, base_url: str, token: str | None, timeout: float = ...) -> PodClient: ...


@dataclass
class Options:
    settings: OperatorSettings = field(default_factory=OperatorSettings)
    retry_seconds: float = 5.0  # first retry after a failure; doubles up to MAX_BACKOFF
    pod_url: Callable[[PodView, OperatorSettings], str] = lambda pod, s: f"http://{pod.ip}:{s.port}"
    connect: PodConnector = PodClient
    clock: Callable[[], float] = time.time  # wall-clock seconds: retry times and condition timestamps


def fingerprint(body: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


# -- owned objects ---------------------------------------------------------------------------------


class SetupError(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def ensure_objects(kube: Kube, body: Mapping[str, Any], spec: LocalModelSpec, settings: OperatorSettings) -> str:
    """Creates or updates the Secret, Service and StatefulSet; returns the API token."""
    name, namespace = body["metadata"]["name"], body["metadata"]["namespace"]
    owner = resources.owner_reference(body)
    secret_name, key = resources.token_ref(name, spec)
    token = kube.secret_value(namespace, secret_name, key)
    if token is None and spec.auth is not None:
        raise SetupError("SecretNotFound", f"spec.auth.secretRef: Secret {secret_name!r} with key {key!r} "
                                           f"not found in namespace {namespace}")
    if token is None:
        token = new_token()
        kube.create(resources.token_secret(name, namespace, token, owner))
    if settings.gateway_token:
        gateway = resources.gateway_secret(name, namespace, settings.gateway_token, owner)
        if kube.get("Secret", namespace, gateway["metadata"]["name"]) is None:
            kube.create(gateway)
    svc = resources.service(name, namespace, settings, owner)
    live_svc = kube.get("Service", namespace, svc["metadata"]["name"])
    if live_svc is None:
        kube.create(svc)
    elif (live_svc["spec"].get("selector") != svc["spec"]["selector"]
          or [(p.get("port"), p.get("targetPort")) for p in live_svc["spec"].get("ports", [])]
          != [(p["port"], p["targetPort"]) for p in svc["spec"]["ports"]]):
        kube.patch("Service", namespace, svc["metadata"]["name"],
                   {"spec": {"selector": svc["spec"]["selector"], "ports": svc["spec"]["ports"]}})
    # The token reaches the pod as an env var read at start: a changed token must roll the pods.
    ensure_statefulset(kube, resources.statefulset(name, namespace, spec, settings, owner,
                                                   secret_version=secret_version(token, settings)), name)
    return token


def secret_version(token: str, settings: OperatorSettings) -> str:
    """What the pods read from Secrets at start; a change rolls them. (Without a gateway credential: the
    same digest as before there was one, so an operator upgrade does not roll every pod.)"""
    secrets = {"t": token} | ({"g": settings.gateway_token} if settings.gateway_token else {})
    return fingerprint(secrets)


def desired_pod_hash(name: str, spec: LocalModelSpec, settings: OperatorSettings, token: str) -> str:
    template = resources.pod_template(name, spec, settings, secret_version=secret_version(token, settings))
    return template["metadata"]["annotations"][resources.POD_HASH_ANNOTATION]


# -- the model on one pod --------------------------------------------------------------------------


@dataclass
class PodWork:
    """The outcome of looking at one pod: its state, its updated record, and a load still to do."""

    state: st.PodState
    record: dict[str, Any]
    load: bool = False
    unload: tuple[str, ...] = ()


def _failure(record: dict[str, Any], pod: str, reason: str, message: str, want: str, now: float,
             retry_seconds: float) -> PodWork:
    attempts = int(record.get("attempts") or 0) + 1 if record.get("failedFor") == want else 1
    delay = min(retry_seconds * 2 ** (attempts - 1), MAX_BACKOFF)
    record.update(failedFor=want, attempts=attempts, retryAt=clock.iso(now + delay), phase=st.FAILED, message=message,
                  reason=reason)
    return PodWork(st.PodState(pod, st.FAILED, reason, message), record)


def _variant_of(key: str | None) -> str | None:
    return key.rpartition("@")[2] if key and "@" in key else None


def examine_pod(client: PodClient, pod: PodView, spec: LocalModelSpec, record: dict[str, Any], now: float,
                retry_seconds: float, downloader: str | None = None) -> PodWork:
    """Looks at one ready pod and advances it by one step (start/track the download); never loads.

    `downloader`: another pod already downloading into the same shared claim; this one waits for it
    instead of writing the same files at the same time.
    """
    record = dict(record)
    if record.get("serverId") != pod.server_id:
        # A new server process: nothing is loaded any more; its download job table survives on the volume.
        # If the kernel killed the last one for its memory, remember which load did it: the same load would
        # only be killed again.
        # A StatefulSet's new pod has the old one's name (and volume), not its verdict: a pod re-created with a
        # new memory limit must try the load again.
        same_pod = str(record.get("serverId", "")).split("/")[0] == pod.uid
        killed_by = record.get("loadAttempt") if pod.oom_killed and same_pod else None
        kept = ("jobId", "jobFor", "downloaded", "estimateBytes", *(("oomKilledBy",) if same_pod else ()))
        record = {"name": pod.name, "serverId": pod.server_id, **{k: record[k] for k in kept if k in record}}
        if killed_by:
            record["oomKilledBy"] = killed_by
    want_dl = fingerprint(resources.download_request(spec))
    want_load = fingerprint(resources.load_request(spec))
    if record.get("oomKilledBy") == want_load:
        message = oom_message(pod, spec, record.get("estimateBytes"))
        record.update(phase=st.FAILED, reason="OOMKilled", message=message)
        return PodWork(st.PodState(pod.name, st.FAILED, "OOMKilled", message), record)
    if record.get("failedFor") in (want_dl, want_load) and now < (clock.epoch(record.get("retryAt")) or 0.0):
        return PodWork(st.PodState(pod.name, st.FAILED, record.get("reason") or "Failed",
                                   record.get("message") or "failed"), record)
    try:
        return _examine(client, pod, spec, record, want_dl, want_load, now, retry_seconds, downloader)
    except PodAuthError as exc:
        return _failure(record, pod.name, exc.reason, exc.message, want_load, now, retry_seconds)
    except PodUnreachable as exc:
        return _failure(record, pod.name, exc.reason, exc.message, want_load, now, retry_seconds)
    except PodError as exc:
        return _failure(record, pod.name, exc.reason, f"pod {pod.name}: {exc.message}",
                        want_dl if exc.reason == "DownloadFailed" else want_load, now, retry_seconds)


def _examine(client: PodClient, pod: PodView, spec: LocalModelSpec, record: dict[str, Any], want_dl: str,
             want_load: str, now: float, retry_seconds: float, downloader: str | None) -> PodWork:
    listings = client.models()
    instances: list[LoadedInstance] = [i for m in listings for i in m.instances]
    listing = next((m for m in listings if m.key == spec.model_key), None)
    variant = spec.variant or _variant_of(listing.selected_variant if listing else None)
    mine = [i for i in instances if i.instance_id == record.get("instanceId")]
    if record.get("loaded") == want_load and mine:
        _clear_failure(record)
        record.update(phase=st.READY, message="")
        return PodWork(st.PodState(pod.name, st.READY, "Loaded", "", context_length=mine[0].context_length,
                                   variant=variant), record)
    if record.get("loaded") == want_load and spec.ttl is not None and listing is not None:
        record.update(phase=st.IDLE, message="unloaded after the idle ttl")
        return PodWork(st.PodState(pod.name, st.IDLE, "IdleUnloaded", "unloaded after the idle ttl",
                                   variant=variant), record)
    if record.get("downloaded") != want_dl and downloader is not None:
        return _dl_work(record, st.DOWNLOADING, "Downloading",
                        f"pod {pod.name}: waiting for pod {downloader} to download the model to the shared volume")
    if record.get("downloaded") != want_dl:
        progress = _advance_download(client, spec, record, want_dl)
        if isinstance(progress, PodWork):
            progress.state = replace(progress.state, message=f"pod {pod.name}: {progress.state.message}")
            if progress.state.stage == st.FAILED:
                return _failure(record, pod.name, progress.state.reason, progress.state.message, want_dl, now,
                                retry_seconds)
            return progress
        if listing is None and not spec.variant:
            # The files arrived during this pass, after the listing above was read: it did not have them yet.
            listing = next((m for m in client.models() if m.key == spec.model_key), None)
            variant = _variant_of(listing.selected_variant if listing else None)
    record.update(phase=st.LOADING, message="")
    return PodWork(st.PodState(pod.name, st.LOADING, "Loading", f"loading {resources.load_model_id(spec)} "
                                                                  f"on pod {pod.name}", variant=variant),
                   record, load=True, unload=tuple(i.instance_id for i in instances))


def _advance_download(client: PodClient, spec: LocalModelSpec, record: dict[str, Any],
                      want_dl: str) -> PodWork | None:
    """Starts or tracks the download. None once the files are there (record updated)."""
    job = record.get("jobId") if record.get("jobFor") == want_dl else None
    status = client.download_status(job) if job else None
    if status is None or status.status == "paused":
        # No job yet, a job the server forgot, or one paused by a server restart: POST resumes the same
        # files under the same job (the server shares a job between requests for the same files).
        started = client.download(resources.download_request(spec))
        if started.status == "already_downloaded" or started.job_id is None:
            record.update(downloaded=want_dl)
            return None
        record.update(jobId=started.job_id, jobFor=want_dl)
        if started.status == "failed":
            return _dl_work(record, st.FAILED, "DownloadFailed", started.error or "download failed")
        status = client.download_status(started.job_id)
        if status is None:
            return _dl_work(record, st.DOWNLOADING, "Downloading", "download started",
                            st.Progress(0, started.total_bytes))
    if status.status == "completed":
        record.update(downloaded=want_dl)
        return None
    if status.status == "failed":
        # Forget the job: the retry after the back-off POSTs again, which starts a fresh job.
        record.pop("jobId", None)
        record.pop("jobFor", None)
        return _dl_work(record, st.FAILED, "DownloadFailed", f"download failed: {status.error or 'unknown error'}")
    progress = st.Progress(status.downloaded_bytes, status.total_bytes, status.bytes_per_second)
    return _dl_work(record, st.DOWNLOADING, "Downloading",
                    f"downloading {spec.model} ({progress.percent:g}% of {status.total_bytes} bytes)", progress)


def _dl_work(record: dict[str, Any], stage: str, reason: str, message: str,
             progress: st.Progress | None = None) -> PodWork:
    record.update(phase=stage, message=message)
    return PodWork(st.PodState(record["name"], stage, reason, message, progress=progress), record)


def oom_message(pod: PodView, spec: LocalModelSpec, estimate_bytes: int | None) -> str:
    return (f"pod {pod.name}: the kernel killed the server (OOMKilled) while it loaded {resources.load_model_id(spec)}"
            f": its memory limit is {pod.memory_limit or 'not set (the node ran out)'}, and "
            f"{_needs(spec, estimate_bytes)}; raise spec.resources.limits.memory or lower spec.contextLength")


def insufficient_memory_message(pod: PodView, spec: LocalModelSpec, estimate_bytes: int | None,
                                server_message: str) -> str:
    """The server's 409 for a load its memory (its cgroup limit, or the node's) cannot hold, in spec terms."""
    # The server's own advice (a smaller context_length, evict, force) is for API clients, not for the spec.
    refusal = server_message.partition(" Load it with")[0].rstrip(".")
    return (f"pod {pod.name}: not enough memory to load {resources.load_model_id(spec)}: its memory limit is "
            f"{pod.memory_limit or 'not set (the node has too little free)'}, and {_needs(spec, estimate_bytes)}; "
            f"raise spec.resources.limits.memory or lower spec.contextLength (the server: {refusal})")


def _needs(spec: LocalModelSpec, estimate_bytes: int | None) -> str:
    needs = (f"the model needs an estimated {estimate_bytes / (1 << 20):.0f} MiB on top of the server itself"
             if estimate_bytes else "the server could not estimate what the model needs")
    return needs + (f" at context length {spec.context_length}" if spec.context_length else "")


def _clear_failure(record: dict[str, Any]) -> None:
    for key in ("failedFor", "attempts", "retryAt", "reason"):
        record.pop(key, None)


def load_on_pod(client: PodClient, pod: PodView, spec: LocalModelSpec, work: PodWork, now: float,
                retry_seconds: float, on_progress: Callable[[float], None] | None = None) -> PodWork:
    """Unloads what else is loaded on the pod, then loads the model as the spec asks (`on_progress` hears the
    server's load progress, 0..1, as it goes)."""
    record = work.record
    want_load = fingerprint(resources.load_request(spec))
    try:
        for instance_id in work.unload:
            client.unload(instance_id)
        # Noted before the load: if the kernel kills the server for it, the next pass knows which load did.
        with contextlib.suppress(PodError):
            record["estimateBytes"] = client.estimate(resources.load_request(spec))
        record["loadAttempt"] = want_load
        instance_id = client.load(resources.load_request(spec), on_progress=on_progress)
        loaded = [i for i in client.loaded() if i.instance_id == instance_id]
    except PodError as exc:
        message = exc.message if isinstance(exc, PodAuthError | PodUnreachable) else f"pod {pod.name}: {exc.message}"
        reason = exc.reason if exc.reason != "ServerError" else "LoadFailed"
        if exc.status == 404 and reason == "LoadFailed":
            record.pop("downloaded", None)  # the files are gone from the volume: download them again next time
        if exc.status == 409 and reason == "LoadFailed":  # the only 409 of a load without an identifier
            reason = "InsufficientMemory"
            message = insufficient_memory_message(pod, spec, record.get("estimateBytes"), exc.message)
        return _failure(record, pod.name, reason, message, want_load, now, retry_seconds)
    _clear_failure(record)
    record.update(loaded=want_load, instanceId=instance_id, phase=st.READY, message="")
    return PodWork(st.PodState(pod.name, st.READY, "Loaded", "", variant=work.state.variant,
                               context_length=loaded[0].context_length if loaded else spec.context_length), record)


# -- status ----------------------------------------------------------------------------------------


def build_status(body: Mapping[str, Any], spec: LocalModelSpec | None, summary: st.Summary,
                 states: list[st.PodState], records: list[dict[str, Any]], settings: OperatorSettings,
                 now: str) -> dict[str, Any]:
    meta = body["metadata"]
    previous = body.get("status") or {}
    generation = meta.get("generation")
    serving = [s for s in states if s.stage in (st.READY, st.IDLE)]
    status: dict[str, Any] = {
        "phase": summary.phase,
        "message": summary.message,
        "readyReplicas": summary.ready_replicas,
        # The scale subresource's view (kubectl scale, an HPA, KEDA): the pods running the current spec.
        "replicas": summary.pods,
        "selector": resources.selector_string(meta["name"]),
        "observedGeneration": generation,
        "conditions": st.conditions(previous.get("conditions") or [], summary, generation, now),
        "pods": records,
        "endpoint": resources.endpoint(meta["name"], meta["namespace"], settings) if serving else None,
        "modelKey": spec.model_key if spec else None,
        "variant": next((s.variant for s in states if s.variant), spec.variant if spec else None),
        "contextLength": next((s.context_length for s in serving if s.context_length), None),
    }
    if summary.progress is not None:
        status["download"] = summary.progress.as_status()
    elif states and all(s.stage in (st.LOADING, st.READY, st.IDLE) for s in states):
        done = (previous.get("download") or {})
        total = int(done.get("totalBytes") or 0)
        status["download"] = st.Progress(total, total).as_status() if total else {"percent": 100.0}
    else:
        status["download"] = None
    status["load"] = st.load_status(summary.phase)
    return status


def _publish(kube: Kube, body: Mapping[str, Any], status: dict[str, Any], emit: Emit) -> None:
    meta = body["metadata"]
    previous = body.get("status") or {}
    # A model that waits keeps the same status pass after pass: writing it again would only make the
    # API server, and every watcher of LocalModels (this operator included), do work for nothing.
    if any(previous.get(key) != value for key, value in status.items()):
        kube.patch_status(meta["namespace"], meta["name"], status)
    ready: Mapping[str, Any] = next((c for c in status["conditions"] if c["type"] == "Ready"), {})
    before: Mapping[str, Any] = next((c for c in previous.get("conditions") or [] if c.get("type") == "Ready"), {})
    if previous.get("phase") != status["phase"] or (status["phase"] == st.FAILED
                                                    and before.get("reason") != ready.get("reason")):
        kind = "Warning" if status["phase"] == st.FAILED else "Normal"
        emit(body, kind, status["phase"] if kind == "Normal" else ready.get("reason", "Failed"),
             status.get("message") or status["phase"])


# -- the reconcile ---------------------------------------------------------------------------------


def reconcile(kube: Kube, body: Mapping[str, Any], options: Options, emit: Emit) -> dict[str, Any]:
    """Brings one LocalModel one step closer to its spec and writes its status; returns the status."""
    meta = body["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    settings = options.settings
    moment = options.clock()
    now = clock.iso(moment)
    previous = body.get("status") or {}
    try:
        spec = parse_spec(body.get("spec") or {})
        token = ensure_objects(kube, body, spec, settings)
    except (ValueError, SetupError) as exc:
        reason = exc.reason if isinstance(exc, SetupError) else "InvalidSpec"
        message = exc.message if isinstance(exc, SetupError) else str(exc)
        status = {"phase": st.FAILED, "message": message, "observedGeneration": meta.get("generation"),
                  "readyReplicas": 0, "endpoint": None,
                  "conditions": st.failed_conditions(previous.get("conditions") or [], reason, message,
                                                     meta.get("generation"), now)}
        _publish(kube, body, status, emit)
        return status
    pool = ensure_inference_pool(kube, body, settings)

    want_hash = desired_pod_hash(name, spec, settings, token)
    views = observe.views(kube.list_pods(namespace, resources.selector_labels(name)), resources.POD_HASH_ANNOTATION,
                          resources.MODEL_LOADED_CONDITION, moment)
    pods = [p for p in views if not p.terminating and p.pod_hash == want_hash]
    old_records = {r.get("name"): r for r in previous.get("pods") or []}
    # During a rollout the previous template's pods serve on until the StatefulSet replaces them: their records
    # stay in status.pods (the gateway routes to the pods listed serving, not to a new one not yet loaded).
    outgoing = [old_records[p.name] for p in views
                if p.pod_hash != want_hash and p.ready and p.name in old_records]
    works: dict[str, PodWork] = {}
    clients: dict[str, PodClient] = {}
    downloader: str | None = None  # with a shared claim, one pod downloads and the others wait for it
    pending: list[PodView] = []
    gates = {p.name: p.model_loaded for p in pods}  # each pod's readiness gate, as written during this pass
    try:
        for pod in pods:
            if not pod.ready:
                continue
            clients[pod.name] = client = options.connect(options.pod_url(pod, settings), token)
            work = examine_pod(client, pod, spec, old_records.get(pod.name, {"name": pod.name}), moment,
                               options.retry_seconds, downloader)
            if spec.storage.existing_claim and work.state.stage == st.DOWNLOADING and downloader is None:
                downloader = pod.name
            works[pod.name] = work
        pending = [p for p in pods if p.name in works and works[p.name].load]
        set_model_loaded_gates(kube, namespace, pods, {n: w.state for n, w in works.items()}, old_records, now, gates)
        if pending:
            # Show Loading while the (blocking) load requests run.
            _publish(kube, body, _status(body, spec, pods, works, settings, now, old_records, outgoing), emit)
            body = {**body, "status": {**previous, "phase": st.LOADING}}
            for pod in pending:
                works[pod.name] = load_on_pod(clients[pod.name], pod, spec, works[pod.name], options.clock(),
                                              options.retry_seconds, st.LoadReporter(kube, namespace, name))
    finally:
        for client in clients.values():
            client.close()
    if pending:
        set_model_loaded_gates(kube, namespace, pods, {n: w.state for n, w in works.items()}, old_records,
                               clock.iso(options.clock()), gates)
    status = _status(body, spec, pods, works, settings, now, old_records, outgoing)
    if pool is not None:
        status["conditions"] = st.set_condition(status["conditions"], POOL_CONDITION, pool.status, pool.reason,
                                                pool.message, meta.get("generation"), now)
        before: Mapping[str, Any] = next(
            (c for c in previous.get("conditions") or [] if c.get("type") == POOL_CONDITION), {})
        if pool.status == "False" and before.get("reason") != pool.reason:
            emit(body, "Warning", f"InferencePool{pool.reason}", pool.message)
    _publish(kube, body, status, emit)
    return status


def _status(body: Mapping[str, Any], spec: LocalModelSpec, pods: list[PodView], works: dict[str, PodWork],
            settings: OperatorSettings, now: str, kept: Mapping[str, dict[str, Any]] | None = None,
            outgoing: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    states = [works[p.name].state for p in pods if p.name in works]
    # A pod that is not ready this pass (its server restarting) keeps its record: what it loaded and why
    # its last server died must outlive the restart.
    records = [works[p.name].record if p.name in works else (kept or {})[p.name] for p in pods
               if p.name in works or p.name in (kept or {})] + list(outgoing or ())
    summary = st.summarize(spec.replicas, pods, states)
    return build_status(body, spec, summary, states, records, settings, now)


def unload_all(kube: Kube, body: Mapping[str, Any], options: Options, timeout: float = 3.0) -> int:
    """Best effort on deletion: unloads every instance on every reachable pod. Returns how many."""
    meta = body["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    try:
        pods = [p for p in observe.views(kube.list_pods(namespace, resources.selector_labels(name)),
                                         resources.POD_HASH_ANNOTATION) if p.ip]
        if not pods:  # nothing can have loaded it (e.g. pods never scheduled): no token needed
            return 0
        spec = parse_spec(body.get("spec") or {})
        secret_name, key = resources.token_ref(name, spec)
        token = kube.secret_value(namespace, secret_name, key)
    except Exception as exc:  # deletion must go on whatever happens here
        log.warning("not unloading %s/%s: %s", namespace, name, exc)
        return 0
    count = 0
    for pod in pods:
        try:
            with options.connect(options.pod_url(pod, options.settings), token, timeout=timeout) as client:
                for instance in client.loaded():
                    client.unload(instance.instance_id)
                    count += 1
        except PodError as exc:
            log.info("unload on pod %s skipped: %s", pod.name, exc.message)
    return count
