"""The operator's pod client and per-pod reconcile steps against a real `lmkube serve` and the fake hub."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator

import pytest
from conftest import ServerFactory
from hf_hub_server import FakeHub
from lmkube.operator import clock
from lmkube.operator import reconcile as rc
from lmkube.operator import status as st
from lmkube.operator.observe import PodView
from lmkube.operator.podclient import ModelListing, PodAuthError, PodClient, PodError, PodUnreachable
from lmkube.operator.spec import parse_spec
from support import ServerProcess, free_port

from lmkube.synthetic_gguf import LlamaShape, write_llama_model

TOKEN = "sk-lm-Op3rator:abcdefghijABCDEFGHIJ"
REPO, BIG_REPO, FLAKY_REPO, LATE_REPO = "pc-org/Tiny-GGUF", "pc-org/Big-GGUF", "pc-org/Flaky-GGUF", "pc-org/Late-GGUF"


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    d = tmp_path_factory.mktemp("pc-hub")
    hub = FakeHub().start()
    hub.add_repo(REPO, {"tiny-Q4_K_M.gguf": write_llama_model(d / "tiny-Q4_K_M.gguf", seed=31, name="T"),
                        "tiny-Q8_0.gguf": write_llama_model(d / "tiny-Q8_0.gguf", seed=32, name="T")})
    big = write_llama_model(d / "big-Q4_K_M.gguf", LlamaShape(n_vocab=4096, n_embd=128), seed=33, name="B")
    hub.add_repo(BIG_REPO, {"big-Q4_K_M.gguf": big})
    hub.add_repo(FLAKY_REPO, {"flaky-Q4_K_M.gguf": write_llama_model(d / "flaky-Q4_K_M.gguf", seed=34, name="F")})
    hub.add_repo(LATE_REPO, {"late-Q4_K_M.gguf": write_llama_model(d / "late-Q4_K_M.gguf", seed=35, name="L")})
    yield hub
    hub.stop()


@pytest.fixture(scope="module")
def pod_server(start_server: ServerFactory, hub: FakeHub, tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    models = tmp_path_factory.mktemp("pc-models")
    env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(models.parent / "hf"), "HF_TOKEN": "", "HF_HUB_OFFLINE": "0"}
    return start_server(models, "--api-token", TOKEN, env=env)


def client(server: ServerProcess, token: str | None = TOKEN) -> PodClient:
    return PodClient(server.base_url, token)


def test_auth_and_unreachable(pod_server: ServerProcess) -> None:
    with client(pod_server, "sk-lm-wrong000:abcdefghijABCDEFGHIJ") as c, pytest.raises(PodAuthError) as denied:
        c.models()
    assert denied.value.status == 401 and "refused the operator's token (401" in denied.value.message
    with PodClient(f"http://127.0.0.1:{free_port()}", TOKEN, timeout=2) as c, pytest.raises(PodUnreachable) as down:
        c.models()
    assert down.value.reason == "PodUnreachable" and "cannot reach" in down.value.message


def test_download_load_unload(pod_server: ServerProcess) -> None:
    with client(pod_server) as c:
        with pytest.raises(PodError) as bad:
            c.download({"model": REPO, "quantization": "q9"})
        assert bad.value.reason == "DownloadFailed" and "available quantizations: Q4_K_M, Q8_0" in bad.value.message
        assert c.download_status("job_0000000000") is None
        started = c.download({"model": REPO, "quantization": "Q8_0"})
        assert started.job_id and started.total_bytes > 0
        deadline = time.monotonic() + 30
        while (status := c.download_status(started.job_id)).status == "downloading":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert status.status == "completed" and status.downloaded_bytes == status.total_bytes
        assert c.download({"model": REPO, "quantization": "Q8_0"}).job_id is None  # already downloaded

        with pytest.raises(PodError) as missing:
            c.load({"model": "pc-org/absent"})
        assert missing.value.reason == "LoadFailed" and missing.value.status == 404
        instance = c.load({"model": "pc-org/tiny-gguf@q8_0", "context_length": 256, "gpu": "off"})
        (loaded,) = c.loaded()
        assert (loaded.instance_id, loaded.context_length) == (instance, 256)
        (listing,) = c.models()
        assert listing.key == "pc-org/tiny-gguf" and listing.selected_variant == "pc-org/tiny-gguf@q8_0"
        c.unload(instance)
        c.unload(instance)  # gone already: not an error
        assert c.loaded() == []

        # The streamed load the operator uses for status.load: llama.cpp's progress, rising to 1.0, then the id.
        seen: list[float] = []
        with pytest.raises(PodError) as missing_streamed:
            c.load({"model": "pc-org/absent"}, on_progress=seen.append)
        assert missing_streamed.value.reason == "LoadFailed" and missing_streamed.value.status == 404 and not seen
        instance = c.load({"model": "pc-org/tiny-gguf@q8_0", "context_length": 256, "gpu": "off"},
                          on_progress=seen.append)
        assert [i.instance_id for i in c.loaded()] == [instance]
        assert len(seen) > 1 and seen == sorted(seen) and seen[-1] == 1.0
        c.unload(instance)


def test_pod_steps_download_then_load_then_reload(pod_server: ServerProcess, hub: FakeHub) -> None:
    """examine_pod/load_on_pod, the per-pod half of reconcile, drive a real server through every stage."""
    pod = PodView("p-1", "uid-1", "127.0.0.1", True, True, False, "uid-1/server-1", "h", None)
    spec = parse_spec({"model": BIG_REPO, "gpu": {"count": 0}, "contextLength": 256})
    record: dict = {"name": "p-1"}
    stages = []
    hub.bytes_per_second = 1_000_000
    try:
        with client(pod_server) as c:
            deadline = time.monotonic() + 60
            while True:
                work = rc.examine_pod(c, pod, spec, record, time.time(), 1.0)
                stages.append(work.state.stage)
                record = work.record
                if work.load:
                    work = rc.load_on_pod(c, pod, spec, work, time.time(), 1.0)
                    stages.append(work.state.stage)
                    break
                assert work.state.stage == st.DOWNLOADING, work.state
                assert time.monotonic() < deadline
                time.sleep(0.2)
    finally:
        hub.bytes_per_second = None
    assert stages[0] == st.DOWNLOADING and stages[-2:] == [st.LOADING, st.READY], stages
    record = work.record
    assert work.state.context_length == 256 and record["jobId"].startswith("job_")
    with client(pod_server) as c:
        # Nothing to do when the same spec is looked at again.
        again = rc.examine_pod(c, pod, spec, record, time.time(), 1.0)
        assert (again.state.stage, again.load) == (st.READY, False)
        # A new context length: the old instance is unloaded and the model loaded anew.
        wider = parse_spec({"model": BIG_REPO, "gpu": {"count": 0}, "contextLength": 512})
        work = rc.examine_pod(c, pod, wider, record, time.time(), 1.0)
        assert work.load and work.unload == (record["instanceId"],)
        work = rc.load_on_pod(c, pod, wider, work, time.time(), 1.0)
        assert work.state.stage == st.READY and [i.context_length for i in c.loaded()] == [512]
        # A restarted server (new server id) has nothing loaded: load again, no new download.
        restarted = PodView("p-1", "uid-1", "127.0.0.1", True, True, False, "uid-1/server-2", "h", None)
        work = rc.examine_pod(c, restarted, wider, work.record, time.time(), 1.0)
        assert work.load and work.record.get("downloaded")
        for instance in c.loaded():
            c.unload(instance.instance_id)


def test_failures_back_off_and_a_new_spec_retries_at_once(pod_server: ServerProcess) -> None:
    pod = PodView("p-2", "uid-2", "127.0.0.1", True, True, False, "uid-2/server-1", "h", None)
    bad = parse_spec({"model": REPO, "variant": "q9", "gpu": {"count": 0}})
    now = time.time()
    with client(pod_server) as c:
        work = rc.examine_pod(c, pod, bad, {"name": "p-2"}, now, 10.0)
        assert (work.state.stage, work.state.reason, work.record["attempts"]) == (st.FAILED, "DownloadFailed", 1)
        assert "available quantizations" in work.state.message
        # Within the back-off nothing is asked; the failure stays as it was.
        again = rc.examine_pod(c, pod, bad, work.record, now + 5, 10.0)
        assert (again.state.reason, again.record["attempts"]) == ("DownloadFailed", 1)
        later = rc.examine_pod(c, pod, bad, again.record, now + 11, 10.0)
        assert later.record["attempts"] == 2  # retried, failed again: the next wait doubles
        assert clock.epoch(later.record["retryAt"]) - (now + 11) == pytest.approx(20, abs=1)
        good = parse_spec({"model": REPO, "variant": "Q4_K_M", "gpu": {"count": 0}})
        fixed = rc.examine_pod(c, pod, good, later.record, now + 12, 10.0)
        assert fixed.state.stage in (st.DOWNLOADING, st.LOADING)


def test_fingerprint_is_stable() -> None:
    assert rc.fingerprint({"a": 1, "b": 2}) == rc.fingerprint({"b": 2, "a": 1})
    assert rc.new_token().startswith("sk-lm-") and len(rc.new_token()) == 35


def test_failed_download_job_is_retried_with_a_new_job(pod_server: ServerProcess, hub: FakeHub) -> None:
    pod = PodView("p-3", "uid-3", "127.0.0.1", True, True, False, "uid-3/server-1", "h", None)
    spec = parse_spec({"model": FLAKY_REPO, "gpu": {"count": 0}})
    (data,) = hub.repos[FLAKY_REPO.lower()].files.values()
    sha = hashlib.sha256(data).hexdigest()
    hub.blobs[sha] = bytes(reversed(data))  # the hub serves corrupt bytes: the server's sha256 check fails
    record: dict = {"name": "p-3"}
    now = time.time()
    with client(pod_server) as c:
        deadline = time.monotonic() + 30
        while (work := rc.examine_pod(c, pod, spec, record, now, 1.0)).state.stage == st.DOWNLOADING:
            record = work.record
            first_job = record["jobId"]
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert (work.state.stage, work.state.reason) == (st.FAILED, "DownloadFailed"), work.state
        assert "jobId" not in work.record
        hub.blobs[sha] = data
        record = work.record
        while not (work := rc.examine_pod(c, pod, spec, record, now + 5, 1.0)).load:
            assert work.state.stage == st.DOWNLOADING, work.state
            record = work.record
            assert time.monotonic() < deadline
            time.sleep(0.1)
    assert work.record["jobId"] != first_job and work.record.get("downloaded")


class ListingReadBefore(PodClient):
    """A client whose first models() answer is one read earlier: the pass's listing predates the download."""

    def __init__(self, base_url: str, token: str, earlier: list[ModelListing]) -> None:
        super().__init__(base_url, token)
        self.earlier: list[ModelListing] | None = earlier

    def models(self) -> list[ModelListing]:
        if self.earlier is not None:
            earlier, self.earlier = self.earlier, None
            return earlier
        return super().models()


def test_a_download_that_ends_during_the_pass_still_reports_its_variant(pod_server: ServerProcess,
                                                                        hub: FakeHub) -> None:
    """The pass reads the listing, then finds the download job completed. A listing read before the files
    arrived has no variant; the pass reads it again, so Loading (and the Ready after it) says which one."""
    pod = PodView("p-4", "uid-4", "127.0.0.1", True, True, False, "uid-4/server-1", "h", None)
    spec = parse_spec({"model": LATE_REPO, "gpu": {"count": 0}})
    hub.bytes_per_second = 1_000_000  # the first pass must find the download still running
    try:
        with client(pod_server) as c:
            before = c.models()
            assert not any(m.key == "pc-org/late-gguf" for m in before)
            work = rc.examine_pod(c, pod, spec, {"name": "p-4"}, time.time(), 1.0)
            assert work.state.stage == st.DOWNLOADING and work.state.variant is None
            deadline = time.monotonic() + 30
            while c.download_status(work.record["jobId"]).status != "completed":  # type: ignore[union-attr]
                assert time.monotonic() < deadline
                time.sleep(0.05)
    finally:
        hub.bytes_per_second = None
    with ListingReadBefore(pod_server.base_url, TOKEN, before) as late:
        work = rc.examine_pod(late, pod, spec, work.record, time.time(), 1.0)
    assert work.load and work.state.stage == st.LOADING and work.state.variant == "q4_k_m", work.state


def test_a_load_the_kernel_killed_is_not_retried_on_that_pod(pod_server: ServerProcess) -> None:
    """The server's memory estimate is noted before each load; when the pod's next server reports that the
    last one was OOMKilled, the same load is not sent again (it would only be killed again) and the state
    names the memory limit and the estimate. The real kill: tests/test_operator_e2e.py on the real node."""
    spec = parse_spec({"model": REPO, "gpu": {"count": 0}, "contextLength": 256})
    pod = PodView("p-5", "uid-5", "127.0.0.1", True, True, False, "uid-5/server-1", "h", None, memory_limit="256Mi")
    with client(pod_server) as c:
        work = rc.examine_pod(c, pod, spec, {"name": "p-5"}, time.time(), 1.0)
        while not work.load:
            time.sleep(0.2)
            work = rc.examine_pod(c, pod, spec, work.record, time.time(), 1.0)
        work = rc.load_on_pod(c, pod, spec, work, time.time(), 1.0)
        assert work.state.stage == st.READY and work.record["estimateBytes"] > 0
        assert work.record["loadAttempt"] == work.record["loaded"]
        killed = PodView("p-5", "uid-5", "127.0.0.1", True, True, False, "uid-5/server-2", "h", None,
                         memory_limit="256Mi", oom_killed=True)
        failed = rc.examine_pod(c, killed, spec, work.record, time.time(), 1.0)
        assert (failed.state.stage, failed.state.reason, failed.load) == (st.FAILED, "OOMKilled", False)
        assert "memory limit is 256Mi" in failed.state.message and "needs an estimated" in failed.state.message
        assert "at context length 256" in failed.state.message, failed.state.message
        # A new spec (a shorter context) is a different load: tried again on the same pod.
        shorter = parse_spec({"model": REPO, "gpu": {"count": 0}, "contextLength": 128})
        retry = rc.examine_pod(c, killed, shorter, failed.record, time.time(), 1.0)
        assert retry.load, retry.state
        for instance in c.loaded():
            c.unload(instance.instance_id)
