"""Where the operator's memory is, on request: `LMKUBE_OPERATOR_MEMORY_REPORT=<file>` makes SIGUSR1 append a
report to <file> (a diagnostic, not for production: tracemalloc slows every allocation).

Each report accounts for the resident set in layers, so growth that is no live object shows as such:

- RSS and the process's threads (each thread that ran Python keeps its stack and, in glibc, may keep a malloc
  arena of its own);
- glibc's heap (`mallinfo2`): bytes in use, bytes free but kept (what `malloc_trim` can give back), mmapped;
- pymalloc, the allocator of small Python objects: arenas mapped, bytes in live blocks, bytes free in them
  (an arena goes back to the system only once every block in it is free);
- tracemalloc, started by the first report (the baseline; tracing from the start would slow the operator's
  start-up several times over): bytes allocated since then and still live, and the 15 places holding most
  of them.

`LMKUBE_OPERATOR_MEMORY_REPORT_FRAMES` (default 8): frames kept per allocation; the report groups by the
innermost one that is not in the standard library's threading or json machinery. 0: no tracemalloc, which
is what lets pymalloc report (its statistics are off while tracemalloc wraps the allocator).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import re
import signal
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Mapping
from pathlib import Path
from types import FrameType

MIB = 1 << 20
_COUNTS = ("arenas", "highwater")
_GENERIC = ("/threading.py", "/json/", "/concurrent/futures/", "/queue.py", "/asyncio/")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def glibc_heap() -> dict[str, int]:
    """glibc's own accounting (all arenas), or {} where there is no mallinfo2 (not glibc, or before 2.33)."""
    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return {}
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return {"in_use": info.uordblks + info.hblkhd, "free_kept": info.fordblks, "mmapped": info.hblkhd,
            "trimmable_top": info.keepcost}


def pymalloc_stats() -> dict[str, int]:
    """Arenas, live and free block bytes from sys._debugmallocstats (which writes to the C-level stderr)."""
    with tempfile.TemporaryFile() as out:
        saved = os.dup(2)
        try:
            sys.stderr.flush()
            os.dup2(out.fileno(), 2)
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        out.seek(0)
        text = out.read().decode(errors="replace")

    def number(pattern: str) -> int:
        found = re.search(pattern, text, re.MULTILINE)
        return int(found.group(1).replace(",", "")) if found else -1

    return {"arenas": number(r"^# arenas allocated current\s*=\s*([\d,]+)"),
            "arena_bytes": number(r"^\d+ arenas \* \d+ bytes/arena\s*=\s*([\d,]+)"),
            "live_blocks": number(r"^# bytes in allocated blocks\s*=\s*([\d,]+)"),
            "free_blocks": number(r"^# bytes in available blocks\s*=\s*([\d,]+)"),
            "free_pools": number(r"^\d+ unused pools \* \d+ bytes\s*=\s*([\d,]+)"),
            "highwater": number(r"^# arenas highwater mark\s*=\s*([\d,]+)")}


def resident_by_mapping() -> dict[str, int]:
    """Resident bytes by kind of mapping (/proc/self/smaps): glibc's main heap, 8 MiB anonymous mappings (thread
    stacks), other anonymous ones (pymalloc's arenas, glibc's per-thread arenas, large allocations: the kernel
    merges neighbours, so sizes tell no more), and files (code and data of libraries)."""
    kinds: dict[str, int] = {}
    kind = "files"
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and not fields[0].endswith(":"):
            start, end = (int(part, 16) for part in fields[0].split("-"))
            path = fields[5] if len(fields) > 5 else ""
            size = end - start
            kind = ("heap" if path == "[heap]" else "stacks" if not path and size == 8 * MIB else
                    "anonymous" if not path else "files")
        elif fields[0] == "Rss:":
            kinds[kind] = kinds.get(kind, 0) + int(fields[1]) * 1024
    return kinds


def open_sockets() -> int:
    fds = Path("/proc/self/fd")
    count = 0
    for fd in fds.iterdir():
        with contextlib.suppress(OSError):
            count += os.readlink(fd).startswith("socket:")
    return count


def resident() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _site(trace: tracemalloc.Traceback) -> str:
    for frame in trace:  # innermost first
        if not any(part in frame.filename for part in _GENERIC):
            return f"{frame.filename.rsplit('site-packages/', 1)[-1]}:{frame.lineno}"
    return f"{trace[0].filename}:{trace[0].lineno}"


class MemoryReport:
    def __init__(self, path: Path, frames: int = 8) -> None:
        self.path = path
        self.frames = frames

    def by_site(self) -> dict[str, int]:
        sites: dict[str, int] = {}
        if not tracemalloc.is_tracing():
            return sites
        for stat in tracemalloc.take_snapshot().statistics("traceback"):
            site = _site(stat.traceback)
            sites[site] = sites.get(site, 0) + stat.size
        return sites

    def write(self, label: str = "") -> None:
        gc.collect()
        traced, traced_peak = tracemalloc.get_traced_memory()
        tracing = (f"tracemalloc: live since the baseline {traced / MIB:.1f} MiB (peak {traced_peak / MIB:.1f}, "
                   f"its own {tracemalloc.get_tracemalloc_memory() / MIB:.1f})" if tracemalloc.is_tracing()
                   else "pymalloc " + _mib(pymalloc_stats()))
        lines = [f"=== memory report {time.strftime('%H:%M:%S')} {label}".rstrip(),
                 f"rss {resident() / MIB:.1f} MiB; threads {threading.active_count()}; gc objects "
                 f"{len(gc.get_objects())}; sockets {open_sockets()}",
                 "resident " + _mib(resident_by_mapping()), tracing, "glibc " + _mib(glibc_heap())]
        if tracemalloc.is_tracing():
            top = sorted(((size, site) for site, size in self.by_site().items()), reverse=True)[:15]
            lines += [f"  {size / 1024:10.1f} KiB  {site}" for size, site in top]
        elif self.frames:
            tracemalloc.start(self.frames)
            lines.append("(baseline: tracing allocations from here)")
        with self.path.open("a") as out:
            out.write("\n".join(lines) + "\n")

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        del signum, frame
        # A handler thread: the report takes a snapshot and a gc pass, too long for a signal handler's frame.
        threading.Thread(target=self.write, name="lmkube-memory-report", daemon=True).start()


def _mib(values: Mapping[str, int]) -> str:
    return ", ".join(f"{name} {value}" if name in _COUNTS else f"{name} {value / MIB:.1f} MiB"
                     for name, value in values.items()) or "n/a"


def install_from_env(environ: Mapping[str, str] | None = None) -> MemoryReport | None:
    """Starts tracemalloc and the SIGUSR1 report when LMKUBE_OPERATOR_MEMORY_REPORT names a file."""
    env = os.environ if environ is None else environ
    target = env.get("LMKUBE_OPERATOR_MEMORY_REPORT")
    if not target:
        return None
    report = MemoryReport(Path(target), frames=int(env.get("LMKUBE_OPERATOR_MEMORY_REPORT_FRAMES") or 8))
    with contextlib.suppress(ValueError):  # not the main thread (an operator run in a test's thread)
        signal.signal(signal.SIGUSR1, report.on_signal)
    return report
