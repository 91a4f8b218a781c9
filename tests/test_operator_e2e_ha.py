"""The operator end to end on the real node (as tests/test_operator_e2e.py): the operator itself restarted
mid-download (the server's download job is resumed, not restarted) and two peered operator replicas (one
active, the other takes over when it stops).

One namespace and operator for the module; the tests run in file order and each removes its LocalModel(s)
at the end.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
from hf_hub_server import FakeHub
from kube_cluster import KubeCluster
from lmkube.operator import peering
from node_support import POD_TIMEOUT, kube, node_namespace
from operator_e2e_support import (
    BIG2_REPO,
    TINY_REPO,
    api,
    create_lm,
    delete_and_wait_gone,
    hub,
    lm_spec,
    operator,
    wait_phase,
)
from operator_support import Api, OperatorProcess
from project_image import BUILD_TIMEOUT
from real_node import RealNode
from support import wait_until

__all__ = ["api", "hub", "kube", "node_namespace", "operator"]  # fixtures

# The project image: a source change rebuilds it (minutes) before the first pod; `-m "not image"` skips these.
pytestmark = [pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning"), pytest.mark.image,
              pytest.mark.timeout(BUILD_TIMEOUT + 900)]


def test_operator_restart_mid_download_keeps_the_job(real_node: RealNode, api: Api, hub: FakeHub,
                                                     operator: OperatorProcess) -> None:
    hub.bytes_per_second = 200_000  # ~10 s
    try:
        (volume,) = create_lm(real_node, api, "resume", lm_spec(hub, BIG2_REPO))
        assert volume is not None
        status = wait_phase(api, operator, "resume", "Downloading", timeout=POD_TIMEOUT)
        wait_until(lambda: (api.status("resume").get("pods") or [{}])[0].get("jobId"), timeout=30)
        job = api.status("resume")["pods"][0]["jobId"]
        operator.stop(signal.SIGKILL)
        time.sleep(1)
        operator.start()
        status = wait_phase(api, operator, "resume", "Ready", timeout=POD_TIMEOUT)
    finally:
        hub.bytes_per_second = None
    assert status["pods"][0]["jobId"] == job
    table = json.loads((volume / ".lmkube" / "downloads.json").read_text())
    assert [j["job_id"] for j in table["jobs"]] == [job], table
    blob = [path for path, _ in hub.blob_requests()]
    assert len(blob) == len(set(blob)), hub.blob_requests()  # each file fetched once, never restarted
    delete_and_wait_gone(api, "resume")


def test_peering_one_active_replica_and_failover(real_node: RealNode, kube: KubeCluster, api: Api, hub: FakeHub,
                                                 operator: OperatorProcess, tmp_path: Path) -> None:
    """Two `--peering` replicas: the higher priority one works, the other stands by and takes over when it stops."""
    (tmp_path / "peering.yaml").write_text(peering.render())
    kube.kubectl("apply", "-f", str(tmp_path / "peering.yaml"))
    kube.kubectl("wait", "--for=condition=Established", "crd/kopfpeerings.kopf.dev", "--timeout=120s")
    api.custom.create_namespaced_custom_object(peering.GROUP, peering.VERSION, api.namespace, "kopfpeerings",
                                               peering.peering_object("lmkube", api.namespace))
    operator.stop()
    replicas = [OperatorProcess(operator.kubeconfig, api.namespace, tmp_path / f"{name}.log", env=operator.env,
                                args=("--peering", "lmkube", "--priority", str(priority)))
                for name, priority in (("high", 200), ("low", 100))]
    try:
        for replica in replicas:
            replica.start()
        high, low = replicas
        resumed = "Resuming operations after the pause"  # kopf starts paused until it has seen the peers
        wait_until(lambda: resumed in high.log(), timeout=POD_TIMEOUT,
                   message=f"high-priority replica active:\n{high.log()}")
        create_lm(real_node, api, "peer", lm_spec(hub, TINY_REPO))
        wait_phase(api, high, "peer", "Ready", timeout=POD_TIMEOUT)
        assert resumed not in low.log() and "/peer" not in low.log(), low.log()  # the standby did nothing
        high.stop()  # a graceful stop leaves the peering: the standby resumes at once
        wait_until(lambda: "Resuming operations after the pause" in low.log(), timeout=POD_TIMEOUT,
                   message=f"standby resumes:\n{low.log()[-3000:]}")
        api.patch_lm("peer", {"contextLength": 256})
        wait_phase(api, low, "peer", "Ready", timeout=POD_TIMEOUT, contextLength=256)
        delete_and_wait_gone(api, "peer")
    finally:
        for replica in replicas:
            replica.stop()
        operator.start()
