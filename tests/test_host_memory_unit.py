"""The host memory a load may take (server/runtime/host_memory.py), read from /proc and cgroup trees laid out
as the kernel lays them out (cgroup v2 in a pod, v2 with the cgroup path visible, v1, no limit): a memory-limited
container's headroom counts, not the whole machine's MemAvailable."""

from __future__ import annotations

from pathlib import Path

from lmkube.server.runtime.host_memory import HostMemory, available_host_memory, host_cache_budget, host_memory

GIB = 1 << 30
MACHINE_FREE = 60 * GIB  # what /proc/meminfo says: the node's memory, not the container's


def fake_proc(root: Path, cgroup_lines: str) -> Path:
    proc = root / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text(f"MemTotal:       67108864 kB\nMemAvailable:   {MACHINE_FREE // 1024} kB\n")
    (proc / "self" / "cgroup").write_text(cgroup_lines)
    return proc


def write_group(directory: Path, files: dict[str, str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text)


def test_a_v2_pod_limit_caps_the_machines_free_memory(tmp_path: Path) -> None:
    # In a pod (cgroup namespace) the process sees "0::/" and its own cgroup at the mount's root.
    proc = fake_proc(tmp_path, "0::/\n")
    cgroups = tmp_path / "cgroup"
    write_group(cgroups, {"memory.max": f"{2 * GIB}\n", "memory.current": f"{GIB}\n",
                          "memory.stat": f"anon 536870912\ninactive_file {GIB // 2}\nactive_file 0\n"})
    # 2 GiB limit, 1 GiB used of which 0.5 GiB is reclaimable file cache: 1.5 GiB left.
    assert available_host_memory(proc, cgroups) == 2 * GIB - GIB // 2


def test_the_tightest_visible_ancestor_counts(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, "0::/kubepods/pod1/ctr\n")
    cgroups = tmp_path / "cgroup"
    write_group(cgroups / "kubepods", {"memory.max": f"{8 * GIB}\n", "memory.current": f"{7 * GIB}\n"})
    write_group(cgroups / "kubepods" / "pod1", {"memory.max": "max\n", "memory.current": f"{GIB}\n"})
    write_group(cgroups / "kubepods" / "pod1" / "ctr", {"memory.max": f"{4 * GIB}\n", "memory.current": f"{GIB}\n"})
    assert available_host_memory(proc, cgroups) == GIB  # the node's pods leave 1 GiB, the container 3 GiB


def test_v1_memory_controller_and_its_unlimited_value(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, "4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n0::/\n")
    cgroups = tmp_path / "cgroup"
    write_group(cgroups / "memory", {"memory.limit_in_bytes": "9223372036854771712\n",
                                     "memory.usage_in_bytes": f"{30 * GIB}\n"})
    write_group(cgroups / "memory" / "docker" / "abc", {
        "memory.limit_in_bytes": f"{3 * GIB}\n", "memory.usage_in_bytes": f"{2 * GIB}\n",
        "memory.stat": f"cache 0\ninactive_file 5\ntotal_inactive_file {GIB}\n"})
    assert available_host_memory(proc, cgroups) == 2 * GIB


def test_without_a_limit_the_machines_free_memory_counts(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, "0::/user.slice/session\n")
    cgroups = tmp_path / "cgroup"
    write_group(cgroups / "user.slice" / "session", {"memory.max": "max\n", "memory.current": f"{GIB}\n"})
    assert available_host_memory(proc, cgroups) == MACHINE_FREE
    # A limit larger than what the machine has free does not raise the figure either.
    write_group(cgroups / "user.slice", {"memory.max": f"{100 * GIB}\n", "memory.current": f"{GIB}\n"})
    assert available_host_memory(proc, cgroups) == MACHINE_FREE
    # And with no cgroup information at all, MemAvailable alone.
    (proc / "self" / "cgroup").unlink()
    assert available_host_memory(proc, cgroups) == MACHINE_FREE


def test_the_limit_reported_is_the_one_that_binds(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, "0::/kubepods/pod1/ctr\n")
    cgroups = tmp_path / "cgroup"
    write_group(cgroups / "kubepods", {"memory.max": f"{8 * GIB}\n", "memory.current": f"{2 * GIB}\n"})
    write_group(cgroups / "kubepods" / "pod1" / "ctr", {"memory.max": f"{4 * GIB}\n", "memory.current": f"{GIB}\n"})
    # The container's 3 GiB left is tighter than the 6 GiB its ancestor leaves: its 4 GiB limit is named.
    assert host_memory(proc, cgroups) == HostMemory(3 * GIB, 4 * GIB)
    # A limit with more room left than the machine has free caps nothing, and names no limit.
    write_group(cgroups / "kubepods" / "pod1" / "ctr", {"memory.max": f"{100 * GIB}\n"})
    write_group(cgroups / "kubepods", {"memory.max": f"{100 * GIB}\n"})
    assert host_memory(proc, cgroups) == HostMemory(MACHINE_FREE)


def test_a_namespaced_child_cgroup_counts_up_to_the_namespace_root(tmp_path: Path) -> None:
    # In a cgroup namespace the mount's root is the container; the process may sit in a child of it.
    proc = fake_proc(tmp_path, "0::/init\n")
    cgroups = tmp_path / "cgroup"
    write_group(cgroups, {"memory.max": f"{GIB}\n", "memory.current": f"{GIB // 4}\n"})
    write_group(cgroups / "init", {"memory.max": "max\n", "memory.current": f"{GIB // 4}\n"})
    assert host_memory(proc, cgroups) == HostMemory(GIB - GIB // 4, GIB)
    # Moved out of the namespace's root, it sees a path leading up out of the mount: nothing outside is read.
    (proc / "self" / "cgroup").write_text("0::/../other\n")
    write_group(tmp_path / "other", {"memory.max": "1\n", "memory.current": "0\n"})
    assert host_memory(proc, cgroups) == HostMemory(GIB - GIB // 4, GIB)


def test_a_v1_v2_hybrid_reads_the_v1_memory_controller(tmp_path: Path) -> None:
    # Hybrid hosts (this project's test machines): cgroup2 at /sys/fs/cgroup/unified without the memory
    # controller, so /sys/fs/cgroup itself holds no memory.max; the v1 memory hierarchy has the limit.
    proc = fake_proc(tmp_path, "9:name=systemd:/\n4:memory:/process_api/abc\n1:cpu:/\n0::/\n")
    cgroups = tmp_path / "cgroup"
    write_group(cgroups / "unified", {"cgroup.controllers": "\n"})
    write_group(cgroups / "memory" / "process_api" / "abc", {
        "memory.limit_in_bytes": f"{2 * GIB}\n", "memory.usage_in_bytes": f"{GIB}\n",
        "memory.stat": "total_inactive_file 0\n"})
    assert host_memory(proc, cgroups) == HostMemory(GIB, 2 * GIB)


def test_odd_figures_stay_within_zero_and_the_limit(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, "0::/\n")
    cgroups = tmp_path / "cgroup"
    # Usage over the limit (the kernel is reclaiming right now): nothing is left, not a negative figure.
    write_group(cgroups, {"memory.max": f"{GIB}\n", "memory.current": f"{GIB + 4096}\n"})
    assert available_host_memory(proc, cgroups) == 0
    # More inactive file cache than usage (the figures are read at different moments): the whole limit.
    write_group(cgroups, {"memory.current": f"{GIB // 2}\n", "memory.stat": f"inactive_file {GIB}\n"})
    assert available_host_memory(proc, cgroups) == GIB
    # A limit without a readable usage still bounds what is left.
    (cgroups / "memory.current").unlink()
    assert host_memory(proc, cgroups) == HostMemory(GIB, GIB)
    # Garbage where a number belongs is no limit, not a crash.
    write_group(cgroups, {"memory.max": "lots\n"})
    assert host_memory(proc, cgroups) == HostMemory(MACHINE_FREE)


def test_this_machine_reports_a_positive_figure() -> None:
    free = available_host_memory()
    assert free is not None and free > 0


def test_the_host_cache_gets_half_of_what_a_memory_limit_leaves() -> None:
    gib = 1 << 30
    assert host_cache_budget(gib, HostMemory(available=512 << 20, limit=2 * gib)) == 256 << 20
    assert host_cache_budget(gib, HostMemory(available=8 * gib, limit=16 * gib)) == gib  # --cache-ram is less
    assert host_cache_budget(gib, HostMemory(available=0, limit=gib)) == 0
    # Without a limit the machine's page cache and swap give way first: --cache-ram as asked.
    assert host_cache_budget(gib, HostMemory(available=100 << 20)) == gib
    assert host_cache_budget(gib, HostMemory(available=None)) == gib
