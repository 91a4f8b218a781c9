"""Model downloads from Hugging Face (or a mirror named by HF_ENDPOINT) into the model store.

`resolver` turns a model spec (repo id, HF URL, known key) into the GGUF files to fetch, `jobs` holds the
persisted job table, `manager` runs the downloads in background threads with resume.
"""

from .jobs import DownloadJob, JobTable
from .manager import DownloadManager
from .resolver import DownloadError, DownloadPlan, RemoteFile, parse_spec

__all__ = [
    "DownloadError", "DownloadJob", "DownloadManager", "DownloadPlan", "JobTable", "RemoteFile", "parse_spec",
]
