"""Starts, shares, resumes and runs download jobs.

Each file is fetched into `<repo folder>/.downloads/<name>.part` (a hidden folder the store never scans),
resumed with an HTTP Range request from the bytes already there, checked against the hub's sha256 and
only then renamed to its final name. A server killed mid-download leaves the `.part` file; the next
request for the same files resumes it under the same job. Servers sharing the volume take turns per repo
folder (an flock on `<repo folder>/.download.lock`, which NFS and CephFS honour across nodes).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any, BinaryIO

from lmkube.real_model import REAL_MODEL_FILE, REAL_MODEL_KEY, local_real_model_path

from ..demo import link_real_model
from ..store.model_store import ModelNotFound, ModelStore
from ..store.quant import normalize_quant, quant_from_filename
from .jobs import DownloadJob, JobTable, new_job_id
from .resolver import DownloadError, DownloadPlan, Spec, parse_spec, resolve

log = logging.getLogger(__name__)

PARTIAL_DIR = ".downloads"
# Held (flock) by the server downloading into a repo folder; kept, empty, so every server locks the same inode.
LOCK_FILE = ".download.lock"
_LOCK_POLL_S = 0.2
_DISK_MARGIN = 16 * 1024 * 1024  # keep some room beyond the download itself
_SAVE_EVERY_S = 2.0
_CHUNK = 64 * 1024


class _Cancelled(Exception):
    pass


class _ProgressFile:
    """The `.part` file as `http_get` writes it: counts bytes, and stops the download when cancelled."""

    def __init__(self, f: BinaryIO, on_write: Any, cancel: threading.Event) -> None:
        self._f = f
        self._on_write = on_write
        self._cancel = cancel

    def write(self, data: bytes) -> int:
        if self._cancel.is_set():
            raise _Cancelled()
        n = self._f.write(data)
        self._on_write()
        return n

    def tell(self) -> int:
        return self._f.tell()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def truncate(self, size: int | None = None) -> int:
        return self._f.truncate(size)

    def flush(self) -> None:
        self._f.flush()


class DownloadManager:
    def __init__(self, store: ModelStore, table_path: Path) -> None:
        self.store = store
        self.table = JobTable(table_path)
        self._threads: dict[str, threading.Thread] = {}
        self._cancel = threading.Event()
        self._start_lock = threading.Lock()  # one start() at a time decides "same files, same job"
        for job in self.table.jobs.values():
            if job.status == "paused":
                job.downloaded_bytes = self._bytes_on_disk(job)

    # -- requests ---------------------------------------------------------------------------------------

    def start(self, model: str, quantization: str | None = None) -> dict[str, Any]:
        """Handle POST /api/v1/models/download (blocking: the hub is asked for the file list)."""
        spec = parse_spec(model, quantization)
        if not spec.is_url and self._known_locally(spec):
            return {"status": "already_downloaded"}
        if self._link_real_model(spec):
            return {"status": "already_downloaded"}
        if spec.repo_id is None:
            raise DownloadError(404, "model_not_found", f"'{model}' is neither a downloaded model nor a Hugging "
                                "Face repo id (org/name) or URL.")
        plan = resolve(spec)
        model_dir = self.store.model_dir(plan.publisher, plan.repo)
        if all(self._complete(model_dir / f.name, f.size) for f in plan.files):
            return {"status": "already_downloaded"}
        with self._start_lock:
            job = self._shared_job(plan)
            if job is None or job.status in ("failed", "completed"):
                job = DownloadJob(
                    job_id=new_job_id(), repo_id=plan.repo_id, revision=plan.revision,
                    model_key=f"{plan.publisher}/{plan.repo}".lower(),
                    files=[{"name": f.name, "size": f.size, "sha256": f.sha256} for f in plan.files],
                    total_size_bytes=plan.total_size,
                )
            if not self._running(job):
                self._check_space(job, model_dir)
                job.status, job.error, job.completed_at = "downloading", None, None
                job.revision = plan.revision
                job.downloaded_bytes = self._bytes_on_disk(job)
                self.table.add(job)
                thread = threading.Thread(target=self._run, args=(job,), name=f"download-{job.job_id}", daemon=True)
                self._threads[job.job_id] = thread
                thread.start()
        body = job.public()
        del body["downloaded_bytes"]  # the POST answer has LM Studio's four fields (and the error, if any)
        body.pop("bytes_per_second", None)
        body.pop("estimated_completion", None)
        return body

    def status(self, job_id: str) -> dict[str, Any] | None:
        job = self.table.get(job_id)
        return job.public() if job is not None else None

    def close(self) -> None:
        """Stop running downloads (their partial files stay, to be resumed) and persist them as paused."""
        self._cancel.set()
        for thread in list(self._threads.values()):
            thread.join(timeout=5)

    # -- helpers ----------------------------------------------------------------------------------------

    def _known_locally(self, spec: Spec) -> bool:
        name = spec.raw.split("@")[0].split(":")[0] if spec.quantization else spec.raw
        try:
            self.store.resolve(f"{name}@{spec.quantization}" if spec.quantization else name)
        except ModelNotFound:
            return False
        return True

    def _link_real_model(self, spec: Spec) -> bool:
        """Links the real demo model's local copy (baked into the image, cached by set-up) into the store
        when the request names its repo, instead of asking the hub (whose repo has no GGUF anyway): a
        LocalModel of it runs on a cluster without internet access."""
        if (spec.repo_id or "").lower() != REAL_MODEL_KEY or spec.filename or spec.revision:
            return False
        if spec.quantization and normalize_quant(spec.quantization) != quant_from_filename(REAL_MODEL_FILE.name):
            return False
        source = local_real_model_path()
        if source is None:
            return False
        link_real_model(self.store.models_dir, source)
        return True

    def _shared_job(self, plan: DownloadPlan) -> DownloadJob | None:
        key = tuple(sorted(f"{plan.publisher}/{plan.repo}/{f.name}".lower() for f in plan.files))
        jobs = self.table.find(key)
        running = [j for j in jobs if self._running(j)]
        paused = [j for j in jobs if j.status == "paused"]
        return next(iter(running or paused), None)

    def _running(self, job: DownloadJob) -> bool:
        thread = self._threads.get(job.job_id)
        return thread is not None and thread.is_alive()

    def _paths(self, job: DownloadJob) -> list[tuple[dict[str, Any], Path, Path]]:
        publisher, repo = job.repo_id.split("/")
        model_dir = self.store.model_dir(publisher, repo)
        return [(f, model_dir / f["name"], model_dir / PARTIAL_DIR / (f["name"] + ".part")) for f in job.files]

    def _bytes_on_disk(self, job: DownloadJob) -> int:
        total = 0
        for f, final, part in self._paths(job):
            if self._complete(final, f["size"]):
                total += final.stat().st_size
            elif part.exists():
                total += part.stat().st_size
        return total

    @staticmethod
    def _complete(path: Path, size: int | None) -> bool:
        try:
            return path.is_file() and (size is None or path.stat().st_size == size)
        except OSError:
            return False

    def _check_space(self, job: DownloadJob, model_dir: Path) -> None:
        needed = job.total_size_bytes - self._bytes_on_disk(job)
        probe = next((p for p in (model_dir, *model_dir.parents) if p.exists()), None)
        if probe is None or needed <= 0:
            return
        free = shutil.disk_usage(probe).free
        if free < needed + _DISK_MARGIN:
            raise DownloadError(507, "insufficient_storage", f"Not enough disk space for {job.repo_id}: needs "
                                f"{_human(needed)} more, {_human(free)} free under {self.store.models_dir}.")

    def _drop_empty_partials(self, job: DownloadJob) -> None:
        model_dir = self.store.model_dir(*job.repo_id.split("/"))
        for _, _, part in self._paths(job):
            try:
                if part.stat().st_size == 0:
                    part.unlink()
            except OSError:
                pass
            _remove_empty_dirs(part.parent, stop=model_dir)

    # -- the download thread ----------------------------------------------------------------------------

    def _run(self, job: DownloadJob) -> None:
        try:
            self._download(job)
        except _Cancelled:
            job.status = "paused"
        except DownloadError as exc:
            job.status, job.error = "failed", exc.message
        except OSError as exc:
            job.status = "failed"
            if exc.errno == errno.ENOSPC:
                job.error = f"Disk full while downloading {job.repo_id}: free some space and request it again."
            else:
                job.error = f"Download of {job.repo_id} failed: {_one_line(exc)} Request it again to resume."
        except Exception as exc:  # httpx errors and the like: the job must never stay "downloading"
            log.exception("download %s failed", job.job_id)
            job.status = "failed"
            job.error = f"Download of {job.repo_id} failed: {_one_line(exc)} Request it again to resume."
        else:
            job.status, job.completed_at = "completed", time.time()
            job.downloaded_bytes = job.total_size_bytes
        finally:
            if job.status == "failed":
                self._drop_empty_partials(job)
                log.warning("download %s (%s) failed: %s", job.job_id, job.repo_id, job.error)
            self.table.save()

    def _download(self, job: DownloadJob) -> None:
        """Downloads the job's files holding the repo folder's lock: servers sharing a models volume (replicas on
        one ReadWriteMany claim) never write the same `.part` file at once. One that finds the lock taken waits,
        showing the bytes the other one has on disk, then skips the files it finished."""
        model_dir = self.store.model_dir(*job.repo_id.split("/"))
        model_dir.mkdir(parents=True, exist_ok=True)
        with (model_dir / LOCK_FILE).open("a") as lock:
            while True:
                try:
                    fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if self._cancel.is_set():
                        raise _Cancelled() from None
                    job.progress(self._bytes_on_disk(job))
                    time.sleep(_LOCK_POLL_S)
            try:
                self._download_files(job)
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _download_files(self, job: DownloadJob) -> None:
        from huggingface_hub import hf_hub_url

        paths = self._paths(job)
        model_dir = self.store.model_dir(*job.repo_id.split("/"))
        done = 0  # bytes of the files finished before the current one
        last_save = time.monotonic()
        for f, final, part in paths:
            size = f["size"]
            if self._complete(final, size):
                done += final.stat().st_size
                continue
            part.parent.mkdir(parents=True, exist_ok=True)
            have = part.stat().st_size if part.exists() else 0
            if size is not None and have > size:
                part.unlink()
                have = 0
            base = done

            def on_write(base: int = base) -> None:
                nonlocal last_save
                job.progress(base + handle.tell())
                if time.monotonic() - last_save > _SAVE_EVERY_S:
                    last_save = time.monotonic()
                    self.table.save()

            url = hf_hub_url(job.repo_id, f["name"], revision=job.revision)
            with part.open("ab") as handle:
                job.progress(base + handle.tell())
                _fetch(url, _ProgressFile(handle, on_write, self._cancel), size)
                handle.flush()
                os.fsync(handle.fileno())
            if f.get("sha256"):
                digest = _sha256(part, self._cancel)
                if digest != f["sha256"]:
                    part.unlink(missing_ok=True)
                    raise DownloadError(502, "checksum_mismatch", f"{f['name']} from {job.repo_id} does not match "
                                        "the hub's sha256 (the partial data was deleted); request it again.")
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(part, final)
            done += final.stat().st_size
            job.progress(done)
        for _, _, part in paths:
            _remove_empty_dirs(part.parent, stop=model_dir)


def _fetch(url: str, out: _ProgressFile, size: int | None) -> None:
    """Append the rest of the file at `url` to `out` (positioned at its end), resuming with Range requests.

    Transient network errors are retried as long as each attempt brings new bytes.
    """
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    failures = 0
    while True:
        have = out.tell()
        if size is not None and have >= size:
            break
        headers = build_hf_headers()
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            with get_session().stream("GET", url, headers=headers,
                                      timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as response:
                hf_raise_for_status(response)
                if have and response.status_code != 206:  # the server ignored Range: start over
                    out.seek(0)
                    out.truncate()
                for chunk in response.iter_bytes(_CHUNK):
                    out.write(chunk)
            if size is None:
                break
        except (httpx2.TransportError, httpx2.StreamError) as exc:
            failures = 0 if out.tell() > have else failures + 1
            if failures >= 5:
                raise OSError(f"network error: {exc}") from exc
            log.warning("download of %s interrupted (%s); resuming", url, exc)
            time.sleep(1)
            continue
        if out.tell() < size:  # the connection ended early without an error: resume
            failures = 0 if out.tell() > have else failures + 1
            if failures >= 5:
                raise OSError(f"the server keeps ending the transfer of {url} early")
    if size is not None and out.tell() != size:
        raise OSError(f"got {out.tell()} bytes of {url}, expected {size}")


def _sha256(path: Path, cancel: threading.Event) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            if cancel.is_set():
                raise _Cancelled()
            h.update(chunk)
    return h.hexdigest()


def _remove_empty_dirs(folder: Path, stop: Path) -> None:
    while folder != stop and stop in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if text.endswith(".") else text + "."


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


__all__ = ["DownloadError", "DownloadManager"]
