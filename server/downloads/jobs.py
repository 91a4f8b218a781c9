"""Download jobs and their table, persisted as `$LMKUBE_HOME/downloads.json` (written atomically)."""

from __future__ import annotations

import json
import logging
import os
import secrets
import tempfile
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

Status = Literal["downloading", "paused", "completed", "failed"]
_RATE_WINDOW_S = 5.0


def iso(ts: float | None) -> str | None:
    """LM Studio's timestamp form: `2025-10-03T15:33:23.496Z`."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def new_job_id() -> str:
    return "job_" + secrets.token_hex(5)


@dataclass
class DownloadJob:
    job_id: str
    repo_id: str
    revision: str
    model_key: str  # "publisher/repo", lower-case: the store key the files land under
    files: list[dict[str, Any]]  # {"name", "size", "sha256"}
    status: Status = "downloading"
    total_size_bytes: int = 0
    downloaded_bytes: int = 0
    started_at: float = field(default_factory=time.time)
    completed_at: float | None = None
    error: str | None = None
    _samples: deque[tuple[float, int]] = field(default_factory=deque, repr=False, compare=False)

    @property
    def key(self) -> tuple[str, ...]:
        """What makes two requests the same download: the destination files."""
        return tuple(sorted(f"{self.model_key}/{f['name']}".lower() for f in self.files))

    def progress(self, downloaded: int) -> None:
        now = time.monotonic()
        self.downloaded_bytes = downloaded
        samples = self._samples
        samples.append((now, downloaded))
        while len(samples) > 2 and now - samples[0][0] > _RATE_WINDOW_S:
            samples.popleft()

    def bytes_per_second(self) -> float:
        if len(self._samples) < 2:
            return 0.0
        (t0, b0), (t1, b1) = self._samples[0], self._samples[-1]
        return max(b1 - b0, 0) / (t1 - t0) if t1 > t0 else 0.0

    def public(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "job_id": self.job_id,
            "status": self.status,
            "total_size_bytes": self.total_size_bytes,
            "downloaded_bytes": self.downloaded_bytes,
            "started_at": iso(self.started_at),
        }
        if self.status == "downloading":
            rate = self.bytes_per_second()
            body["bytes_per_second"] = round(rate, 1)
            remaining = max(self.total_size_bytes - self.downloaded_bytes, 0)
            body["estimated_completion"] = iso(time.time() + remaining / rate) if rate > 0 else None
        if self.completed_at is not None:
            body["completed_at"] = iso(self.completed_at)
        if self.error:
            body["error"] = self.error
        return body

    def record(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("_samples")
        return data

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> DownloadJob:
        names = set(cls.__dataclass_fields__) - {"_samples"}
        return cls(**{k: v for k, v in data.items() if k in names})


class JobTable:
    """The jobs of this server (and those persisted by earlier runs). Thread-safe."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.RLock()
        self.jobs: dict[str, DownloadJob] = {}
        self._load()

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable download table %s: %s", self.path, exc)
            return
        for record in data.get("jobs", []):
            try:
                job = DownloadJob.from_record(record)
            except TypeError as exc:
                log.warning("ignoring bad download job record %r: %s", record, exc)
                continue
            if job.status == "downloading":  # the server stopped mid-download: its partial files remain
                job.status = "paused"
            self.jobs[job.job_id] = job

    def get(self, job_id: str) -> DownloadJob | None:
        with self.lock:
            return self.jobs.get(job_id)

    def add(self, job: DownloadJob) -> None:
        with self.lock:
            self.jobs[job.job_id] = job
            self.save()

    def find(self, key: tuple[str, ...]) -> list[DownloadJob]:
        with self.lock:
            return [j for j in self.jobs.values() if j.key == key]

    def save(self) -> None:
        """Write the table atomically: a reader (or a restart) sees the old table or the new one."""
        with self.lock:
            payload = json.dumps({"jobs": [j.record() for j in self.jobs.values()]}, indent=1)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(payload)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
