"""How much host memory a load may still take: the machine's MemAvailable, or less when the server runs
inside a memory-limited cgroup (a Kubernetes pod, a container run with a memory limit).

/proc/meminfo describes the whole machine: in a pod limited to 2 GiB on a 64 GiB node it reports tens of
GiB free, and a load that "fits" gets the pod OOMKilled instead of a 409. So the limit of the server's own
cgroup, and of each ancestor visible to it, counts too: limit minus usage, where usage leaves out the
inactive file cache the kernel reclaims before it kills anything (as the kubelet's working set does).
cgroup v2 (memory.max, memory.current) and v1 (memory.limit_in_bytes, memory.usage_in_bytes) are read.
"""

from __future__ import annotations

from pathlib import Path

# cgroup v1 writes "no limit" as a page-rounded LONG_MAX; anything this large is no limit.
_UNLIMITED = 1 << 60


def available_host_memory(proc: Path = Path("/proc"), cgroups: Path = Path("/sys/fs/cgroup")) -> int | None:
    """MemAvailable, capped by what the process's memory cgroups still allow; None when neither is known."""
    candidates = [n for n in (_mem_available(proc), _cgroup_headroom(proc, cgroups)) if n is not None]
    return min(candidates) if candidates else None


def _mem_available(proc: Path) -> int | None:
    try:
        for line in (proc / "meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_headroom(proc: Path, cgroups: Path) -> int | None:
    """The smallest (limit - working set) over the process's memory cgroup and its visible ancestors."""
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None
    headrooms: list[int] = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":  # v2: one unified hierarchy
            headrooms += _headrooms(cgroups, path, "memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):  # v1: the memory controller's own hierarchy
            headrooms += _headrooms(cgroups / "memory", path, "memory.limit_in_bytes", "memory.usage_in_bytes",
                                    "total_inactive_file")
    return min(headrooms) if headrooms else None


def _headrooms(mount: Path, path: str, limit_file: str, usage_file: str, inactive_key: str) -> list[int]:
    """limit - (usage - inactive file cache) for every limited cgroup from `path` up to the mount's root.

    Inside a container (a cgroup namespace, or the cgroup mounted at its own root) `path` may not exist under
    the mount; the mount's root is then the process's own cgroup."""
    own = mount / path.lstrip("/")
    if not own.is_dir():
        own = mount
    found: list[int] = []
    directory = own
    while True:
        limit = _read_int(directory / limit_file)
        usage = _read_int(directory / usage_file)
        if limit is not None and limit < _UNLIMITED and usage is not None:
            working_set = max(0, usage - (_stat(directory / "memory.stat", inactive_key) or 0))
            found.append(max(0, limit - working_set))
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
