"""A real Kubernetes node for the tests: containerd + runc + a CNI bridge + kubelet, with kube-scheduler and
kube-proxy, joined to a tests/kube_cluster.py control plane. The recipe (and why each setting) is in
/work/shared/reference/real-node-notes.md.

It leaves the host as it was:
- containerd, kubelet and kube-proxy run in a private mount namespace (held open by a sleeping `unshare`
  process). Inside it, tmpfs mounts mask the paths they hard-code (/run/containerd, /var/lib/kubelet,
  /var/lib/cni) and files holding kubelet's wanted values are bind-mounted over the /proc/sys entries it
  would rewrite. Every mount they make (overlay root filesystems, netns pins, volumes) stays in there and goes
  with it.
- kubelet runs with a PATH that has no `iptables`, so it programs no firewall rules; kube-proxy (nftables
  mode) keeps its rules in its own `kube-proxy` nft tables, deleted at teardown.
- Pods live in cgroups under `/lmkube-test` of each cgroup v1 hierarchy; teardown kills what is left there
  and removes the tree, the bridge and the directories it had to create.
A run killed halfway leaves a state file (STATE_FILE); the next `start()` cleans up after it first.
Only one node at a time per machine (fixed bridge name, subnet and kubelet-hard-coded paths): a lock file
serialises runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import IO, Any

from kube_cluster import KubeCluster, _free_ports, _https_ok
from oci_image import ImageFile, ImageSpec, write_oci_archive
from real_node_config import (
    BRIDGE,
    CGROUP_ROOT,
    NODE_IP,
    PAUSE_IMAGE,
    NodePaths,
    cni_conflist,
    containerd_toml,
    kube_proxy_configuration,
    kubelet_configuration,
)
from real_node_host import (
    HARD_CODED_DIRS,
    KUBELET_SYSCTLS,
    STATE_DIR,
    STATE_FILE,
    cgroup_hierarchies,
    clean_up,
    host_snapshot,
    kill_cgroup_tree,
    preflight,
    run,
    start_time,
    take_lock,
)
from tcp_forward import TcpForwarder

BUSYBOX_IMAGE = "localhost/lmkube-test/busybox:v1"
# A PATH without iptables (kubelet programs firewall rules whenever it finds the binary).
NO_IPTABLES_PATH = "/usr/local/bin:/usr/bin"
# Where pods reach the apiserver (the `kubernetes` Service's endpoint): forwarded to its loopback port.
APISERVER_NODE_PORT = 6443
IMPORT_TIMEOUT = 900  # the project image (~1 GB) unpacked on a busy 2-core machine


class RealNode:
    """One real node named `name` for `cluster` (which must run the node-lifecycle controller: see
    kube_cluster.REAL_NODE_CONTROLLERS). Use as a context manager or call start()/stop()."""

    def __init__(self, cluster: KubeCluster, workdir: Path, name: str = "lmkube-node") -> None:
        self.cluster = cluster
        self.binaries = cluster.binaries
        self.name = name
        self.paths = NodePaths(workdir)
        self._processes: dict[str, subprocess.Popen[bytes]] = {}
        self._imported: list[Path] = []
        self._forwarder: TcpForwarder | None = None
        self._holder: subprocess.Popen[bytes] | None = None
        self._lock: IO[str] | None = None
        self.state: dict[str, Any] = {}
        self.host_before: dict[str, Any] = {}
        self.start_seconds: float | None = None

    def __enter__(self) -> RealNode:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self, timeout: float = 180) -> None:
        preflight(self.binaries)
        began = time.monotonic()
        self._lock = take_lock(STATE_DIR)  # another run's node: wait for it to finish
        if STATE_FILE.exists():  # a killed run's leftovers
            clean_up(json.loads(STATE_FILE.read_text()))
        self.host_before = host_snapshot()
        self.state = {"workdir": str(self.paths.root), "pids": [], "created_dirs": []}
        try:
            self.paths.root.mkdir(parents=True, exist_ok=True)
            self._save_state()
            self._create_bridge()
            self._create_cgroup_root()
            self._enter_mount_namespace()
            self._start_containerd(timeout)
            self._import_test_images()
            for archive in self._imported:
                self.ctr("images", "import", str(archive), timeout=IMPORT_TIMEOUT)
            self._start_kubelet(timeout)
            self._start_scheduler(timeout)
            self._start_kube_proxy(timeout)
            self._expose_apiserver()
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - began

    def stop(self) -> None:
        """Stops kubelet first (so it restarts nothing), then everything else; leaves no trace."""
        if self._forwarder is not None:
            self._forwarder.stop()
            self._forwarder = None
        for name in ("kubelet", "kube-proxy", "kube-scheduler"):
            process = self._processes.get(name)
            if process is not None and process.poll() is None:
                process.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=15)
        for hierarchy in cgroup_hierarchies():  # the pods' processes, before containerd goes
            kill_cgroup_tree(hierarchy / CGROUP_ROOT)
        containerd = self._processes.get("containerd")
        if containerd is not None and containerd.poll() is None:
            containerd.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                containerd.wait(timeout=15)
        clean_up(self.state)
        for process in [*self._processes.values(), *([self._holder] if self._holder else [])]:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
        self._processes.clear()
        if self._lock is not None:
            (STATE_DIR / "lock").unlink(missing_ok=True)
            self._lock.close()
            self._lock = None
            with contextlib.suppress(OSError):
                STATE_DIR.rmdir()

    def abandon(self) -> None:
        """Drops the node the way a killed test run does (for the clean-up test): everything keeps running,
        the state file stays, only the lock is released."""
        assert self._lock is not None
        if self._forwarder is not None:  # a thread of the test process: it would die with it
            self._forwarder.stop()
            self._forwarder = None
        self._lock.close()
        self._lock = None
        self._processes.clear()
        self._holder = None

    def _save_state(self) -> None:
        STATE_FILE.write_text(json.dumps(self.state))

    def _spawn(self, name: str, command: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Starts `command` inside the node's mount namespace, logging to <workdir>/<name>.log."""
        assert self._holder is not None
        with (self.paths.root / f"{name}.log").open("ab") as log:
            process = subprocess.Popen(["nsenter", "-t", str(self._holder.pid), "-m", "--", *command],
                                       stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env=env or os.environ.copy(), start_new_session=True)
        self._processes[name] = process
        self.state["pids"].append([process.pid, start_time(process.pid)])
        self._save_state()
        return process

    def log(self, name: str) -> str:
        path = self.paths.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _wait(self, name: str, ready: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            process = self._processes.get(name)
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}:\n{self.log(name)[-4000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not ready after {timeout}s:\n{self.log(name)[-4000:]}")
            time.sleep(0.2)

    # -- host pieces ----------------------------------------------------------------------------

    def _create_bridge(self) -> None:
        run("ip", "link", "add", BRIDGE, "type", "bridge")
        run("ip", "addr", "add", f"{NODE_IP}/24", "dev", BRIDGE)
        run("ip", "link", "set", BRIDGE, "up")
        # Pod -> ClusterIP -> pod traffic is routed by the node between ports of this bridge: forwarding on
        # this one device (which goes with it), not the host-wide ip_forward.
        Path(f"/proc/sys/net/ipv4/conf/{BRIDGE}/forwarding").write_text("1\n")

    def _create_cgroup_root(self) -> None:
        """kubelet wants its cgroupRoot to exist in every hierarchy; a cpuset child starts with no CPUs."""
        for hierarchy in cgroup_hierarchies():
            directory = hierarchy / CGROUP_ROOT
            directory.mkdir(exist_ok=True)
            for name in ("cpuset.cpus", "cpuset.mems"):
                if (hierarchy / name).exists():
                    (directory / name).write_text((hierarchy / name).read_text())

    def _enter_mount_namespace(self) -> None:
        self._holder = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "--", "sleep", "infinity"],
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        self.state["holder"] = [self._holder.pid, start_time(self._holder.pid)]
        namespace = ""
        deadline = time.monotonic() + 30
        own = os.readlink("/proc/self/ns/mnt")
        while namespace in ("", own):  # unshare has not switched namespaces yet
            if time.monotonic() > deadline:
                raise RuntimeError("unshare did not create a mount namespace")
            time.sleep(0.05)
            namespace = os.readlink(f"/proc/{self._holder.pid}/ns/mnt")
        self.state["mount_namespace"] = namespace
        for directory in HARD_CODED_DIRS:
            missing = [p for p in (directory, *directory.parents) if not p.exists()]
            for path in reversed(missing):
                path.mkdir()
                self.state["created_dirs"].append(str(path))
        self._save_state()
        enter = ["nsenter", "-t", str(self._holder.pid), "-m", "--"]
        for directory in HARD_CODED_DIRS:
            run(*enter, "mount", "-t", "tmpfs", "-o", "mode=0755", "lmkube-test", str(directory))
        self.paths.sysctl_dir.mkdir(parents=True, exist_ok=True)
        for key, value in KUBELET_SYSCTLS.items():
            stand_in = self.paths.sysctl_dir / key.replace("/", ".")
            stand_in.write_text(f"{value}\n")
            run(*enter, "mount", "--bind", str(stand_in), f"/proc/sys/{key}")

    # -- daemons ---------------------------------------------------------------------------------

    def _start_containerd(self, timeout: float) -> None:
        runc = shutil.which("runc", path="/usr/sbin:/usr/bin") or "runc"
        self.paths.containerd_config.write_text(containerd_toml(self.paths, runc))
        self.paths.cni_conf_dir.mkdir(parents=True, exist_ok=True)
        (self.paths.cni_conf_dir / "10-lmkube-test.conflist").write_text(json.dumps(cni_conflist(self.paths)))
        self._spawn("containerd", ["containerd", "--config", str(self.paths.containerd_config)],
                    env={**os.environ, "PATH": NO_IPTABLES_PATH + ":/usr/sbin"})
        self._wait("containerd", lambda: self.ctr("version", check=False).returncode == 0, timeout)

    def ctr(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return run("ctr", "--address", str(self.paths.containerd_socket), "--namespace", "k8s.io", *args,
                    check=check, timeout=timeout)

    def import_image(self, archive: Path) -> None:
        """Loads an OCI or docker archive into the node's containerd (pods use it with imagePullPolicy: Never).
        A restarted node (stop() then start()) imports it again."""
        self.ctr("images", "import", str(archive), timeout=IMPORT_TIMEOUT)
        if archive not in self._imported:
            self._imported.append(archive)

    def _import_test_images(self) -> None:
        """The pod sandbox image (containerd's sandbox_image) and a one-file busybox image with a shell."""
        pause = ImageSpec(PAUSE_IMAGE, [ImageFile("pause", Path(self.binaries["LMKUBE_PAUSE"]))], ["/pause"])
        busybox = ImageSpec(BUSYBOX_IMAGE, [
            ImageFile("bin/busybox", Path(self.binaries["LMKUBE_BUSYBOX"])), ImageFile("bin/sh", link_to="busybox"),
            ImageFile("tmp/.keep", data=b"", mode=0o644),
        ], ["/bin/sh", "-c"])
        for spec in (pause, busybox):
            self.import_image(write_oci_archive(spec, self.paths.root / f"{spec.name.rsplit('/', 1)[-1]}.tar"))

    def _start_kubelet(self, timeout: float) -> None:
        port, healthz = _free_ports(2)
        self.paths.kubelet_config.write_text(kubelet_configuration(self.paths, port, healthz))
        self._spawn("kubelet", [
            self.binaries["LMKUBE_KUBELET"], "--config", str(self.paths.kubelet_config),
            "--kubeconfig", str(self.cluster.kubeconfig), "--hostname-override", self.name,
            "--node-ip", NODE_IP, "--root-dir", str(self.paths.kubelet_root),
            "--cert-dir", str(self.paths.root / "kubelet-certs"), "--v", "1",
        ], env={**os.environ, "PATH": NO_IPTABLES_PATH})
        self._wait("kubelet", lambda: self._healthz(healthz), timeout)

    @staticmethod
    def _healthz(port: int) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def _start_scheduler(self, timeout: float) -> None:
        (port,) = _free_ports(1)
        process = subprocess.Popen([
            self.binaries["LMKUBE_KUBE_SCHEDULER"], "--kubeconfig", str(self.cluster.kubeconfig),
            "--authentication-kubeconfig", str(self.cluster.kubeconfig),
            "--authorization-kubeconfig", str(self.cluster.kubeconfig),
            "--leader-elect=false", "--bind-address", "127.0.0.1", "--secure-port", str(port),
        ], stdout=(self.paths.root / "kube-scheduler.log").open("ab"), stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True)
        self._processes["kube-scheduler"] = process
        self.state["pids"].append([process.pid, start_time(process.pid)])
        self._save_state()
        self._wait("kube-scheduler", lambda: _https_ok(f"https://127.0.0.1:{port}/healthz"), timeout)

    def _start_kube_proxy(self, timeout: float) -> None:
        metrics, healthz = _free_ports(2)
        config = self.paths.root / "kube-proxy.yaml"
        config.write_text(kube_proxy_configuration(self.cluster.kubeconfig, self.name, metrics, healthz))
        self._spawn("kube-proxy", [self.binaries["LMKUBE_KUBE_PROXY"], "--config", str(config)],
                    env={**os.environ, "PATH": NO_IPTABLES_PATH + ":/usr/sbin"})
        self._wait("kube-proxy", lambda: self._healthz(healthz), timeout)

    def _expose_apiserver(self) -> None:
        """In-cluster clients use the `kubernetes` Service (10.0.0.1:443); the test apiserver keeps no
        endpoints for it (--endpoint-reconciler-type none: it listens on loopback), so the node gives it one:
        its bridge address, forwarded to the apiserver."""
        self._forwarder = TcpForwarder(NODE_IP, APISERVER_NODE_PORT, "127.0.0.1", self.cluster.api_port).start()
        endpoint_slice = {
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "kubernetes", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "kubernetes"}},
            "addressType": "IPv4", "endpoints": [{"addresses": [NODE_IP], "conditions": {"ready": True}}],
            "ports": [{"name": "https", "port": APISERVER_NODE_PORT, "protocol": "TCP"}],
        }
        self.cluster.kubectl("apply", "-f", "-", input=json.dumps(endpoint_slice))

    # -- the Node object ---------------------------------------------------------------------------

    def node(self) -> dict[str, Any]:
        return json.loads(self.cluster.kubectl("get", "node", self.name, "-o", "json").stdout)

    def wait_ready(self, timeout: float = 180) -> None:
        """Until the Node is Ready and untainted (the node-lifecycle controller removes not-ready taints)."""
        def ready() -> bool:
            result = self.cluster.kubectl("get", "node", self.name, "-o", "json", check=False)
            if result.returncode != 0:
                return False
            node = json.loads(result.stdout)
            conditions = {c["type"]: c["status"] for c in node["status"].get("conditions") or []}
            return conditions.get("Ready") == "True" and not node["spec"].get("taints")

        self._wait("kubelet", ready, timeout)

    def set_capacity(self, resources: dict[str, str | None]) -> None:
        """Patches the Node's status.capacity (the documented way to advertise extended resources such as
        nvidia.com/gpu); None removes a resource. The kubelet keeps what was added until it restarts."""
        patch = [{"op": "add" if value is not None else "remove",
                  "path": f"/status/capacity/{name.replace('/', '~1')}", **({"value": value} if value else {})}
                 for name, value in resources.items()]
        self.cluster.kubectl("patch", "node", self.name, "--subresource", "status", "--type", "json",
                             "-p", json.dumps(patch))
