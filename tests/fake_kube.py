"""In-memory fakes of the operator's two interfaces, for unit tests of `reconcile()` that run in milliseconds.

- `FakeKube`: operator/kube.py's `Kube` over dicts: owned objects by kind, the pods a test places, the
  LocalModels and their status (written with JSON merge-patch semantics, as the API server does).
- `FakePod` / `FakePodClient`: what one pod's `/api/v1` answers, through the methods of operator/podclient.py's
  `PodClient` (models, download, download_status, load, unload), with the failures the real client raises.
- `FakeCluster`: both, plus a clock, the Events a pass emits and the `Options` wired to them.

They fake lmkube's own interfaces only; the cluster tests (test_operator_e2e.py) run the real components.
"""

from __future__ import annotations

import base64
import copy
import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
from kubernetes.client.exceptions import ApiException
from lmkube.operator import reconcile as rc
from lmkube.operator import resources
from lmkube.operator.kube import Kube
from lmkube.operator.podclient import (
    DEFAULT_TIMEOUT,
    DownloadStarted,
    DownloadStatus,
    LoadedInstance,
    ModelListing,
    PodAuthError,
    PodClient,
    PodError,
    PodUnreachable,
)
from lmkube.operator.spec import model_key

NAMESPACE = "models"
DEFAULT_CONTEXT = 4096  # what the fake server loads with when the request names no context_length


def merge_patch(target: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """RFC 7386: objects merge, null deletes a key, anything else (lists included) replaces."""
    result = copy.deepcopy(dict(target))
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(result.get(key), Mapping):
            result[key] = merge_patch(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


class FakeKube(Kube):
    """The API calls of `Kube`, answered from dicts (no API client: `Kube.__init__` is not called)."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}  # (kind, namespace, name)
        self.local_models: dict[tuple[str, str], dict[str, Any]] = {}
        self.status_writes: list[dict[str, Any]] = []
        self.writes: list[tuple[str, str, str]] = []  # (verb, kind, name) of every create and patch
        self.pod_conditions: list[tuple[str, str, str]] = []  # (pod, status, reason) of every pod condition set

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        found = self.objects.get((kind, namespace, name))
        return copy.deepcopy(found) if found is not None else None

    def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        key = (obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"])
        if key in self.objects:
            raise ApiException(status=409, reason="AlreadyExists")
        stored = copy.deepcopy(dict(obj))
        stored["metadata"].setdefault("uid", f"uid-{key[0].lower()}-{key[2]}")  # as the API server assigns one
        if "stringData" in stored:  # the API server stores a Secret's stringData base64-encoded under data
            stored["data"] = {k: base64.b64encode(v.encode()).decode() for k, v in stored.pop("stringData").items()}
        self.objects[key] = stored
        self.writes.append(("create", *key[::2]))
        return copy.deepcopy(self.objects[key])

    def patch(self, kind: str, namespace: str, name: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        key = (kind, namespace, name)
        if key not in self.objects:
            raise ApiException(status=404, reason="NotFound")
        self.objects[key] = merge_patch(self.objects[key], patch)
        self.writes.append(("patch", kind, name))
        return copy.deepcopy(self.objects[key])

    def replace_fields(self, kind: str, namespace: str, name: str, fields: Mapping[str, Any]) -> dict[str, Any]:
        key = (kind, namespace, name)
        if key not in self.objects:
            raise ApiException(status=404, reason="NotFound")
        for path, value in fields.items():
            *parents, last = path.strip("/").split("/")
            target = self.objects[key]
            for part in parents:
                target = target[part]
            if last not in target:  # RFC 6902: the target of a replace must exist
                raise ApiException(status=422, reason="Invalid")
            target[last] = copy.deepcopy(value)
        self.writes.append(("patch", kind, name))
        return copy.deepcopy(self.objects[key])

    def delete(self, kind: str, namespace: str, name: str, foreground: bool = False) -> None:
        del self.objects[(kind, namespace, name)]

    def list_pods(self, namespace: str, labels: Mapping[str, str]) -> list[dict[str, Any]]:
        return [copy.deepcopy(pod) for (kind, ns, _), pod in sorted(self.objects.items())
                if kind == "Pod" and ns == namespace
                and all(pod["metadata"].get("labels", {}).get(k) == v for k, v in labels.items())]

    def set_pod_condition(self, namespace: str, pod: str, uid: str, condition: Mapping[str, Any]) -> None:
        """Merges the condition by type (a strategic merge patch's way), and the Ready a kubelet derives."""
        found = self.objects.get(("Pod", namespace, pod))
        if found is None or found["metadata"].get("uid", uid) != uid:
            return
        conditions = [c for c in found["status"].get("conditions", []) if c["type"] != condition["type"]]
        found["status"]["conditions"] = [*conditions, dict(condition)]
        kubelet_ready(found)
        self.writes.append(("patch", "Pod/status", pod))
        self.pod_conditions.append((pod, condition["status"], condition.get("reason", "")))

    def patch_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        body = self.local_models[(namespace, name)]
        self.local_models[(namespace, name)] = merge_patch(body, {"status": dict(status)})
        self.status_writes.append(copy.deepcopy(dict(status)))

    def get_local_model(self, namespace: str, name: str) -> dict[str, Any] | None:
        found = self.local_models.get((namespace, name))
        return copy.deepcopy(found) if found is not None else None


def kubelet_ready(pod: dict[str, Any]) -> None:
    """Sets the pod's Ready condition as the kubelet does: its containers ready and every readiness gate True."""
    conditions = {c["type"]: c for c in pod["status"].get("conditions", [])}
    gates = [g["conditionType"] for g in pod.get("spec", {}).get("readinessGates", [])]
    ready = conditions.get("ContainersReady", {}).get("status") == "True" and all(
        conditions.get(gate, {}).get("status") == "True" for gate in gates)
    pod["status"]["conditions"] = [*(c for t, c in conditions.items() if t != "Ready"),
                                   {"type": "Ready", "status": "True" if ready else "False"}]


def pod_ready(pod: Mapping[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", []))


@dataclass
class Job:
    job_id: str
    request: dict[str, Any]
    status: str = "downloading"
    downloaded_bytes: int = 0
    total_bytes: int = 1000
    error: str | None = None


@dataclass
class Volume:
    """The models volume: the files and the download job table (both outlive a server restart; a shared
    claim is one Volume for several pods)."""

    files: dict[str, str] = field(default_factory=dict)  # model key -> variant
    jobs: dict[str, Job] = field(default_factory=dict)
    total_bytes: int = 1000  # the size of a download started on it
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))

    def job(self) -> Job:
        """The latest download job."""
        return list(self.jobs.values())[-1]

    def progress(self, downloaded_bytes: int) -> None:
        self.job().downloaded_bytes = downloaded_bytes

    def complete(self) -> None:
        job = self.job()
        job.status, job.downloaded_bytes = "completed", job.total_bytes
        self.files[model_key(job.request["model"])] = job.request.get("quantization") or "q4_k_m"

    def fail(self, error: str) -> None:
        self.job().status, self.job().error = "failed", error


@dataclass
class FakePod:
    """One pod's model server: what it has loaded, its volume, and the failures a test asks for."""

    name: str
    token: str | None
    volume: Volume = field(default_factory=Volume)
    reachable: bool = True
    download_error: PodError | None = None  # raised by POST /api/v1/models/download
    load_error: PodError | None = None  # raised by POST /api/v1/models/load
    estimate_bytes: int | None = 64 << 20  # what a load with `estimate_only` answers
    instances: dict[str, LoadedInstance] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)  # "GET models", "POST load", ... in order

    def answer(self, request: str, token: str | None) -> None:
        """Fails the way PodClient does for an unreachable pod or a refused token."""
        if not self.reachable:
            raise PodUnreachable("PodUnreachable", f"cannot reach the server at pod {self.name}: connection refused")
        if self.token is not None and token != self.token:
            raise PodAuthError("Unauthorized", f"the server at pod {self.name} refused the operator's token "
                                               "(401: Invalid API token)", 401)
        self.requests.append(request)

    def restart(self) -> None:
        """The server process starts again: nothing is loaded; the volume (files, job table) stays."""
        self.instances.clear()


LOAD_PROGRESS = (0.02, 0.3, 0.32, 0.6, 1.0)  # what a pod's streamed load reports (as llama.cpp calls back)


class FakePodClient(PodClient):
    """`PodClient`'s methods answered by a `FakePod` (no HTTP: `PodClient.__init__` is not called)."""

    def __init__(self, pod: FakePod | None, base_url: str, token: str | None) -> None:
        self.pod = pod
        self.base_url = base_url
        self.token = token

    def _server(self, request: str) -> FakePod:
        if self.pod is None:
            raise PodUnreachable("PodUnreachable", f"cannot reach the server at {self.base_url}: no such pod")
        self.pod.answer(request, self.token)
        return self.pod

    def close(self) -> None:
        pass

    def models(self) -> list[ModelListing]:
        pod = self._server("GET models")
        return [ModelListing(key=key, variants=(f"{key}@{variant}",), selected_variant=f"{key}@{variant}",
                             instances=tuple(i for i in pod.instances.values() if i.model_key == key))
                for key, variant in sorted(pod.volume.files.items())]

    def download(self, body: Mapping[str, Any]) -> DownloadStarted:
        pod = self._server("POST download")
        if pod.download_error is not None:
            raise pod.download_error
        volume = pod.volume
        if model_key(body["model"]) in volume.files:
            return DownloadStarted(job_id=None, status="already_downloaded")
        # The server gives a repeated request for the same files the job already running for them.
        job = next((j for j in volume.jobs.values() if j.request == dict(body) and j.status != "failed"), None)
        if job is None or job.status == "completed":
            job = Job(f"job-{next(volume._ids)}", dict(body), total_bytes=volume.total_bytes)
            volume.jobs[job.job_id] = job
        job.status = "downloading" if job.status == "paused" else job.status
        return DownloadStarted(job_id=job.job_id, status=job.status, total_bytes=job.total_bytes, error=job.error)

    def download_status(self, job_id: str) -> DownloadStatus | None:
        pod = self._server(f"GET download {job_id}")
        job = pod.volume.jobs.get(job_id)
        if job is None:
            return None
        return DownloadStatus(job_id=job_id, status=job.status, downloaded_bytes=job.downloaded_bytes,
                              total_bytes=job.total_bytes, bytes_per_second=100.0, error=job.error)

    def load(self, body: Mapping[str, Any], on_progress: Callable[[float], None] | None = None) -> str:
        pod = self._server("POST load")
        if pod.load_error is not None:
            raise pod.load_error
        for fraction in LOAD_PROGRESS if on_progress is not None else ():  # the streamed load's events
            on_progress(fraction)
        key = body["model"].partition("@")[0]
        if key not in pod.volume.files:
            raise PodError("LoadFailed", f"Model not found: {body['model']}", 404)
        instance_id = key if key not in pod.instances else f"{key}:{len(pod.instances) + 1}"
        config = {k: v for k, v in body.items() if k != "model"}
        pod.instances[instance_id] = LoadedInstance(key, instance_id, body.get("context_length") or DEFAULT_CONTEXT,
                                                    config)
        return instance_id

    def estimate(self, body: Mapping[str, Any]) -> int | None:
        pod = self._server("POST load estimate_only")
        if body["model"].partition("@")[0] not in pod.volume.files:
            raise PodError("LoadFailed", f"Model not found: {body['model']}", 404)
        return pod.estimate_bytes

    def unload(self, instance_id: str) -> None:
        self._server(f"POST unload {instance_id}").instances.pop(instance_id, None)


class FakeCluster:
    """A namespace with LocalModels, their pods and the pods' servers, and `Options` that reach them."""

    def __init__(self, retry_seconds: float = 5.0) -> None:
        self.kube = FakeKube()
        self.servers: dict[str, FakePod] = {}  # by pod IP
        self.events: list[tuple[str, str, str]] = []  # (type, reason, message)
        self.now = 1_800_000_000.0
        self._ips = itertools.count(10)
        self.options = rc.Options(retry_seconds=retry_seconds, connect=self.connect, clock=lambda: self.now)

    # -- what the operator sees ----------------------------------------------------------------------

    def connect(self, base_url: str, token: str | None, timeout: float = DEFAULT_TIMEOUT) -> PodClient:
        return FakePodClient(self.servers.get(httpx.URL(base_url).host), base_url, token)

    def emit(self, _body: Mapping[str, Any], kind: str, reason: str, message: str) -> None:
        self.events.append((kind, reason, message))

    def reconcile(self, name: str) -> dict[str, Any]:
        """One pass, on the LocalModel as stored now (the way handlers.Runtime runs one)."""
        body = self.kube.get_local_model(NAMESPACE, name)
        assert body is not None
        return rc.reconcile(self.kube, body, self.options, self.emit)

    def unload_all(self, name: str) -> int:
        body = self.kube.get_local_model(NAMESPACE, name)
        assert body is not None
        return rc.unload_all(self.kube, body, self.options)

    # -- what a user and the cluster do --------------------------------------------------------------

    def apply(self, name: str, spec: Mapping[str, Any]) -> None:
        """Creates the LocalModel, or replaces its spec (the generation moves on, as the API server does)."""
        key = (NAMESPACE, name)
        body = self.kube.local_models.get(key)
        if body is None:
            self.kube.local_models[key] = {
                "apiVersion": "lmkube.dev/v1alpha1", "kind": "LocalModel",
                "metadata": {"name": name, "namespace": NAMESPACE, "uid": f"uid-{name}", "generation": 1},
                "spec": dict(spec)}
        else:
            body["spec"] = dict(spec)
            body["metadata"]["generation"] += 1

    def status(self, name: str) -> dict[str, Any]:
        body = self.kube.get_local_model(NAMESPACE, name)
        assert body is not None
        return body.get("status") or {}

    def token(self, name: str) -> str:
        value = self.kube.secret_value(NAMESPACE, resources.names(name).secret, resources.TOKEN_KEY)
        assert value is not None
        return value

    def statefulset(self, name: str) -> dict[str, Any]:
        found = self.kube.get("StatefulSet", NAMESPACE, resources.names(name).statefulset)
        assert found is not None
        return found

    def start_pod(self, name: str, pod_name: str, *, ready: bool = True, volume: Volume | None = None,
                  token: str | None = None) -> FakePod:
        """A pod of the LocalModel's current StatefulSet template, with a server at its IP when it is ready."""
        template = self.statefulset(name)["spec"]["template"]
        ip = f"10.0.0.{next(self._ips)}"
        self.kube.objects[("Pod", NAMESPACE, pod_name)] = {
            "metadata": {"name": pod_name, "namespace": NAMESPACE, "uid": f"uid-{pod_name}",
                         "labels": dict(template["metadata"]["labels"]),
                         "annotations": dict(template["metadata"]["annotations"])},
            "spec": {"nodeName": "node-1", "readinessGates": template["spec"].get("readinessGates", [])},
            "status": {"phase": "Running", "podIP": ip,
                       "conditions": [{"type": "PodScheduled", "status": "True"},
                                      {"type": "ContainersReady", "status": "True" if ready else "False"}],
                       "containerStatuses": [{"name": "lmkube", "image": "lmkube/lmkube:test", "restartCount": 0,
                                              "containerID": f"containerd://{pod_name}",
                                              "state": {"running": {"startedAt": "2027-01-15T08:00:00Z"}}}]}}
        kubelet_ready(self.kube.objects[("Pod", NAMESPACE, pod_name)])
        server = FakePod(pod_name, token if token is not None else self.token(name), volume or Volume())
        self.servers[ip] = server
        return server

    def pod(self, pod_name: str) -> dict[str, Any]:
        return self.kube.objects[("Pod", NAMESPACE, pod_name)]

    def set_ready(self, pod_name: str, ready: bool) -> None:
        """The server container's readiness (its /health probe)."""
        for condition in self.pod(pod_name)["status"]["conditions"]:
            if condition["type"] == "ContainersReady":
                condition["status"] = "True" if ready else "False"
        kubelet_ready(self.pod(pod_name))

    def restart_server(self, pod_name: str) -> None:
        """The container restarts: a new server process (a new restartCount), nothing loaded."""
        container = self.pod(pod_name)["status"]["containerStatuses"][0]
        container["restartCount"] += 1
        container["state"] = {"running": {"startedAt": "2027-01-15T09:00:00Z"}}
        ip = self.pod(pod_name)["status"]["podIP"]
        self.servers[ip].restart()

    def unschedulable_pod(self, name: str, pod_name: str, message: str) -> None:
        self.start_pod(name, pod_name, ready=False)
        pod = self.pod(pod_name)
        pod["spec"] = {}
        pod["status"] = {"phase": "Pending", "conditions": [
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}]}

    def waiting_pod(self, name: str, pod_name: str, reason: str, message: str, *, restarts: int = 0,
                    last_exit: int | None = None) -> None:
        """A scheduled pod whose container waits for `reason` (ErrImagePull, CrashLoopBackOff, ...)."""
        self.start_pod(name, pod_name, ready=False)
        container = self.pod(pod_name)["status"]["containerStatuses"][0]
        container.update(restartCount=restarts, state={"waiting": {"reason": reason, "message": message}})
        if last_exit is not None:
            container["lastState"] = {"terminated": {"exitCode": last_exit}}
