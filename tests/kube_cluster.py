"""A real, throwaway Kubernetes control plane for tests: etcd + kube-apiserver on free loopback ports.

The binaries come from `scripts/install-test-cluster.sh` (built once into ~/.cache/lmkube/bin; a
repeat run only prints their paths). There is no controller-manager or scheduler, see scripts/README.md.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
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
                 "LMKUBE_KUBECTL": "kubectl", "LMKUBE_HELM": "helm"}
        if all(os.access(cached / name, os.X_OK) for name in names.values()):
            return {key: str(cached / name) for key, name in names.items()} | {"KUBEBUILDER_ASSETS": str(cached)}
        raise RuntimeError(f"{INSTALL_SCRIPT.name} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    paths = {}
    for line in result.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            paths[key.strip()] = value.strip()
    return paths


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
    """etcd + kube-apiserver (RBAC on, static admin token in system:masters) in a temporary directory.

    Use as a context manager, or call `start()` / `stop()`.
    """

    def __init__(self, binaries: dict[str, str] | None = None, workdir: Path | None = None) -> None:
        self.binaries = binaries or install_binaries()
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="lmkube-kube-"))
        self.token = secrets.token_hex(16)
        self.etcd_port, self.peer_port, self.api_port = _free_ports(3)
        self.server = f"https://127.0.0.1:{self.api_port}"
        self.kubeconfig = self.workdir / "kubeconfig"
        self._processes: list[subprocess.Popen[bytes]] = []
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
        except BaseException:
            self.stop()
            raise
        self._write_kubeconfig()
        self.start_seconds = time.monotonic() - began

    def stop(self) -> None:
        """Stops kube-apiserver before etcd (the apiserver hangs retrying etcd otherwise)."""
        for process in reversed(self._processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=10)
        self._processes.clear()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _spawn(self, name: str, command: list[str]) -> subprocess.Popen[bytes]:
        with (self.workdir / f"{name}.log").open("wb") as log:
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
        tokens.write_text(f'{self.token},lmkube-admin,lmkube-admin,"system:masters"\n')
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
        ])
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE

        def ready() -> bool:
            request = urllib.request.Request(f"{self.server}/readyz", headers={"Authorization": f"Bearer {self.token}"})
            try:
                with urllib.request.urlopen(request, timeout=2, context=context) as response:
                    return response.read().strip() == b"ok"
            except (OSError, urllib.error.URLError):
                return False

        self._wait("apiserver", process, ready, timeout)

    def _write_kubeconfig(self) -> None:
        import yaml

        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "lmkube-test",
            "clusters": [{"name": "lmkube-test", "cluster": {"server": self.server, "insecure-skip-tls-verify": True}}],
            "users": [{"name": "lmkube-admin", "user": {"token": self.token}}],
            "contexts": [{"name": "lmkube-test", "context": {"cluster": "lmkube-test", "user": "lmkube-admin"}}],
        }
        self.kubeconfig.write_text(yaml.safe_dump(config))

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
