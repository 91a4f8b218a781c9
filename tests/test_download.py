"""POST /api/v1/models/download and its status endpoint, against a local fake Hugging Face Hub."""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ServerFactory
from hf_hub_server import FakeHub
from lmkube.server.downloads.resolver import DownloadError, parse_spec, select_files
from support import REAL_MODEL, ServerProcess

from lmkube import synthetic_gguf as sg
from lmkube.synthetic_gguf import LlamaShape, write_llama_model

TOKEN = "sk-lm-Dl0ad123:abcdefghijABCDEFGHIJ"
HF_GOOD_TOKEN = "hf_goodtoken"
BIG = LlamaShape(n_vocab=4096, n_embd=128)  # ~2 MB at f16: long enough to kill mid-download when throttled


def write_split(path: Path, **kw: Any) -> list[Path]:
    """A real llama.cpp split model (two shards) written by the gguf writer's own splitting."""
    original = sg.gguf.GGUFWriter

    class SplitWriter(original):  # type: ignore[misc,valid-type]
        def __init__(self, p: Any, arch: str, **k: Any) -> None:
            super().__init__(p, arch, split_max_tensors=12, **k)

    sg.gguf.GGUFWriter = SplitWriter
    try:
        write_llama_model(path, **kw)
    finally:
        sg.gguf.GGUFWriter = original
    path.unlink()  # the empty temp file the writer never used, renamed into place
    shards = []
    for p in sorted(path.parent.glob(f".{path.name}.*-of-*.gguf")):
        suffix = re.search(r"-\d{5}-of-\d{5}\.gguf$", p.name)
        assert suffix
        shards.append(p.rename(path.with_name(path.name.removesuffix(".gguf") + suffix[0])))
    assert len(shards) == 2
    return shards


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("hub-files")
    return {
        "q4": write_llama_model(d / "tiny-Q4_K_M.gguf", seed=11, name="Tiny Hub"),
        "q8": write_llama_model(d / "tiny-Q8_0.gguf", dtype="f32", seed=12, name="Tiny Hub"),
        "big": write_llama_model(d / "big-Q4_K_M.gguf", BIG, seed=13, name="Big Hub"),
        **{f"shard{i}": p for i, p in enumerate(write_split(d / "split-Q4_K_M.gguf", seed=14, name="Split"), 1)},
    }


@pytest.fixture(scope="module")
def hub(sources: dict[str, Path]) -> Iterator[FakeHub]:
    hub = FakeHub().start()
    hub.add_repo("hub-org/Tiny-GGUF", {"tiny-Q4_K_M.gguf": sources["q4"], "tiny-Q8_0.gguf": sources["q8"],
                                       "README.md": b"# tiny\n"})
    hub.add_repo("hub-org/split-GGUF", {sources["shard1"].name: sources["shard1"],
                                        sources["shard2"].name: sources["shard2"]})
    hub.add_repo("hub-org/big-GGUF", {"big-Q4_K_M.gguf": sources["big"]})
    hub.add_repo("hub-org/shared-GGUF", {"big-Q4_K_M.gguf": sources["big"]})
    hub.add_repo("hub-org/safetensors-only", {"model.safetensors": b"\0" * 64, "config.json": b"{}"})
    hub.add_repo("hub-org/gated-GGUF", {"tiny-Q4_K_M.gguf": sources["q4"]}, gated=True, tokens=(HF_GOOD_TOKEN,))
    yield hub
    hub.stop()


def hub_env(hub: FakeHub, home: Path, **extra: str) -> dict[str, str]:
    return {"HF_ENDPOINT": hub.url, "HF_HOME": str(home / "hf"), "HF_TOKEN": "", "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_TELEMETRY": "1", **extra}


@pytest.fixture(scope="module")
def dl_server(start_server: ServerFactory, hub: FakeHub,
              tmp_path_factory: pytest.TempPathFactory) -> tuple[ServerProcess, Path]:
    models = tmp_path_factory.mktemp("dl-models")
    return start_server(models, env=hub_env(hub, models.parent)), models


def post(server: ServerProcess, body: dict[str, Any]) -> httpx.Response:
    with server.client() as c:
        return c.post("/api/v1/models/download", json=body)


def status(server: ServerProcess, job_id: str) -> dict[str, Any]:
    with server.client() as c:
        r = c.get(f"/api/v1/models/download/status/{job_id}")
    assert r.status_code == 200, r.text
    return r.json()


def wait_done(server: ServerProcess, job_id: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = status(server, job_id)
        if s["status"] != "downloading":
            return s
        time.sleep(0.05)
    raise TimeoutError(status(server, job_id))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def model_keys(server: ServerProcess) -> dict[str, dict[str, Any]]:
    with server.client() as c:
        return {m["key"]: m for m in c.get("/api/v1/models").json()["models"]}


# -- unit: spec parsing and file selection -------------------------------------------------------------


def test_parse_spec_forms() -> None:
    assert parse_spec("org/name").repo_id == "org/name"
    s = parse_spec("https://huggingface.co/org/Name-GGUF/blob/main/sub/x-Q8_0.gguf?download=true")
    assert (s.repo_id, s.filename, s.revision, s.is_url) == ("org/Name-GGUF", "sub/x-Q8_0.gguf", "main", True)
    assert parse_spec("hf.co/org/name/tree/main").repo_id == "org/name"
    assert parse_spec("org/name@q8_0").quantization == "q8_0"
    assert parse_spec("org/name:Q8_0").repo_id == "org/name"
    assert parse_spec("tiny-chat").repo_id is None
    with pytest.raises(DownloadError):
        parse_spec("https://huggingface.co/datasets/org/name")


def test_select_files_default_quant_split_and_projector() -> None:
    sib = [("m-Q8_0.gguf", 8, None), ("m-Q4_K_M-00001-of-00002.gguf", 4, None),
           ("m-Q4_K_M-00002-of-00002.gguf", 4, None), ("mmproj-m-F16.gguf", 2, None),
           ("mmproj-m-Q8_0.gguf", 1, None), ("m-Q2_K-00001-of-00002.gguf", 2, None)]  # incomplete set: ignored
    plan = select_files("o/m", "abc", sib, None)
    assert [f.name for f in plan.files] == [
        "m-Q4_K_M-00001-of-00002.gguf", "m-Q4_K_M-00002-of-00002.gguf", "mmproj-m-F16.gguf"]
    assert plan.quant == "Q4_K_M" and plan.total_size == 10
    assert [f.name for f in select_files("o/m", "abc", sib, "q8_0").files] == ["m-Q8_0.gguf", "mmproj-m-F16.gguf"]
    assert len(select_files("o/m", "abc", sib, None, "m-Q4_K_M-00002-of-00002.gguf").files) == 3
    with pytest.raises(DownloadError, match="available quantizations: Q4_K_M, Q8_0"):
        select_files("o/m", "abc", sib, "Q6_K")


# -- against a server and the fake hub ------------------------------------------------------------------


def test_download_default_quant_then_use(dl_server: tuple[ServerProcess, Path], sources: dict[str, Path]) -> None:
    server, models = dl_server
    r = post(server, {"model": "hub-org/Tiny-GGUF"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"job_id", "status", "total_size_bytes", "started_at"}
    assert re.fullmatch(r"job_[0-9a-f]{10}", body["job_id"]) and body["status"] == "downloading"
    assert body["total_size_bytes"] == sources["q4"].stat().st_size
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", body["started_at"])
    done = wait_done(server, body["job_id"])
    assert done["status"] == "completed", done
    assert done["downloaded_bytes"] == done["total_size_bytes"] and "completed_at" in done
    final = models / "hub-org" / "Tiny-GGUF" / "tiny-Q4_K_M.gguf"
    assert sha256(final) == sha256(sources["q4"])
    assert not (models / "hub-org" / "Tiny-GGUF" / "tiny-Q8_0.gguf").exists()
    assert not (models / "hub-org" / "Tiny-GGUF" / ".downloads").exists()
    entry = model_keys(server)["hub-org/tiny-gguf"]
    assert entry["selected_variant"] == "hub-org/tiny-gguf@q4_k_m"
    with server.client() as c:
        r = c.post("/v1/chat/completions", json={"model": "hub-org/tiny-gguf", "max_tokens": 4,
                                                 "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] > 0

    # Known now: by key, and by repo id again.
    assert post(server, {"model": "hub-org/tiny-gguf"}).json() == {"status": "already_downloaded"}
    assert post(server, {"model": "https://huggingface.co/hub-org/Tiny-GGUF"}).json() == {
        "status": "already_downloaded"}

    # An explicit quantization fetches that file as a second variant of the same model.
    r = post(server, {"model": "https://huggingface.co/hub-org/Tiny-GGUF", "quantization": "Q8_0"})
    assert r.status_code == 200, r.text
    assert wait_done(server, r.json()["job_id"])["status"] == "completed"
    assert sha256(models / "hub-org" / "Tiny-GGUF" / "tiny-Q8_0.gguf") == sha256(sources["q8"])
    assert model_keys(server)["hub-org/tiny-gguf"]["variants"] == ["hub-org/tiny-gguf@q4_k_m",
                                                                   "hub-org/tiny-gguf@q8_0"]
    assert post(server, {"model": "hub-org/Tiny-GGUF@q8_0"}).json() == {"status": "already_downloaded"}


def test_split_model_downloads_together_and_loads(dl_server: tuple[ServerProcess, Path],
                                                  sources: dict[str, Path]) -> None:
    server, models = dl_server
    # A URL to the second shard still fetches the whole set.
    r = post(server, {"model": f"https://huggingface.co/hub-org/split-GGUF/resolve/main/{sources['shard2'].name}"})
    assert r.status_code == 200, r.text
    assert r.json()["total_size_bytes"] == sources["shard1"].stat().st_size + sources["shard2"].stat().st_size
    assert wait_done(server, r.json()["job_id"])["status"] == "completed"
    for shard in ("shard1", "shard2"):
        assert sha256(models / "hub-org" / "split-GGUF" / sources[shard].name) == sha256(sources[shard])
    assert model_keys(server)["hub-org/split-gguf"]["variants"] == ["hub-org/split-gguf@q4_k_m"]
    with server.client() as c:
        r = c.post("/v1/completions", json={"model": "hub-org/split-gguf", "prompt": "hello", "max_tokens": 3})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(("body", "code", "words"), [
    ({"model": "hub-org/nope-GGUF"}, 404, "was not found"),
    ({"model": "hub-org/Tiny-GGUF", "quantization": "Q6_K"}, 400, "available quantizations: Q4_K_M, Q8_0"),
    ({"model": "hub-org/gated-GGUF"}, 403, "gated"),
    ({"model": "hub-org/safetensors-only"}, 400, "no GGUF files"),
    ({"model": "no-such-local-model"}, 404, "neither a downloaded model"),
])
def test_request_errors(dl_server: tuple[ServerProcess, Path], body: dict[str, Any], code: int, words: str) -> None:
    server, _ = dl_server
    r = post(server, body)
    assert r.status_code == code, r.text
    error = r.json()["error"]
    assert words in error["message"] and set(error) >= {"type", "message"}


@pytest.mark.real_model
def test_real_model_repo_links_the_local_copy_without_asking_the_hub(
        start_server: ServerFactory, hub: FakeHub, tmp_path: Path, real_model_file: Path) -> None:
    # As a LocalModel of it on a cluster without internet: the image carries the file, the hub has no such repo.
    models = tmp_path / "models"
    server = start_server(models, "--threads", "1", env=hub_env(hub, tmp_path))
    for body in ({"model": "HuggingFaceTB/SmolLM2-135M-Instruct"},
                 {"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "quantization": "Q4_1"}):
        r = post(server, body)
        assert r.status_code == 200, r.text
        assert r.json() == {"status": "already_downloaded"}
    assert (models / "HuggingFaceTB" / "SmolLM2-135M-Instruct").is_dir()
    assert model_keys(server)[REAL_MODEL]["variants"] == [f"{REAL_MODEL}@q4_1"]
    # Another quantization is not the local copy: that one is the hub's to answer (it has no such repo).
    assert post(server, {"model": "HuggingFaceTB/SmolLM2-135M-Instruct@q8_0"}).status_code == 404
    with server.client() as c:
        r = c.post("/v1/chat/completions", json={"model": REAL_MODEL, "max_tokens": 8,
                                                 "messages": [{"role": "user", "content": "Hi"}]}, timeout=300)
    assert r.status_code == 200, r.text


def test_unknown_job_is_404_in_native_shape(dl_server: tuple[ServerProcess, Path]) -> None:
    server, _ = dl_server
    with server.client() as c:
        r = c.get("/api/v1/models/download/status/job_0000000000")
    assert r.status_code == 404
    assert r.json()["error"]["type"] == "job_not_found"


def test_gated_repo_with_token(start_server: ServerFactory, hub: FakeHub, tmp_path: Path) -> None:
    models = tmp_path / "models"
    server = start_server(models, env=hub_env(hub, tmp_path, HF_TOKEN=HF_GOOD_TOKEN))
    r = post(server, {"model": "hub-org/gated-GGUF"})
    assert r.status_code == 200, r.text
    assert wait_done(server, r.json()["job_id"])["status"] == "completed"
    wrong = start_server(tmp_path / "m2", env=hub_env(hub, tmp_path, HF_TOKEN="hf_wrong"))
    assert post(wrong, {"model": "hub-org/gated-GGUF"}).status_code == 403


def test_same_file_shares_one_job(start_server: ServerFactory, hub: FakeHub, tmp_path: Path) -> None:
    server = start_server(tmp_path / "models", env=hub_env(hub, tmp_path))
    hub.bytes_per_second = 1_000_000
    try:
        first = post(server, {"model": "hub-org/shared-GGUF"}).json()
        second = post(server, {"model": "https://huggingface.co/hub-org/shared-GGUF/blob/main/big-Q4_K_M.gguf"}).json()
        third = post(server, {"model": "hub-org/shared-GGUF", "quantization": "Q4_K_M"}).json()
        assert first["job_id"] == second["job_id"] == third["job_id"]
        s = status(server, first["job_id"])
        assert s["status"] == "downloading" and {"bytes_per_second", "estimated_completion"} <= set(s)
    finally:
        hub.bytes_per_second = None
    assert wait_done(server, first["job_id"])["status"] == "completed"


def test_kill_and_resume(start_server: ServerFactory, hub: FakeHub, sources: dict[str, Path], tmp_path: Path) -> None:
    models, home = tmp_path / "models", tmp_path / "home"
    env = hub_env(hub, tmp_path, LMKUBE_HOME=str(home))
    final = models / "hub-org" / "big-GGUF" / "big-Q4_K_M.gguf"
    part = models / "hub-org" / "big-GGUF" / ".downloads" / "big-Q4_K_M.gguf.part"
    size = sources["big"].stat().st_size
    hub.bytes_per_second = size / 6  # about 6 s for the whole file
    try:
        first = start_server(models, env=env)
        job = post(first, {"model": "hub-org/big-GGUF"}).json()
        deadline = time.monotonic() + 30
        while (s := status(first, job["job_id"]))["downloaded_bytes"] < size // 4:
            assert s["status"] == "downloading" and not final.exists()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        first.process.kill()  # SIGKILL: no chance to clean up
        first.process.wait()
    finally:
        hub.bytes_per_second = None
    assert not final.exists()
    kept = part.stat().st_size
    assert 0 < kept < size
    assert model_keys_from(models) == set()  # nothing under a final name

    hub.requests.clear()
    second = start_server(models, env=env)
    assert status(second, job["job_id"])["status"] == "paused"  # the job table survived
    again = post(second, {"model": "hub-org/big-GGUF"}).json()
    assert again["job_id"] == job["job_id"]
    done = wait_done(second, job["job_id"])
    assert done["status"] == "completed", done
    assert sha256(final) == sha256(sources["big"])
    assert not part.exists()
    ranges = [rng for _, rng in hub.blob_requests()]
    assert ranges and ranges[0] is not None and int(ranges[0].split("=")[1].rstrip("-")) >= kept
    assert "hub-org/big-gguf" in model_keys(second)

    # Completed jobs survive a restart too.
    second.stop()
    third = start_server(models, env=env)
    assert status(third, job["job_id"])["status"] == "completed"


def model_keys_from(models: Path) -> set[str]:
    from lmkube.server.store.model_store import ModelStore

    return {e.key for e in ModelStore(models).scan()}


def test_needs_api_token(start_server: ServerFactory, hub: FakeHub, tmp_path: Path) -> None:
    server = start_server(tmp_path / "models", "--api-token", TOKEN, token=TOKEN, env=hub_env(hub, tmp_path))
    anon = httpx.post(f"{server.base_url}/api/v1/models/download", json={"model": "hub-org/Tiny-GGUF"})
    assert anon.status_code == 401
    assert httpx.get(f"{server.base_url}/api/v1/models/download/status/job_0000000000").status_code == 401
    assert post(server, {"model": "hub-org/nope-GGUF"}).status_code == 404  # with the token: reaches the hub


def test_not_enough_disk_space_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lmkube.server.downloads import manager as dm
    from lmkube.server.downloads.jobs import DownloadJob
    from lmkube.server.store.model_store import ModelStore

    downloads = dm.DownloadManager(ModelStore(tmp_path / "models"), tmp_path / "home" / "downloads.json")
    job = DownloadJob(job_id="job_0123456789", repo_id="o/r", revision="abc", model_key="o/r",
                      files=[{"name": "r-Q4_K_M.gguf", "size": 10**12, "sha256": None}], total_size_bytes=10**12)
    monkeypatch.setattr(dm.shutil, "disk_usage", lambda _p: dm.shutil._ntuple_diskusage(10**13, 10**13, 10**9))
    with pytest.raises(DownloadError, match="Not enough disk space") as err:
        downloads._check_space(job, tmp_path / "models" / "o" / "r")
    assert err.value.status == 507


def test_failures_during_download_are_reported_and_retryable(
    dl_server: tuple[ServerProcess, Path], hub: FakeHub, sources: dict[str, Path]
) -> None:
    server, models = dl_server
    data = sources["q4"].read_bytes()
    hub.add_repo("hub-org/flaky-GGUF", {"flaky-Q4_K_M.gguf": data})
    sha = hashlib.sha256(data).hexdigest()
    final = models / "hub-org" / "flaky-GGUF" / "flaky-Q4_K_M.gguf"
    try:
        hub.blobs[sha] = bytes(len(data))  # the CDN serves other bytes of the same size
        first = wait_done(server, post(server, {"model": "hub-org/flaky-GGUF"}).json()["job_id"])
        assert first["status"] == "failed" and "does not match the hub's sha256" in first["error"], first
        assert not final.exists() and not list(final.parent.rglob("*.part"))
        del hub.blobs[sha]  # the file vanished between listing and download
        second = wait_done(server, post(server, {"model": "hub-org/flaky-GGUF"}).json()["job_id"])
        assert second["status"] == "failed" and "404" in second["error"] and not final.exists()
        assert second["job_id"] != first["job_id"]
    finally:
        hub.blobs[sha] = data
    third = wait_done(server, post(server, {"model": "hub-org/flaky-GGUF"}).json()["job_id"])
    assert third["status"] == "completed" and sha256(final) == sha
    assert status(server, first["job_id"])["status"] == "failed"  # earlier jobs keep their outcome
