"""What the tests' real node (tests/real_node.py) does to the host, and how it is checked and undone: the one-node
lock, the preflight that says what this machine lacks, the state a killed run leaves for the next one to clean
up, and a snapshot of everything the node must leave as it found it."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import IO, Any

from real_node_config import BRIDGE, CGROUP_ROOT

STATE_DIR = Path("/run/lmkube-test-node")
STATE_FILE = STATE_DIR / "state.json"
CGROUP_BASE = Path("/sys/fs/cgroup")
# kubelet's wanted values (pkg/kubelet/cm setupKernelTunables); it writes any that differ.
KUBELET_SYSCTLS = {"vm/overcommit_memory": "1", "vm/panic_on_oom": "0", "kernel/panic": "10",
                   "kernel/panic_on_oops": "1", "kernel/keys/root_maxkeys": "1000000",
                   "kernel/keys/root_maxbytes": "25000000"}
HARD_CODED_DIRS = (Path("/run/containerd"), Path("/var/lib/kubelet"), Path("/var/lib/cni"))
REQUIRED_COMMANDS = ("containerd", "containerd-shim-runc-v2", "ctr", "runc", "nft", "ip", "unshare", "nsenter")
CNI_PLUGINS = ("bridge", "host-local", "loopback")
CAP_NET_ADMIN, CAP_SYS_ADMIN = 12, 21


def take_lock(directory: Path) -> IO[str]:
    """The lock file `directory`/lock, held (flock). A run that finishes removes the file and the directory, so
    a run that waited on the removed file holds nothing: it takes the lock again, on the file now there."""
    while True:
        directory.mkdir(parents=True, exist_ok=True)
        try:
            lock = (directory / "lock").open("a")
        except FileNotFoundError:  # the finishing run removed the directory in between
            continue
        fcntl.flock(lock, fcntl.LOCK_EX)
        with contextlib.suppress(FileNotFoundError):
            if os.fstat(lock.fileno()).st_ino == (directory / "lock").stat().st_ino:
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


def run(*command: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, check=check, timeout=timeout)


def cgroup_hierarchies() -> list[Path]:
    return sorted(path for path in CGROUP_BASE.iterdir() if path.is_dir() and (path / "cgroup.procs").exists())


def kill_cgroup_tree(root: Path) -> None:
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


def pids_in_mount_namespace(namespace: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            with contextlib.suppress(OSError):
                if os.readlink(entry / "ns" / "mnt") == namespace:
                    pids.append(int(entry.name))
    return pids


def recorded_pids(state: dict[str, Any]) -> list[int]:
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
        members = pids_in_mount_namespace(namespace) if namespace and holder_alive else []
        pids = sorted({*members, *recorded_pids(state)} - {holder[0] if holder else -1})
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    if holder_alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(holder[0], signal.SIGKILL)
    for hierarchy in cgroup_hierarchies():
        kill_cgroup_tree(hierarchy / CGROUP_ROOT)
    # Pod network namespaces die with their last process and pin, taking their veths along.
    if Path(f"/sys/class/net/{BRIDGE}").exists():
        run("ip", "link", "delete", BRIDGE, check=False)
    for family in ("ip", "ip6"):
        run("nft", "delete", "table", family, "kube-proxy", check=False)
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
    links = [line.split(":")[1].strip().split("@")[0] for line in run("ip", "-o", "link").stdout.splitlines()]
    # Only what a node could have made: other work on the machine may mount or link things meanwhile.
    mounts = [line for line in Path("/proc/self/mounts").read_text().splitlines()
              if any(mark in line for mark in ("containerd", "kubelet", "/var/lib/cni", CGROUP_ROOT, "/proc/sys",
                                               "real-node", "netns"))]
    return {
        "links": sorted(name for name in links if name == BRIDGE or name.startswith("veth")),
        "mounts": sorted(mounts),
        "sysctls": {path: Path(path).read_text().strip() for path in sysctls if Path(path).exists()},
        "nft_tables": sorted(run("nft", "list", "tables", check=False).stdout.splitlines()),
        "cgroups": sorted(str(h / CGROUP_ROOT) for h in cgroup_hierarchies() if (h / CGROUP_ROOT).exists()),
        "hard_coded_dirs": sorted(str(d) for d in HARD_CODED_DIRS if d.exists()),
    }
