"""A real, throwaway Kubernetes control plane for tests: etcd + kube-apiserver + kube-controller-manager.

The binaries come from `scripts/install-test-cluster.sh` (built once into ~/.cache/lmkube/bin; a
repeat run only prints their paths). The controller-manager runs only the controllers in
`CONTROLLERS` (Deployments, ReplicaSets, garbage collection of ownerReferences, ServiceAccounts and
their tokens, namespace deletion, PVC protection), or `REAL_NODE_CONTROLLERS` for a control plane with a
real node (tests/real_node.py adds kubelet, kube-scheduler and kube-proxy). Without a node, pods stay
Pending: enough for what only needs the API. Start-up takes about 4-5 s (etcd ~0.5 s, kube-apiserver ~3 s,
controller-manager ~1 s).

`service_account_kubeconfig()` writes a kubeconfig holding a TokenRequest token of a ServiceAccount,
so a subprocess (the operator) can be run with exactly that account's RBAC permissions.
`create_namespace()` waits for the namespace's `default` ServiceAccount (Pods are rejected before it exists).

The garbage collector rediscovers resource types only every 30 s, so a background thread restarts the
controller-manager (~0.5 s) whenever a new CRD becomes Established: objects owned by custom resources are
then collected at once (~0.1 s) instead of ~40 s late. `apply_crds()` applies, waits and restarts explicitly.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import kubernetes.client

ROOT = Path(__file__).resolve().parent.parent
INSTALL_SCRIPT = ROOT / "scripts" / "install-test-cluster.sh"


def install_binaries() -> dict[str, str]:
    """Runs the install script (instant when cached) and returns its KEY=VALUE stdout as a dict."""
    result = subprocess.run(
        ["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True, check=False, timeout=1800,
    )
    if result.returncode != 0:
        # The script needs Go even when everything is cached; binaries already built are good enough.
        cached = Path(os.environ.get("LMKUBE_CACHE", Path.home() / ".cache" / "lmkube")) / "bin"
        names = {"LMKUBE_ETCD": "etcd", "LMKUBE_KUBE_APISERVER": "kube-apiserver",
                 "LMKUBE_KUBE_CONTROLLER_MANAGER": "kube-controller-manager", "LMKUBE_KUBE_SCHEDULER": "kube-scheduler",
                 "LMKUBE_KUBECTL": "kubectl", "LMKUBE_HELM": "helm"}
        # The real node's pieces, when built (tests/real_node.py's preflight names any that are missing).
        node_names = {"LMKUBE_KUBELET": "kubelet", "LMKUBE_KUBE_PROXY": "kube-proxy", "LMKUBE_PAUSE": "pause"}
        if all(os.access(cached / name, os.X_OK) for name in names.values()):
            return ({key: str(cached / name) for key, name in (names | node_names).items()}
                    | {"KUBEBUILDER_ASSETS": str(cached), "LMKUBE_BUSYBOX": shutil.which("busybox") or "/bin/busybox"})
        raise RuntimeError(f"{INSTALL_SCRIPT.name} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    paths = {}
    for line in result.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            paths[key.strip()] = value.strip()
    return paths


# For a control plane without nodes. Left out: node-lifecycle, pod-garbage-collector, the PersistentVolume
# binder and the endpointslice controllers (nothing for them to do without a node), ttl, taint-eviction.
CONTROLLERS = (
    "deployment-controller", "replicaset-controller", "statefulset-controller", "garbage-collector-controller",
    "namespace-controller",
    "serviceaccount-controller", "serviceaccount-token-controller", "root-ca-certificate-publisher-controller",
    # The StorageObjectInUseProtection admission plugin puts a finalizer on every PVC; without this
    # controller a deleted PVC would stay Terminating forever.
    "persistentvolumeclaim-protection-controller",
)
# With a real kubelet (tests/real_node.py) the controllers left out above are needed: node-lifecycle removes
# a new node's not-ready taint, the pod GC deletes pods of nodes that went away, and pods have real IPs on the
# node's bridge, so Services get EndpointSlices.
# Statically provisioned hostPath volumes (tests/node_support.py) need the PersistentVolume binder and the
# protection controller that lets a released volume be deleted.
REAL_NODE_CONTROLLERS = (*CONTROLLERS, "node-lifecycle-controller", "pod-garbage-collector-controller",
                         "endpointslice-controller", "endpointslice-mirroring-controller",
                         "persistentvolume-binder-controller", "persistentvolume-protection-controller")


def _https_ok(url: str, token: str | None = None) -> bool:
    """GET `url` (self-signed TLS) answers 200 "ok"."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=2, context=context) as response:
            return response.read().strip() == b"ok"
    except (OSError, urllib.error.URLError):
        return False


def _free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (all sockets held open together so none repeats)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class KubeCluster:
    """etcd + kube-apiserver (RBAC on, static admin token in system:masters) + kube-controller-manager
    in a temporary directory.

    Use as a context manager, or call `start()` / `stop()`. `controller_manager=False` leaves the
    controller-manager out (then nothing acts on Deployments, ownerReferences or namespace deletion).
    """

    def __init__(self, binaries: dict[str, str] | None = None, workdir: Path | None = None,
                 controller_manager: bool = True, controllers: tuple[str, ...] = CONTROLLERS,
                 apiserver_args: tuple[str, ...] = ()) -> None:
        self.binaries = binaries or install_binaries()
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="lmkube-kube-"))
        self.token = secrets.token_hex(16)
        self.controller_manager = controller_manager
        self.controllers = controllers
        self.apiserver_args = apiserver_args  # more kube-apiserver flags (bench/operator_scale.py: an audit log)
        self._kcm_token = secrets.token_hex(16)
        self.etcd_port, self.peer_port, self.api_port, self.kcm_port = _free_ports(4)
        self.server = f"https://127.0.0.1:{self.api_port}"
        self.kubeconfig = self.workdir / "kubeconfig"
        self._processes: list[subprocess.Popen[bytes]] = []
        self._kcm: subprocess.Popen[bytes] | None = None
        self._kcm_lock = threading.Lock()
        self._stopping = threading.Event()
        self._crd_names: set[str] = set()
        self.start_seconds: float | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def __enter__(self) -> KubeCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 120) -> None:
        began = time.monotonic()
        try:
            self._start_etcd(timeout)
            self._start_apiserver(timeout)
            self._write_kubeconfig()
            if self.controller_manager:
                self._start_controller_manager(timeout)
                self._crd_names = self._established_crds()
                threading.Thread(target=self._follow_crds, name="kube-crd-follower", daemon=True).start()
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - began

    def stop(self) -> None:
        """Stops kube-apiserver before etcd (the apiserver hangs retrying etcd otherwise)."""
        self._stopping.set()
        with self._kcm_lock:
            self._stop_processes()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _stop_processes(self) -> None:
        for process in reversed(self._processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=10)
        self._processes.clear()

    def _spawn(self, name: str, command: list[str]) -> subprocess.Popen[bytes]:
        with (self.workdir / f"{name}.log").open("ab") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self._processes.append(process)
        return process

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _wait(self, name: str, process: subprocess.Popen[bytes], ready: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}:\n{self.log(name)[-4000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not ready after {timeout}s:\n{self.log(name)[-4000:]}")
            time.sleep(0.2)

    def _start_etcd(self, timeout: float) -> None:
        peer = f"http://127.0.0.1:{self.peer_port}"
        client = f"http://127.0.0.1:{self.etcd_port}"
        process = self._spawn("etcd", [
            self.binaries["LMKUBE_ETCD"], "--name", "lmkube-test", "--data-dir", str(self.workdir / "etcd"),
            "--unsafe-no-fsync", "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"lmkube-test={peer}",
        ])

        def healthy() -> bool:
            try:
                with urllib.request.urlopen(f"{client}/health", timeout=2) as response:
                    return b'"health":"true"' in response.read()
            except (OSError, urllib.error.URLError):
                return False

        self._wait("etcd", process, healthy, timeout)

    def _start_apiserver(self, timeout: float) -> None:
        sa_key, sa_pub = self.workdir / "sa.key", self.workdir / "sa.pub"
        subprocess.run(["openssl", "genrsa", "-out", str(sa_key), "2048"], check=True, capture_output=True)
        subprocess.run(["openssl", "rsa", "-in", str(sa_key), "-pubout", "-out", str(sa_pub)],
                       check=True, capture_output=True)
        tokens = self.workdir / "tokens.csv"
        tokens.write_text(f'{self.token},lmkube-admin,lmkube-admin,"system:masters"\n'
                          f'{self._kcm_token},system:kube-controller-manager,kcm,"system:masters"\n')
        process = self._spawn("apiserver", [
            self.binaries["LMKUBE_KUBE_APISERVER"], "--etcd-servers", f"http://127.0.0.1:{self.etcd_port}",
            "--bind-address", "127.0.0.1", "--advertise-address", "127.0.0.1",
            "--secure-port", str(self.api_port), "--cert-dir", str(self.workdir / "certs"),
            "--token-auth-file", str(tokens), "--authorization-mode", "RBAC",
            "--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
            "--service-account-key-file", str(sa_pub), "--service-account-signing-key-file", str(sa_key),
            "--service-cluster-ip-range", "10.0.0.0/24", "--allow-privileged=true",
            # 1.37 refuses a loopback --advertise-address without this (scripts/README.md).
            "--endpoint-reconciler-type", "none",
            # Logs and exec reach a real node's kubelet at its address: by default the apiserver would look
            # the node's name up in the host's DNS first.
            "--kubelet-preferred-address-types", "InternalIP",
            *self.apiserver_args,
        ])
        self._wait("apiserver", process, lambda: _https_ok(f"{self.server}/readyz", self.token), timeout)

    def _start_controller_manager(self, timeout: float) -> None:
        kubeconfig = self.workdir / "controller-manager.kubeconfig"
        self._write_kubeconfig(kubeconfig, "system:kube-controller-manager", self._kcm_token)
        self._kcm = self._spawn("controller-manager", [
            self.binaries["LMKUBE_KUBE_CONTROLLER_MANAGER"], "--kubeconfig", str(kubeconfig),
            "--bind-address", "127.0.0.1", "--secure-port", str(self.kcm_port),
            "--cert-dir", str(self.workdir / "controller-manager-certs"),
            "--controllers", ",".join(self.controllers), "--leader-elect=false",
            "--use-service-account-credentials=false",
            "--service-account-private-key-file", str(self.workdir / "sa.key"),
            # The serving certificate the apiserver generated for itself (self-signed): what pods would trust.
            "--root-ca-file", str(self.workdir / "certs" / "apiserver.crt"),
            # No kubelets report node CIDRs or volumes; these loops would only log noise.
            "--allocate-node-cidrs=false", "--configure-cloud-routes=false",
        ])
        # /healthz is in the default --authorization-always-allow-paths: no credentials needed.
        self._wait("controller-manager", self._kcm,
                   lambda: _https_ok(f"https://127.0.0.1:{self.kcm_port}/healthz"), timeout)

    def restart_controller_manager(self, timeout: float = 60) -> None:
        """Restarts kube-controller-manager (about 0.5 s). Done automatically when a CRD is established:
        its garbage collector rediscovers resources only every 30 s, so a new kind's objects deleted
        before then (default background propagation) would have their dependents collected ~30 s late."""
        with self._kcm_lock:
            if self._stopping.is_set():
                return
            if self._kcm is not None and self._kcm.poll() is None:
                self._kcm.terminate()
                try:
                    self._kcm.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._kcm.kill()
                    self._kcm.wait(timeout=10)
            if self._kcm in self._processes:
                self._processes.remove(self._kcm)
            self._start_controller_manager(timeout)

    def _established_crds(self) -> set[str]:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        request = urllib.request.Request(f"{self.server}/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
                                         headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=5, context=context) as response:
            items = json.loads(response.read())["items"]
        return {item["metadata"]["name"] for item in items
                if any(c["type"] == "Established" and c["status"] == "True"
                       for c in item.get("status", {}).get("conditions") or [])}

    def _follow_crds(self) -> None:
        """Restarts the controller-manager whenever a new CRD becomes Established (see restart_controller_manager)."""
        while not self._stopping.wait(0.3):
            try:
                names = self._established_crds()
                if names - self._crd_names:
                    self.restart_controller_manager()  # raises when it fails: retried at the next poll
                self._crd_names = names
            except Exception as error:  # keep following; a failed restart shows in the log
                if not self._stopping.is_set():
                    print(f"kube_cluster: following CRDs failed: {error!r}", file=sys.stderr)

    def apply_crds(self, *paths: Path, timeout: float = 30) -> None:
        """`kubectl apply`s CRD manifests, waits until every CRD is Established, then restarts the
        controller-manager so garbage collection of objects owned by the new kinds works at once."""
        import kubernetes.client

        names = []
        for path in paths:
            result = self.kubectl("apply", "-f", str(path), "-o", "name")
            names += [line.split("/", 1)[1] for line in result.stdout.split() if line.startswith("customresourcedef")]
        with self.api_client() as client:
            extensions = kubernetes.client.ApiextensionsV1Api(client)
            deadline = time.monotonic() + timeout
            for name in names:
                while True:
                    body = json.loads(extensions.read_custom_resource_definition(name, _preload_content=False).data)
                    conditions = {c["type"]: c["status"] for c in body.get("status", {}).get("conditions") or []}
                    if conditions.get("Established") == "True":
                        break
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"CRD {name} not Established after {timeout}s: {conditions}")
                    time.sleep(0.1)
        if self.controller_manager and set(names) - self._crd_names:
            self._crd_names |= set(names)
            self.restart_controller_manager()

    def _write_kubeconfig(self, path: Path | None = None, user: str = "lmkube-admin", token: str | None = None) -> Path:
        import yaml

        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "lmkube-test",
            "clusters": [{"name": "lmkube-test", "cluster": {"server": self.server, "insecure-skip-tls-verify": True}}],
            "users": [{"name": user, "user": {"token": token or self.token}}],
            "contexts": [{"name": "lmkube-test", "context": {"cluster": "lmkube-test", "user": user}}],
        }
        path = path or self.kubeconfig
        path.write_text(yaml.safe_dump(config))
        return path

    # -- ServiceAccounts ---------------------------------------------------------------------------

    def service_account_token(self, namespace: str, name: str, expiration_seconds: int = 3600) -> str:
        """A token for ServiceAccount `namespace/name` from the TokenRequest API (bound to nothing else)."""
        import kubernetes.client

        with self.api_client() as client:
            response = kubernetes.client.CoreV1Api(client).create_namespaced_service_account_token(
                name, namespace, {"spec": {"expirationSeconds": expiration_seconds}}, _preload_content=False,
            )
            return json.loads(response.data)["status"]["token"]

    def service_account_kubeconfig(self, namespace: str, name: str, path: Path, expiration_seconds: int = 3600) -> Path:
        """Writes a kubeconfig at `path` that authenticates as ServiceAccount `namespace/name` (a
        TokenRequest token, valid `expiration_seconds`), with `namespace` as the context's namespace,
        and returns `path`. The account needs to exist; what it may do is only what RBAC grants it.
        """
        import yaml

        token = self.service_account_token(namespace, name, expiration_seconds)
        user = f"system:serviceaccount:{namespace}:{name}"
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "lmkube-test",
            "clusters": [{"name": "lmkube-test", "cluster": {"server": self.server, "insecure-skip-tls-verify": True}}],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": "lmkube-test",
                          "context": {"cluster": "lmkube-test", "user": user, "namespace": namespace}}],
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(config))
        return path

    def create_namespace(self, name: str, timeout: float = 30) -> None:
        """Creates namespace `name` and waits for its `default` ServiceAccount (made by the controller-manager;
        the ServiceAccount admission plugin rejects Pods until it exists)."""
        import kubernetes.client
        from kubernetes.client.exceptions import ApiException

        with self.api_client() as client:
            core = kubernetes.client.CoreV1Api(client)
            core.create_namespace({"metadata": {"name": name}}, _preload_content=False)
            if not self.controller_manager:
                return
            deadline = time.monotonic() + timeout
            while True:
                try:
                    core.read_namespaced_service_account("default", name, _preload_content=False)
                    return
                except ApiException as error:
                    if error.status != 404 or time.monotonic() > deadline:
                        raise
                time.sleep(0.05)

    # -- clients ---------------------------------------------------------------------------------

    def client_configuration(self) -> kubernetes.client.Configuration:
        import kubernetes.client

        config = kubernetes.client.Configuration()
        config.host = self.server
        config.api_key = {"authorization": self.token}
        config.api_key_prefix = {"authorization": "Bearer"}
        config.verify_ssl = False
        return config

    def api_client(self) -> kubernetes.client.ApiClient:
        import kubernetes.client
        import urllib3

        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)  # self-signed test apiserver

        return kubernetes.client.ApiClient(self.client_configuration())

    @property
    def env(self) -> dict[str, str]:
        """Environment for kubectl/helm subprocesses: KUBECONFIG points at this cluster (admin token)."""
        helm = {f"HELM_{kind.upper()}_HOME": str(self.workdir / f"helm-{kind}") for kind in ("cache", "config", "data")}
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig), **helm}

    @property
    def kubectl_args(self) -> list[str]:
        return [self.binaries["LMKUBE_KUBECTL"], "--server", self.server, "--token", self.token,
                "--insecure-skip-tls-verify"]

    @property
    def helm_args(self) -> list[str]:
        return [self.binaries["LMKUBE_HELM"], "--kube-apiserver", self.server, "--kube-token", self.token,
                "--kube-insecure-skip-tls-verify"]

    def kubectl(self, *args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.kubectl_args, *args], capture_output=True, text=True, check=check, input=input,
                              env=self.env, timeout=120)

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.helm_args, *args], capture_output=True, text=True, check=check, env=self.env,
                              timeout=300)
