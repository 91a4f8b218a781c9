"""A scheduler + kubelet stand-in for tests against the real control plane of tests/kube_cluster.py.

The real kube-controller-manager turns Deployments into ReplicaSets and Pods and garbage-collects owned
objects; this emulator does what the scheduler and the kubelets would: it binds Pods to emulated Nodes and
runs each bound Pod's containers as real processes on this host (the image's `lmkube` is the repo's
`.venv/bin/lmkube`), reporting `pods/status` like a kubelet.

    with KubeletEmulator(cluster, namespace, root=tmp_path, extra_env={...}) as emu:   # or the `kubelet` fixture
        emu.add_node("cpu-node", capacity={"cpu": "8", "memory": "32Gi", "pods": "110"}, labels={...})
        emu.add_node("gpu-node", capacity={..., "nvidia.com/gpu": "1"})   # later too: pending pods get scheduled
        emu.unpullable_images.add("registry.invalid/nope:1")             # -> ErrImagePull, ImagePullBackOff
        emu.pod_ip(pod_name); emu.server_log(pod_name); emu.running_pods(); emu.volume_dir(claim_name)
        emu.service_addresses(service_name)   # Ready pod IPs the Service selects (its EndpointSlice's content)
        emu.check()                            # raises if the emulator logged an error

Keyword knobs: `python_bin_dir` (default `.venv/bin`), `image_entrypoints`, `probe_period` (0.5 s),
`restart_backoff` ((1, 10) s), `pull_backoff` (1 s), `max_grace` (10 s), `retry_seconds` (2 s).

Scheduler (tests/emulated_scheduler.py): Pods of `namespace` (all namespaces when None) without
`spec.nodeName` are bound (Binding subresource, Scheduled event) to the first emulated node, in `add_node`
order, that fits: NoSchedule/NoExecute taints vs tolerations, nodeSelector, required nodeAffinity
(matchExpressions), and the requests (a missing request = the limit) of cpu, memory, `pods` and extended
resources such as `nvidia.com/gpu` against the node's allocatable minus the pods already bound there (only
pods this emulator sees count). PVCs a Pod mounts must exist (and are marked Bound, with capacity = the
request, since there is no PV provisioner). Otherwise the Pod gets `PodScheduled=False/Unschedulable` with
the real scheduler's message, e.g. `0/1 nodes are available: 1 Insufficient nvidia.com/gpu. preemption:
0/1 nodes are available: 1 No preemption victims found for incoming pod.`, and a FailedScheduling event; it
is retried on `add_node`, when a pod is deleted, and every `retry_seconds`.

Kubelet, per Pod bound to an emulated node (see tests/emulated_pod.py):
- Pod IP: a random loopback address in 127.0.0.0/8 (never 127.0.0.1), checked free for every containerPort
  by binding, so parallel test runs on one machine do not collide. `--host 0.0.0.0` becomes that IP. Nodes
  get a random loopback hostIP the same way.
- Image in `unpullable_images`: container waiting `ErrImagePull`, then `ImagePullBackOff` (phase Pending);
  removing it from the set lets the next try start the container.
- Otherwise `command + args` (no command: `image_entrypoints[image]`, else `["lmkube"]`) run as a process;
  a bare executable name is looked up in `python_bin_dir` first. Env: `value` (with `$(VAR)`),
  `secretKeyRef`, `configMapKeyRef`, `fieldRef` (metadata.name/namespace/uid/labels/annotations,
  status.podIP/hostIP, spec.nodeName/serviceAccountName), `envFrom`; a missing Secret/ConfigMap/key gives
  `CreateContainerConfigError` (retried). The process env is only PATH, HOME (per pod), HOSTNAME, LANG,
  `extra_env` and the container's env — nothing of the test process leaks in. A container that mounts an
  automounted ServiceAccount token (the admission plugin's kube-api-access-* volume) also gets `KUBECONFIG`:
  a kubeconfig with a TokenRequest token of the pod's serviceAccountName (no KUBERNETES_SERVICE_HOST), which
  is how kopf/kubectl in the pod log in with exactly that account's RBAC; a missing account gives
  `CreateContainerConfigError`. Listen URLs `scheme://0.0.0.0:PORT` in args (kopf's `--liveness`) use the pod IP.
- Volumes: host dirs `root/volumes/<ns>/<claimName>` (persistentVolumeClaim) or `root/volumes/<ns>/<pod>-<vol>`
  (emptyDir; Secret/ConfigMap volumes get their keys as files). Args, env values and workingDir that start
  with a volumeMount's mountPath (also `--flag=/path`) are rewritten to the host dir (+ subPath).
- Probes (httpGet, tcpSocket, exec) every `probe_period` s (None: the probe's periodSeconds), honouring
  initialDelaySeconds and failureThreshold: startupProbe gates the others, readinessProbe drives the
  container's `ready` and the Ready/ContainersReady conditions, a failing liveness/startup probe restarts the
  process. An exiting process is restarted per restartPolicy with exponential back-off (`restart_backoff`
  (first, max) seconds) shown as `CrashLoopBackOff` with `lastState.terminated` and `restartCount`.
- Deletion (deletionTimestamp): SIGTERM to the process group, SIGKILL after the grace period (capped at
  `max_grace`), terminal phase, then the final delete (grace 0), so Recreate rollouts and garbage collection
  by the controller-manager complete. A Pod deleted outright has its processes killed.
- stdout/stderr of each container go to `root/logs/<ns>/<pod>_<container>.log` (appended across restarts).
- Kubelet-style Events (Scheduled, FailedScheduling, Started, Failed, BackOff, Unhealthy, Killing).

Not emulated: EndpointSlices/Endpoints. API validation rejects loopback addresses in them, so the
controller-manager runs without those controllers; `service_addresses()` gives what they would list.
Services have no ClusterIP routing or DNS either: clients use the pod IPs.

Nodes are cluster-scoped: concurrent emulators on one cluster should use distinct node names. `close()`
kills every process and deletes the Node objects this emulator created. Worker/watch exceptions are logged
(logger "kubelet_emulator") and kept in `errors`; `check()` raises if any happened.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import kubernetes.client
from emulated_pod import PodRuntime, Settings, decode_secret, now, port_is_free
from emulated_scheduler import SchedulerMixin
from kubernetes.client.exceptions import ApiException
from kubernetes.utils import parse_quantity
from kubernetes.watch.watch import iter_resp_lines
from urllib3.exceptions import HTTPError as Urllib3Error

if TYPE_CHECKING:
    from kube_cluster import KubeCluster

log = logging.getLogger("kubelet_emulator")
ROOT = Path(__file__).resolve().parent.parent
MERGE_PATCH = "application/merge-patch+json"


def _random_loopback(taken: set[str], ports: list[int]) -> str:
    for _ in range(1000):
        ip = f"127.{random.randint(1, 254)}.{random.randint(0, 255)}.{random.randint(1, 254)}"
        if ip not in taken and all(port_is_free(ip, port) for port in ports or [1]):
            taken.add(ip)
            return ip
    raise RuntimeError("no free loopback address found")


class KubeletEmulator(SchedulerMixin):
    """Scheduler + kubelets for the Pods of one namespace (all when None); see the module docstring."""

    def __init__(self, cluster: KubeCluster, namespace: str | None, root: Path,
                 extra_env: Mapping[str, str] | None = None, python_bin_dir: Path | None = None, *,
                 image_entrypoints: Mapping[str, list[str]] | None = None, probe_period: float | None = 0.5,
                 restart_backoff: tuple[float, float] = (1.0, 10.0), pull_backoff: float = 1.0,
                 max_grace: float = 10.0, retry_seconds: float = 2.0) -> None:
        self.cluster = cluster
        self.namespace = namespace
        self.root = Path(root)
        self.settings = Settings(
            root=self.root, python_bin_dir=Path(python_bin_dir or ROOT / ".venv" / "bin"),
            extra_env=dict(extra_env or {}), image_entrypoints=dict(image_entrypoints or {}),
            probe_period=probe_period, restart_backoff=restart_backoff, pull_backoff=pull_backoff, max_grace=max_grace,
        )
        self.retry_seconds = retry_seconds
        self.unpullable_images: set[str] = set()
        self.errors: list[str] = []
        self._api = cluster.api_client()
        self._core = kubernetes.client.CoreV1Api(self._api)
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._pods: dict[tuple[str, str], dict[str, Any]] = {}  # watch cache, (namespace, name) -> raw Pod
        self._runtimes: dict[str, PodRuntime] = {}  # uid -> runtime
        self._reported: dict[str, dict[str, Any]] = {}  # uid -> last status patched
        self._unschedulable: dict[str, str] = {}  # uid -> last message posted
        self._nodes: dict[str, dict[str, Any]] = {}  # name -> {"ip", "labels", "taints", "allocatable", ...}
        self._ips: set[str] = set()
        self._assumed: dict[str, str] = {}  # uid -> node, bound by us but maybe not yet in the watch cache
        self._last_schedule = 0.0
        self._capacity_changed = False
        self._synced = threading.Event()
        self._watch_response: Any = None
        self._closed = False
        self._threads = [threading.Thread(target=self._guard, args=(self._watch_loop,), name="emulator-watch",
                                          daemon=True),
                         threading.Thread(target=self._guard, args=(self._work_loop,), name="emulator-kubelet",
                                          daemon=True)]

    # -- lifecycle --------------------------------------------------------------------------------

    def __enter__(self) -> KubeletEmulator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, timeout: float = 30) -> None:
        for thread in self._threads:
            thread.start()
        if not self._synced.wait(timeout):
            raise RuntimeError(f"kubelet emulator: pod list not synced after {timeout}s: {self.errors}")

    def close(self) -> None:
        """Stops the threads, kills every process and deletes this emulator's Nodes (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        self._wake.set()
        response = self._watch_response
        if response is not None:
            with contextlib.suppress(Exception):  # best effort: the thread is a daemon anyway
                response.shutdown()  # unblocks the watch thread's read
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout=15)
        with self._lock:
            runtimes = list(self._runtimes.values())
            self._runtimes.clear()
        for runtime in runtimes:  # SIGTERM to all first: they shut down in parallel
            runtime.signal_all()
        for runtime in runtimes:
            runtime.kill()
        for name in list(self._nodes):
            try:
                self._core.delete_node(name, _preload_content=False)
            except (ApiException, Urllib3Error) as error:
                log.warning("deleting node %s: %s", name, error)
        self._api.close()

    def check(self) -> None:
        """Raises if the emulator logged an exception (call it at the end of a test)."""
        if self.errors:
            raise AssertionError("kubelet emulator errors:\n" + "\n".join(self.errors))

    def _guard(self, loop: Callable[[], None]) -> None:
        try:
            loop()
        except BaseException:
            self._error(f"{loop.__name__} died")
            raise

    def _error(self, what: str) -> None:
        if self._stopping.is_set():
            return
        text = f"{what}: {traceback.format_exc()}"
        log.error(text)
        self.errors.append(text)

    # -- public helpers ---------------------------------------------------------------------------

    def add_node(self, name: str, capacity: Mapping[str, str] | None = None, labels: Mapping[str, str] | None = None,
                 taints: list[dict[str, str]] | None = None, allocatable: Mapping[str, str] | None = None) -> None:
        """Creates (or updates) a Ready Node; pending Pods are then scheduled again."""
        capacity = dict(capacity or {"cpu": "8", "memory": "32Gi", "pods": "110"})
        capacity.setdefault("pods", "110")
        allocatable = dict(allocatable or capacity)
        with self._lock:
            ip = self._nodes[name]["ip"] if name in self._nodes else _random_loopback(self._ips, [])
        all_labels = {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                      **dict(labels or {})}
        body = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "labels": all_labels, "annotations": {"lmkube.dev/emulated": "true"}},
                "spec": {"taints": list(taints or [])}}
        try:
            self._core.create_node(body, _preload_content=False)
        except ApiException as error:
            if error.status != 409:
                raise
            self._core.patch_node(name, body, _content_type=MERGE_PATCH, _preload_content=False)
        stamp = now()
        status = {"capacity": capacity, "allocatable": allocatable,
                  "addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}],
                  "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                                  "message": "kubelet is posting ready status (emulated)",
                                  "lastHeartbeatTime": stamp, "lastTransitionTime": stamp}],
                  "nodeInfo": {"kubeletVersion": "v1.37.2-emulated", "operatingSystem": "linux",
                               "architecture": "amd64", "containerRuntimeVersion": "emulated://1"}}
        self._core.patch_node_status(name, {"status": status}, _content_type=MERGE_PATCH, _preload_content=False)
        with self._lock:
            self._nodes[name] = {"ip": ip, "labels": all_labels, "taints": list(taints or []),
                                 "allocatable": {k: float(parse_quantity(v)) for k, v in allocatable.items()}}
            self._capacity_changed = True
        self._wake.set()

    def _find(self, pod_name: str, namespace: str | None) -> PodRuntime | None:
        with self._lock:
            for runtime in self._runtimes.values():
                if runtime.name == pod_name and namespace in (None, runtime.namespace):
                    return runtime
        return None

    def pod_ip(self, pod_name: str, namespace: str | None = None) -> str:
        """The IP the pod's processes listen on (KeyError if the pod is not running here)."""
        runtime = self._find(pod_name, namespace)
        if runtime is None:
            raise KeyError(f"pod {pod_name} is not bound to an emulated node (yet)")
        return runtime.ip

    def server_log(self, pod_name: str, container: str | None = None, namespace: str | None = None) -> str:
        """stdout+stderr of the pod's (first) container, all runs; '' before the first start."""
        runtime = self._find(pod_name, namespace)
        if runtime is not None:
            paths = [c.log_path for c in runtime.containers if container in (None, c.name)]
        else:  # deleted pods keep their logs
            pattern = f"{namespace or self.namespace or '*'}/{pod_name}_{container or '*'}.log"
            paths = sorted((self.root / "logs").glob(pattern))
        return paths[0].read_text(errors="replace") if paths and paths[0].exists() else ""

    def running_pods(self) -> list[str]:
        """Names of the pods with at least one live process, sorted."""
        with self._lock:
            return sorted(r.name for r in self._runtimes.values() if r.alive())

    def service_addresses(self, service: str, namespace: str | None = None) -> list[str]:
        """IPs of the Ready, not terminating pods the Service selects: what its EndpointSlice would list
        (the endpointslice controller is off, since API validation rejects the emulator's loopback pod IPs)."""
        namespace = namespace or self.namespace or "default"
        body = json.loads(self._core.read_namespaced_service(service, namespace, _preload_content=False).data)
        selector = body["spec"].get("selector") or {}
        with self._lock:
            pods = [p for (ns, _), p in self._pods.items() if ns == namespace]

        def serving(pod: dict[str, Any]) -> bool:
            labels, status = pod["metadata"].get("labels") or {}, pod.get("status") or {}
            ready = any(c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions") or [])
            return (bool(selector) and all(labels.get(k) == v for k, v in selector.items()) and ready
                    and bool(status.get("podIP")) and not pod["metadata"].get("deletionTimestamp"))

        return sorted(p["status"]["podIP"] for p in pods if serving(p))

    def volume_dir(self, claim_name: str, namespace: str | None = None) -> Path:
        """Host directory backing PVC `claim_name` (created; put model files here before the pod starts)."""
        path = self.root / "volumes" / (namespace or self.namespace or "default") / claim_name
        path.mkdir(parents=True, exist_ok=True)
        return path

    # -- watch ------------------------------------------------------------------------------------

    def _list_call(self) -> Callable[..., Any]:
        if self.namespace is None:
            return self._core.list_pod_for_all_namespaces
        return lambda **kw: self._core.list_namespaced_pod(self.namespace, **kw)

    def _watch_loop(self) -> None:
        call = self._list_call()
        while not self._stopping.is_set():
            try:
                listing = json.loads(call(_preload_content=False).data)
                with self._lock:
                    self._pods = {(p["metadata"]["namespace"], p["metadata"]["name"]): p for p in listing["items"]}
                self._synced.set()
                self._wake.set()
                version = listing["metadata"]["resourceVersion"]
                while not self._stopping.is_set():
                    version = self._watch(call, version)
            except _Gone:
                log.info("pod watch expired (410); relisting")
            except (Urllib3Error, OSError) as error:  # a dropped connection is routine for a watch
                if self._stopping.is_set():
                    return
                log.warning("pod watch connection lost (%r); relisting", error)
                time.sleep(0.2)
            except Exception:  # logged and kept in self.errors; the loop relists
                if self._stopping.is_set():
                    return
                self._error("pod watch failed; relisting")
                time.sleep(0.2)

    def _watch(self, call: Callable[..., Any], version: str) -> str:
        """One watch request from `version`; returns the last resourceVersion seen (raises _Gone on 410)."""
        response = call(watch=True, resource_version=version, allow_watch_bookmarks=True, timeout_seconds=30,
                        _preload_content=False)
        self._watch_response = response
        try:
            for line in iter_resp_lines(response):
                event = json.loads(line)
                obj = event["object"]
                if event["type"] == "ERROR":
                    if obj.get("code") == 410:
                        raise _Gone(obj.get("message"))
                    raise RuntimeError(f"watch error: {obj}")
                version = obj["metadata"]["resourceVersion"]
                if event["type"] == "BOOKMARK":
                    continue
                key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
                with self._lock:
                    if event["type"] == "DELETED":
                        self._pods.pop(key, None)
                        self._capacity_changed = True  # its resources are free: retry pending pods now
                    else:
                        self._pods[key] = obj
                self._wake.set()
        finally:
            self._watch_response = None
            response.release_conn()
        return version

    # -- worker -----------------------------------------------------------------------------------

    def _work_loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(0.2)
            self._wake.clear()
            if self._stopping.is_set():
                return
            try:
                self._sync()
            except Exception:  # logged and kept in self.errors; next tick retries
                self._error("sync failed")
                time.sleep(0.2)

    def _sync(self) -> None:
        with self._lock:
            pods = list(self._pods.values())
        live = {p["metadata"]["uid"] for p in pods}
        for uid in [uid for uid in self._runtimes if uid not in live]:  # deleted outright: kill, forget
            with self._lock:
                runtime = self._runtimes.pop(uid)
                self._ips.discard(runtime.ip)
            log.info("pod %s/%s is gone; killing its processes", runtime.namespace, runtime.name)
            runtime.kill()
            self._reported.pop(uid, None)
        self._assumed = {uid: node for uid, node in self._assumed.items() if uid in live}
        self._schedule([p for p in pods if not p["spec"].get("nodeName") and p["metadata"]["uid"] not in self._assumed])
        for pod in pods:
            if pod["spec"].get("nodeName") in self._nodes:
                try:
                    self._kubelet(pod)
                except ApiException as error:
                    if error.status not in (404, 409):  # gone or replaced meanwhile: the watch catches up
                        raise

    def _kubelet(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        uid = meta["uid"]
        runtime = self._runtimes.get(uid)
        if pod.get("status", {}).get("phase") in ("Succeeded", "Failed") and runtime is None:
            if meta.get("deletionTimestamp"):
                self._finish_delete(pod)
            return
        if runtime is None:
            if meta.get("deletionTimestamp"):
                self._finish_delete(pod)
                return
            ports = [int(p["containerPort"]) for c in pod["spec"]["containers"] for p in c.get("ports") or []]
            with self._lock:
                ip = _random_loopback(self._ips, ports)
                runtime = PodRuntime(pod, ip, self._nodes[pod["spec"]["nodeName"]]["ip"], self.settings,
                                     self._lookup, self._service_account)
                self._runtimes[uid] = runtime
        runtime.pod = pod
        if meta.get("deletionTimestamp"):
            runtime.terminate(float(meta.get("deletionGracePeriodSeconds") or 0))
        runtime.sync(self.unpullable_images)
        self._post_events(pod, runtime)
        status = runtime.status()
        if meta.get("deletionTimestamp") and runtime.stopped:
            if status["phase"] not in ("Succeeded", "Failed"):
                status["phase"] = "Failed"
            self._patch_status(pod, status)
            self._finish_delete(pod)
            with self._lock:
                self._runtimes.pop(uid, None)
                self._ips.discard(runtime.ip)
            return
        self._patch_status(pod, status)

    def _patch_status(self, pod: dict[str, Any], status: dict[str, Any]) -> None:
        uid = pod["metadata"]["uid"]
        if self._reported.get(uid) == status:
            return
        body = {"metadata": {"uid": uid}, "status": status}  # the uid makes it a precondition
        self._core.patch_namespaced_pod_status(pod["metadata"]["name"], pod["metadata"]["namespace"], body,
                                               _content_type=MERGE_PATCH, _preload_content=False)
        self._reported[uid] = status

    def _finish_delete(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        try:
            # With a body the apiserver ignores query parameters: the grace period must be in the body.
            body = {"gracePeriodSeconds": 0, "preconditions": {"uid": meta["uid"]}}
            self._core.delete_namespaced_pod(meta["name"], meta["namespace"], body=body, _preload_content=False)
        except ApiException as error:
            if error.status not in (404, 409):
                raise
        self._reported.pop(meta["uid"], None)

    def _lookup(self, kind: str, namespace: str, name: str) -> dict[str, str] | None:
        try:
            if kind == "secret":
                obj = json.loads(self._core.read_namespaced_secret(name, namespace, _preload_content=False).data)
                return decode_secret(obj.get("data"), obj.get("stringData"))
            obj = json.loads(self._core.read_namespaced_config_map(name, namespace, _preload_content=False).data)
            return {**(obj.get("data") or {}), **(obj.get("binaryData") or {})}
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def _service_account(self, namespace: str, name: str, path: Path) -> Path | None:
        try:
            return self.cluster.service_account_kubeconfig(namespace, name, path)
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def _event(self, pod: Mapping[str, Any], kind: str, reason: str, message: str, component: str) -> None:
        meta = pod["metadata"]
        stamp = now()
        body = {"metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
                "involvedObject": {"kind": "Pod", "apiVersion": "v1", "name": meta["name"],
                                   "namespace": meta["namespace"], "uid": meta["uid"]},
                "type": kind, "reason": reason, "message": message, "source": {"component": component},
                "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1}
        try:
            self._core.create_namespaced_event(meta["namespace"], body, _preload_content=False)
        except ApiException as error:  # a terminating namespace refuses new events
            log.info("event %s for %s not posted: %s", reason, meta["name"], error.reason)

    def _post_events(self, pod: Mapping[str, Any], runtime: PodRuntime) -> None:
        events, runtime.events = runtime.events, []
        for kind, reason, message in events:
            self._event(pod, kind, reason, message, "kubelet")


class _Gone(Exception):
    """The watch's resourceVersion is too old (HTTP 410): relist."""

