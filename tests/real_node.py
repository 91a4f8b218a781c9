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
import fcntl
import json
import os
import shutil
import signal
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
from tcp_forward import TcpForwarder

STATE_DIR = Path("/run/lmkube-test-node")
STATE_FILE = STATE_DIR / "state.json"
CGROUP_BASE = Path("/sys/fs/cgroup")
# kubelet's wanted values (pkg/kubelet/cm setupKernelTunables); it writes any that differ.
KUBELET_SYSCTLS = {"vm/overcommit_memory": "1", "vm/panic_on_oom": "0", "kernel/panic": "10",
                   "kernel/panic_on_oops": "1", "kernel/keys/root_maxkeys": "1000000",
                   "kernel/keys/root_maxbytes": "25000000"}
HARD_CODED_DIRS = (Path("/run/containerd"), Path("/var/lib/kubelet"), Path("/var/lib/cni"))
BUSYBOX_IMAGE = "localhost/lmkube-test/busybox:v1"
# A PATH without iptables (kubelet programs firewall rules whenever it finds the binary).
NO_IPTABLES_PATH = "/usr/local/bin:/usr/bin"
REQUIRED_COMMANDS = ("containerd", "containerd-shim-runc-v2", "ctr", "runc", "nft", "ip", "unshare", "nsenter")
CNI_PLUGINS = ("bridge", "host-local", "loopback")
CAP_NET_ADMIN, CAP_SYS_ADMIN = 12, 21
# Where pods reach the apiserver (the `kubernetes` Service's endpoint): forwarded to its loopback port.
APISERVER_NODE_PORT = 6443
IMPORT_TIMEOUT = 900  # the project image (~1 GB) unpacked on a busy 2-core machine


def take_lock() -> IO[str]:
    """The node's lock. A run that leaves removes the lock file (and the directory): a run that was waiting on
    the old file then holds a lock nobody else sees, so it locks the file that is there now instead."""
    while True:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        lock = (STATE_DIR / "lock").open("w")
        fcntl.flock(lock, fcntl.LOCK_EX)
        with contextlib.suppress(FileNotFoundError):
            if os.fstat(lock.fileno()).st_ino == os.stat(STATE_DIR / "lock").st_ino:
                return lock
        lock.close()


class RealNodeUnavailable(RuntimeError):
    """This machine cannot run the real node; the message says what is missing."""


def preflight(binaries: dict[str, str]) -> None:
    """Raises RealNodeUnavailable naming everything missing (root, capabilities, cgroups, programs)."""
    problems = []
    if os.geteuid() != 0:
        problems.append("must run as root (containerd, kubelet, network and mount namespaces)")
    effective = int(next(line.split()[1] for line in Path("/proc/self/status").read_text().splitlines()
                         if line.startswith("CapEff:")), 16)
    problems += [f"needs {name}" for bit, name in ((CAP_NET_ADMIN, "CAP_NET_ADMIN (the pod bridge)"),
                                                   (CAP_SYS_ADMIN, "CAP_SYS_ADMIN (mounts, namespaces)"))
                 if not effective >> bit & 1]
    if not (CGROUP_BASE / "memory" / "memory.limit_in_bytes").exists():
        problems.append(f"needs cgroup v1 controllers under {CGROUP_BASE} (memory, cpu, pids, ...): "
                        "this harness drives kubelet with the cgroupfs driver on a v1/hybrid host")
    search_path = f"{os.environ['PATH']}:/usr/sbin"
    problems += [f"`{command}` not found (scripts/install-test-cluster.sh installs it)"
                 for command in REQUIRED_COMMANDS if shutil.which(command, path=search_path) is None]
    problems += [f"CNI plugin /usr/lib/cni/{name} missing (Debian containernetworking-plugins)"
                 for name in CNI_PLUGINS if not Path(f"/usr/lib/cni/{name}").exists()]
    problems += [f"{key} missing from scripts/install-test-cluster.sh's output"
                 for key in ("LMKUBE_KUBELET", "LMKUBE_KUBE_SCHEDULER", "LMKUBE_KUBE_PROXY", "LMKUBE_PAUSE",
                             "LMKUBE_BUSYBOX")
                 if not binaries.get(key) or not os.access(binaries[key], os.X_OK)]
    if problems:
        raise RealNodeUnavailable("the real test node cannot start on this machine:\n  - " + "\n  - ".join(problems))


def _run(*command: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, check=check, timeout=timeout)


def _cgroup_hierarchies() -> list[Path]:
    return sorted(path for path in CGROUP_BASE.iterdir() if path.is_dir() and (path / "cgroup.procs").exists())


def _kill_cgroup_tree(root: Path) -> None:
    """SIGKILLs every process in the cgroup tree under `root`, then removes its directories bottom-up."""
    if not root.exists():
        return
    deadline = time.monotonic() + 60
    while True:
        directories = sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
        for directory in [*directories, root]:
            with contextlib.suppress(OSError):
                for pid in (directory / "cgroup.procs").read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
            with contextlib.suppress(OSError):
                directory.rmdir()
        if not root.exists() or time.monotonic() > deadline:
            return
        time.sleep(0.2)


def start_time(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot, /proc/PID/stat field 22); None if it is dead.
    With the pid, it identifies a process: pids and namespace ids are reused once freed."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    return None if fields[0] in ("Z", "X") else int(fields[19])  # a zombie is already dead


def _pids_in_mount_namespace(namespace: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            with contextlib.suppress(OSError):
                if os.readlink(entry / "ns" / "mnt") == namespace:
                    pids.append(int(entry.name))
    return pids


def _recorded_pids(state: dict[str, Any]) -> list[int]:
    """The node's own processes still alive: a recorded pid counts only with its recorded start time (a pid
    reused by another program since is not the node's)."""
    alive = []
    for entry in state.get("pids", []):
        pid, started = entry if isinstance(entry, list) else (entry, None)
        if started is not None and start_time(pid) == started:
            alive.append(pid)
    return alive


def clean_up(state: dict[str, Any]) -> None:
    """Undoes everything a node recorded in `state` (also for a run that was killed): its processes, pod
    cgroups, bridge, nft tables, the directories it created, its working directory."""
    namespace = state.get("mount_namespace")
    holder = state.get("holder")  # [pid, start time] of the sleeping process that holds the namespace open
    # A mount namespace's id is reused once the namespace is gone (e.g. by a build tool's next `unshare`), so
    # its members are the node's only while the holder lives: they go first, the holder last.
    holder_alive = bool(holder) and start_time(holder[0]) == holder[1]
    for _ in range(100):  # containerd, shims, kubelet, kube-proxy, kube-scheduler
        members = _pids_in_mount_namespace(namespace) if namespace and holder_alive else []
        pids = sorted({*members, *_recorded_pids(state)} - {holder[0] if holder else -1})
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    if holder_alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(holder[0], signal.SIGKILL)
    for hierarchy in _cgroup_hierarchies():
        _kill_cgroup_tree(hierarchy / CGROUP_ROOT)
    # Pod network namespaces die with their last process and pin, taking their veths along.
    if Path(f"/sys/class/net/{BRIDGE}").exists():
        _run("ip", "link", "delete", BRIDGE, check=False)
    for family in ("ip", "ip6"):
        _run("nft", "delete", "table", family, "kube-proxy", check=False)
    for directory in reversed(state.get("created_dirs", [])):
        with contextlib.suppress(OSError):
            Path(directory).rmdir()
    if state.get("workdir"):
        shutil.rmtree(state["workdir"], ignore_errors=True)
    STATE_FILE.unlink(missing_ok=True)


def host_snapshot() -> dict[str, Any]:
    """What a node must leave as it found it: network links, mounts, sysctls kubelet and kube-proxy care
    about, nft tables, cgroup trees, the hard-coded directories, processes in other mount namespaces."""
    sysctls = [*(f"/proc/sys/{key}" for key in KUBELET_SYSCTLS), "/proc/sys/net/ipv4/ip_forward",
               "/proc/sys/net/ipv4/conf/all/route_localnet", "/proc/sys/net/bridge/bridge-nf-call-iptables",
               "/proc/sys/net/netfilter/nf_conntrack_max"]
    links = [line.split(":")[1].strip().split("@")[0] for line in _run("ip", "-o", "link").stdout.splitlines()]
    # Only what a node could have made: other work on the machine may mount or link things meanwhile.
    mounts = [line for line in Path("/proc/self/mounts").read_text().splitlines()
              if any(mark in line for mark in ("containerd", "kubelet", "/var/lib/cni", CGROUP_ROOT, "/proc/sys",
                                               "real-node", "netns"))]
    return {
        "links": sorted(name for name in links if name == BRIDGE or name.startswith("veth")),
        "mounts": sorted(mounts),
        "sysctls": {path: Path(path).read_text().strip() for path in sysctls if Path(path).exists()},
        "nft_tables": sorted(_run("nft", "list", "tables", check=False).stdout.splitlines()),
        "cgroups": sorted(str(h / CGROUP_ROOT) for h in _cgroup_hierarchies() if (h / CGROUP_ROOT).exists()),
        "hard_coded_dirs": sorted(str(d) for d in HARD_CODED_DIRS if d.exists()),
    }


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
        self._lock = take_lock()  # another run's node: wait for it to finish
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
        for hierarchy in _cgroup_hierarchies():  # the pods' processes, before containerd goes
            _kill_cgroup_tree(hierarchy / CGROUP_ROOT)
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
        _run("ip", "link", "add", BRIDGE, "type", "bridge")
        _run("ip", "addr", "add", f"{NODE_IP}/24", "dev", BRIDGE)
        _run("ip", "link", "set", BRIDGE, "up")
        # Pod -> ClusterIP -> pod traffic is routed by the node between ports of this bridge: forwarding on
        # this one device (which goes with it), not the host-wide ip_forward.
        Path(f"/proc/sys/net/ipv4/conf/{BRIDGE}/forwarding").write_text("1\n")

    def _create_cgroup_root(self) -> None:
        """kubelet wants its cgroupRoot to exist in every hierarchy; a cpuset child starts with no CPUs."""
        for hierarchy in _cgroup_hierarchies():
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
            _run(*enter, "mount", "-t", "tmpfs", "-o", "mode=0755", "lmkube-test", str(directory))
        self.paths.sysctl_dir.mkdir(parents=True, exist_ok=True)
        for key, value in KUBELET_SYSCTLS.items():
            stand_in = self.paths.sysctl_dir / key.replace("/", ".")
            stand_in.write_text(f"{value}\n")
            _run(*enter, "mount", "--bind", str(stand_in), f"/proc/sys/{key}")

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
        return _run("ctr", "--address", str(self.paths.containerd_socket), "--namespace", "k8s.io", *args,
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
