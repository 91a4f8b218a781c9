"""Two real `lmkube serve` processes on one models folder (replicas of a LocalModel on a shared ReadWriteMany
claim) asked to download the same model at the same moment, from a throttled local Hugging Face stand-in.

They must not write the same `.part` file at once: the one that finds the repo folder locked waits (its job
shows the bytes the other has on disk), then finds the files complete. The file arrives once, intact.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from hf_hub_server import FakeHub
from support import ServerProcess

from lmkube.synthetic_gguf import LlamaShape, write_llama_model

REPO = "hub-org/Shared-GGUF"
FILE = "shared-Q4_K_M.gguf"


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_llama_model(tmp_path_factory.mktemp("shared-src") / FILE, LlamaShape(n_embd=256, n_ff=512),
                             dtype="f32", seed=21, name="Shared Hub")


@pytest.fixture(scope="module")
def hub(source: Path) -> Iterator[FakeHub]:
    hub = FakeHub().start()
    hub.add_repo(REPO, {FILE: source})
    # A download of this file takes about 3 s: long enough for both servers to ask while it runs.
    hub.bytes_per_second = source.stat().st_size / 3
    yield hub
    hub.stop()


def download(server: ServerProcess) -> str:
    response = httpx.post(f"{server.base_url}/api/v1/models/download", json={"model": REPO}, timeout=60)
    assert response.status_code == 200, response.text
    return str(response.json()["job_id"])


def job(server: ServerProcess, job_id: str) -> dict[str, Any]:
    response = httpx.get(f"{server.base_url}/api/v1/models/download/status/{job_id}", timeout=10)
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_two_servers_on_one_volume_download_a_model_once(start_server: Callable[..., ServerProcess], hub: FakeHub,
                                                          source: Path, tmp_path: Path) -> None:
    models = tmp_path / "shared-models"
    models.mkdir()
    env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "HF_TOKEN": "", "HF_HUB_OFFLINE": "0",
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    servers = [start_server(models, "--no-jit", env=env) for _ in range(2)]
    with ThreadPoolExecutor(2) as pool:
        jobs = list(pool.map(download, servers))
    seen: list[tuple[str, str]] = []
    deadline = time.monotonic() + 120
    while True:
        states = [job(server, job_id) for server, job_id in zip(servers, jobs, strict=True)]
        seen += [(s["status"], str(s.get("downloaded_bytes"))) for s in states]
        if all(s["status"] != "downloading" for s in states):
            break
        assert time.monotonic() < deadline, states
        time.sleep(0.1)
    assert [s["status"] for s in states] == ["completed", "completed"], states
    final = models / "hub-org" / "Shared-GGUF" / FILE
    assert hashlib.sha256(final.read_bytes()).hexdigest() == hashlib.sha256(source.read_bytes()).hexdigest()
    assert not list(final.parent.rglob("*.part"))
    # One server fetched the bytes; the other waited for its lock and found the file complete.
    fetched = sum(1 for path, _ in hub.blob_requests())
    assert fetched == 1, hub.blob_requests()
    # Both list the model afterwards.
    for server in servers:
        keys = [m["key"] for m in httpx.get(f"{server.base_url}/api/v1/models", timeout=10).json()["models"]]
        assert REPO.lower() in keys, keys
