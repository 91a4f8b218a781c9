"""The load memory check inside a real memory cgroup: `lmkube serve` started in a child memory cgroup of the
test's own, with a limit far below the machine's free memory, as a pod's container is. The server's estimate
counts the limit, a load the limit cannot hold is a 409 naming it (instead of the kernel's OOM killer), and the
operator's load step reports that as InsufficientMemory in spec terms. The cgroup files' parsing is unit-tested
in tests/test_host_memory_unit.py; the pod on a real node in tests/test_operator_e2e_failures.py.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cli_support import run_cli
from lmkube.operator import reconcile as rc
from lmkube.operator import status as st
from lmkube.operator.observe import PodView
from lmkube.operator.podclient import PodClient
from lmkube.operator.spec import parse_spec
from support import LMKUBE, ServerProcess, free_port

from lmkube.synthetic_gguf import LlamaShape, write_llama_model

LIMIT = 512 << 20
MODEL = "acme/long-context"
# 256 bytes of KV cache per token (2 layers, 2 KV heads of 16, F16 K and V): 4M tokens is 1 GiB, twice the limit,
# and a small part of a test machine's free memory.
TOO_LONG = 1 << 22
CGROUPS = Path("/sys/fs/cgroup")


def own_memory_cgroup() -> tuple[Path, str, str] | None:
    """The test process's memory cgroup directory and its limit and usage files (v1 or v2), if writable."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if "memory" in controllers.split(","):
            directory = CGROUPS / "memory" / path.lstrip("/")
            if os.access(directory, os.W_OK):
                return directory, "memory.limit_in_bytes", "memory.usage_in_bytes"
        elif hierarchy == "0" and controllers == "":
            directory = CGROUPS / path.lstrip("/")
            control = directory / "cgroup.subtree_control"
            if control.exists() and "memory" in control.read_text().split() and os.access(directory, os.W_OK):
                return directory, "memory.max", "memory.current"
    return None


@pytest.fixture(scope="module")
def limited_cgroup() -> Iterator[Path]:
    found = own_memory_cgroup()
    if found is None:
        pytest.skip("needs a memory cgroup this process may create children in (root on cgroup v1, or a v2 "
                    "subtree with the memory controller delegated)")
    parent, limit_file, _ = found
    group = parent / f"lmkube-test-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    try:
        (group / limit_file).write_text(str(LIMIT))
        yield group
    finally:
        with contextlib.suppress(OSError):  # its processes are gone by now: their server fixture stopped them
            group.rmdir()


@pytest.fixture(scope="module")
def limited_server(limited_cgroup: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    models = tmp_path_factory.mktemp("cgroup-models")
    write_llama_model(models / "acme" / "long-context" / "long-context-F16.gguf", seed=7, name="Long Context",
                      shape=LlamaShape(n_ctx_train=TOO_LONG))
    home = tmp_path_factory.mktemp("cgroup-home")
    port = free_port()
    log_path = home / "server.log"
    # The shell joins the cgroup, then becomes the server: everything the server allocates is charged there.
    command = (f'echo $$ > "{limited_cgroup}/cgroup.procs" && exec "{LMKUBE}" serve --models-dir "{models}" '
               f"--port {port} --threads 2")
    with log_path.open("wb") as log:
        process = subprocess.Popen(["sh", "-c", command], stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "LMKUBE_HOME": str(home)})
    server = ServerProcess(process, port, log_path)
    try:
        server.wait_ready(timeout=120)
        yield server
    finally:
        server.stop()


def test_the_estimate_counts_the_cgroup_limit_not_the_machines_memory(limited_server: ServerProcess,
                                                                        limited_cgroup: Path) -> None:
    assert (limited_cgroup / "cgroup.procs").read_text().split() == [str(limited_server.process.pid)]
    small = httpx.post(f"{limited_server.base_url}/api/v1/models/load",
                       json={"model": MODEL, "context_length": 4096, "estimate_only": True}, timeout=60).json()
    available = small["available"]
    assert available["ram_limit_bytes"] == LIMIT, available
    # The limit less what the server already uses: below the limit, far below the machine's MemAvailable.
    assert 0 < available["ram_bytes"] < LIMIT, available
    assert small["fits"] is True
    # `lmkube load --estimate-only` says the free RAM is a limit's, not the machine's.
    result = run_cli("load", MODEL, "--estimate-only", "-c", "4096", server=limited_server)
    assert result.code == 0, result.err
    assert any(line.startswith("Available: RAM ") and "(within a memory limit of 0.50 GiB)" in line
               for line in result.out.splitlines()), result.out


def test_a_load_the_limit_cannot_hold_is_refused_naming_the_limit(limited_server: ServerProcess) -> None:
    load = {"model": MODEL, "context_length": TOO_LONG, "flash_attention": True}
    url = f"{limited_server.base_url}/api/v1/models/load"
    estimate = httpx.post(url, json={**load, "estimate_only": True}, timeout=60).json()
    assert estimate["fits"] is False and estimate["estimate"]["host_bytes"] > LIMIT, estimate
    refused = httpx.post(url, json=load, timeout=60)
    assert refused.status_code == 409, refused.text
    error = refused.json()["error"]
    assert error["code"] == "insufficient_memory", error
    assert "within the server's memory limit of 0.50 GiB" in error["message"], error
    assert f"context_length {TOO_LONG}" in error["message"], error
    assert limited_server.process.poll() is None  # refused, not killed
    # A context the limit holds loads in the same cgroup.
    loaded = httpx.post(url, json={"model": MODEL, "context_length": 4096}, timeout=120)
    assert loaded.status_code == 200, loaded.text
    # Its host prompt cache gets at most half of what the limit leaves, not --cache-ram's 1 GiB: the cache
    # fills long after the load's check, and past the limit the kernel would kill the server.
    metrics = httpx.get(f"{limited_server.base_url}/metrics", timeout=30).text
    [budget] = [float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                if line.startswith("lmkube_host_cache_budget_bytes{")]
    assert 0 < budget <= LIMIT // 2, budget
    unloaded = httpx.post(f"{limited_server.base_url}/api/v1/models/unload",
                          json={"instance_id": loaded.json()["instance_id"]}, timeout=60)
    assert unloaded.status_code == 200, unloaded.text


def test_the_operator_reports_the_refusal_as_insufficient_memory_in_spec_terms(limited_server: ServerProcess) -> None:
    spec = parse_spec({"model": MODEL, "gpu": {"count": 0}, "contextLength": TOO_LONG})
    pod = PodView("p-1", "uid-1", "127.0.0.1", True, True, False, "server-1", "h", None, memory_limit="512Mi")
    work = rc.PodWork(st.PodState(pod.name, st.LOADING, "Loading", ""), {"name": pod.name}, load=True)
    with PodClient(limited_server.base_url, None) as client:
        failed = rc.load_on_pod(client, pod, spec, work, 0.0, 1.0)
    assert (failed.state.stage, failed.state.reason) == (st.FAILED, "InsufficientMemory"), failed.state
    message = failed.state.message
    assert message.startswith(f"pod p-1: not enough memory to load {MODEL}: its memory limit is 512Mi"), message
    assert "needs an estimated" in message and f"at context length {TOO_LONG}" in message, message
    assert "raise spec.resources.limits.memory or lower spec.contextLength" in message, message
    # The server's figures come along; its advice to API clients (evict, force) does not.
    assert "within the server's memory limit of 0.50 GiB" in message and "force" not in message, message
    assert failed.record["retryAt"] and failed.record["estimateBytes"] > LIMIT
    assert limited_server.process.poll() is None
