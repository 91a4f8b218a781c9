"""A process's RSS and CPU time, sampled in a thread from /proc."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

PAGE = 4096  # /proc/<pid>/statm counts pages
TICKS = 100  # /proc/<pid>/stat counts CPU time in clock ticks (USER_HZ)


@dataclass
class Footprint:
    """RSS and CPU time of one process, sampled in a thread."""

    pid: int
    peak_rss: int = 0
    samples: list[tuple[float, int, float]] = field(default_factory=list)  # (monotonic, rss bytes, cpu seconds)
    _stop: threading.Event = field(default_factory=threading.Event)

    def read(self) -> tuple[int, float]:
        rss = int(Path(f"/proc/{self.pid}/statm").read_text().split()[1]) * PAGE
        fields = Path(f"/proc/{self.pid}/stat").read_text().rpartition(")")[2].split()
        return rss, (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime

    def start(self) -> Footprint:
        threading.Thread(target=self._sample, daemon=True).start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            try:
                rss, cpu = self.read()
            except (OSError, ValueError, IndexError):
                return
            self.peak_rss = max(self.peak_rss, rss)
            self.samples.append((time.monotonic(), rss, cpu))

    def stop(self) -> None:
        self._stop.set()

    def cpu_over(self, seconds: float) -> float:
        """Cores used over the next `seconds`."""
        _, before = self.read()
        began = time.monotonic()
        time.sleep(seconds)
        _, after = self.read()
        return (after - before) / (time.monotonic() - began)

    def settled_rss(self, seconds: float) -> int:
        """RSS after `seconds` (the lowest of the last few samples: one pass in flight is no leak)."""
        time.sleep(seconds)
        recent = [rss for at, rss, _ in self.samples if at >= time.monotonic() - 3]
        return min(recent) if recent else self.read()[0]
