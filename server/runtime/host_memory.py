"""How much host memory a load may still take: the machine's MemAvailable, or less when the server runs
inside a memory-limited cgroup (a Kubernetes pod, a container run with a memory limit).

/proc/meminfo describes the whole machine: in a pod limited to 2 GiB on a 64 GiB node it reports tens of
GiB free, and a load that "fits" gets the pod OOMKilled instead of a 409. So the limit of the server's own
cgroup, and of each ancestor visible to it, counts too: limit minus usage, where usage leaves out the
inactive file cache the kernel reclaims before it kills anything (as the kubelet's working set does).
cgroup v2 (memory.max, memory.current, memory.stat inactive_file) and v1 (memory.limit_in_bytes,
memory.usage_in_bytes, memory.stat total_inactive_file, which counts the cgroup's descendants too) are read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# cgroup v1 writes "no limit" as a page-rounded LONG_MAX; anything this large is no limit.
_UNLIMITED = 1 << 60


@dataclass(frozen=True)
class HostMemory:
    available: int | None  # bytes a load may still take; None when neither the machine nor a cgroup tells
    limit: int | None = None  # the memory limit of the cgroup that caps `available`; None: MemAvailable does


@dataclass(frozen=True)
class _Headroom:
    free: int  # limit - working set
    limit: int


def host_memory(proc: Path = Path("/proc"), cgroups: Path = Path("/sys/fs/cgroup")) -> HostMemory:
    """MemAvailable, capped by what the process's memory cgroups still allow, and the limit that caps it."""
    machine = _mem_available(proc)
    tightest = min(_cgroup_headrooms(proc, cgroups), key=lambda h: h.free, default=None)
    if tightest is not None and (machine is None or tightest.free < machine):
        return HostMemory(tightest.free, tightest.limit)
    return HostMemory(machine)


def host_cache_budget(requested: int, memory: HostMemory) -> int:
    """The host prompt cache's budget (--cache-ram) for a model just loaded: inside a memory limit, at most half
    of what the limit still leaves. The cache fills as requests come and go, long after the load's memory check,
    and past a pod's limit the kernel kills the whole server."""
    if memory.limit is None or memory.available is None:
        return requested  # MemAvailable alone: the machine's page cache and swap give way first
    return max(0, min(requested, memory.available // 2))


def available_host_memory(proc: Path = Path("/proc"), cgroups: Path = Path("/sys/fs/cgroup")) -> int | None:
    """MemAvailable, capped by what the process's memory cgroups still allow; None when neither is known."""
    return host_memory(proc, cgroups).available


def _mem_available(proc: Path) -> int | None:
    try:
        for line in (proc / "meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_headrooms(proc: Path, cgroups: Path) -> list[_Headroom]:
    """(limit - working set) of every limited memory cgroup from the process's own up to the visible root."""
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return []
    headrooms: list[_Headroom] = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            # v2's one unified hierarchy. On a v1/v2 hybrid host it is mounted elsewhere and carries no memory
            # controller, so /sys/fs/cgroup holds no memory.max and this finds nothing.
            headrooms += _headrooms(cgroups, path, "memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):  # v1: the memory controller's own hierarchy
            headrooms += _headrooms(cgroups / "memory", path, "memory.limit_in_bytes", "memory.usage_in_bytes",
                                    "total_inactive_file")
    return headrooms


def _headrooms(mount: Path, path: str, limit_file: str, usage_file: str, inactive_key: str) -> list[_Headroom]:
    """limit - (usage - inactive file cache) for every limited cgroup from `path` up to the mount's root.

    Inside a container (a cgroup namespace, or v1's bind mount of the container's own cgroup at the mount
    point) `path` may not exist under the mount; the mount's root is then the process's own cgroup."""
    relative = path.strip().lstrip("/")
    own = mount / relative
    # A process outside its cgroup namespace's root sees "/../..." paths: nothing under the mount is its own.
    if ".." in Path(relative).parts or not own.is_dir():
        own = mount
    found: list[_Headroom] = []
    directory = own
    while True:
        limit = _read_int(directory / limit_file)
        if limit is not None and limit < _UNLIMITED:
            usage = _read_int(directory / usage_file)
            # Without a usage figure the limit alone still bounds what is left.
            working_set = 0 if usage is None else max(0, usage - (_stat(directory / "memory.stat", inactive_key) or 0))
            found.append(_Headroom(max(0, limit - working_set), limit))
        if directory == mount or mount not in directory.parents:
            return found
        directory = directory.parent


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # v2's "max" is no limit


def _stat(path: Path, key: str) -> int | None:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return None
