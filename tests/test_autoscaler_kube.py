"""The autoscaler on the real control plane (no kubelet: pods stay Pending, so the load comes from a load source
the test sets, in place of the pods' /metrics that tests/test_scaling_real_node.py reads for real).

The operator runs in this process (kopf in a thread, the same handlers and autoscaler as `lmkube operator`), so
a test can restart it: the autoscaler sets spec.replicas and the StatefulSet follows; a model with minReplicas 0
goes to zero (phase ScaledToZero, its volume kept); `kubectl scale` works through the scale subresource, on a
model without spec.scaling and on one with it; a restarted operator keeps the count it had reached.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import kopf
import kubernetes.config
import pytest
from kube_cluster import KubeCluster
from lmkube.operator import autoscaler as scaler
from lmkube.operator import crd, resources
from lmkube.operator.handlers import Timing, build_runtime, register
from lmkube.operator.kube import Kube
from lmkube.operator.spec import LocalModelSpec
from operator_support import Api, install_crd
from support import wait_until

pytestmark = pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")

INTERVAL = 0.3
SHARED = {"model": "hub-org/Scale-GGUF", "gpu": {"count": 0}, "storage": {"existingClaim": "shared-models"}}


class Loads:
    """The load source: running + queued requests per LocalModel name, as the test sets them."""

    def __init__(self) -> None:
        self.values: dict[str, float | None] = {}

    def __call__(self, body: Mapping[str, Any], spec: LocalModelSpec) -> float | None:
        return self.values.get(body["metadata"]["name"])


@contextmanager
def operator(kube: KubeCluster, namespace: str, loads: Loads) -> Iterator[scaler.Autoscaler]:
    """The operator's handlers and autoscaler on kopf in a thread of this process, until the block ends."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(kube.kubeconfig))
        client = Kube(kube.api_client())
        runtime = build_runtime(timing=Timing(poll_seconds=0.5, resync_seconds=3, retry_seconds=1), kube=client)
        autoscaler = scaler.Autoscaler(kube=client, load=loads, interval=INTERVAL)
        registry = kopf.OperatorRegistry()
        register(registry, runtime)
        scaler.register(registry, autoscaler)
        ready, stop = threading.Event(), threading.Event()
        thread = threading.Thread(target=lambda: asyncio.run(kopf.operator(
            registry=registry, standalone=True, clusterwide=False, namespaces=[namespace], ready_flag=ready,
            stop_flag=stop)), name="kopf-under-test", daemon=True)
        thread.start()
        try:
            assert ready.wait(60), "kopf did not start"
            yield autoscaler
        finally:
            stop.set()
            thread.join(60)
    assert not thread.is_alive()


@pytest.fixture
def api(kube: KubeCluster, kube_namespace: str) -> Iterator[Api]:
    install_crd(kube)
    client = Api(kube, kube_namespace)
    yield client
    client.close()


def replicas(api: Api, name: str) -> tuple[int | None, int | None]:
    """(spec.replicas of the LocalModel, spec.replicas of its StatefulSet)."""
    pods = api.read("StatefulSet", resources.names(name).statefulset) or {"spec": {}}
    return (api.lm(name) or {"spec": {}})["spec"].get("replicas"), pods["spec"].get("replicas")


def reasons(api: Api, name: str) -> list[str]:
    events = sorted(api.events(name), key=lambda e: e.get("lastTimestamp") or "")
    return [e["reason"] for e in events if e["reason"].startswith("Scale") or e["reason"] in ("External",)]


def test_the_autoscaler_follows_the_load_up_and_back_down(kube: KubeCluster, kube_namespace: str, api: Api) -> None:
    loads = Loads()
    scaling = {"minReplicas": 1, "maxReplicas": 3, "targetRequests": 4, "scaleDownDelay": 3, "window": 1}
    with operator(kube, kube_namespace, loads):
        api.create_lm("busy", {**SHARED, "scaling": scaling})
        loads.values["busy"] = 1
        wait_until(lambda: api.status("busy").get("desiredReplicas") == 1, timeout=60,
                   message=f"no decision: {api.status('busy')}")
        # The first pass creates the StatefulSet; the autoscaler may have decided before it.
        wait_until(lambda: replicas(api, "busy") == (1, 1), timeout=60, message=f"{replicas(api, 'busy')}")
        loads.values["busy"] = 10  # ceil(10 / 4) = 3
        wait_until(lambda: replicas(api, "busy") == (3, 3), timeout=60, message=f"{replicas(api, 'busy')}")
        status = wait_until(lambda: (s := api.status("busy")).get("desiredReplicas") == 3 and s, timeout=30)
        assert status["scaling"]["lastScaleReason"] == "ScaleUp", status
        assert "10 requests" in status["scaling"]["lastScaleMessage"]
        # Below what 3 replicas carry, but not for scaleDownDelay yet.
        began = time.monotonic()
        loads.values["busy"] = 2
        wait_until(lambda: replicas(api, "busy") == (1, 1), timeout=60, message=f"{api.status('busy')}")
        assert time.monotonic() - began >= 3 - INTERVAL
        # spec.replicas is written first, then the status: wait for it rather than race it.
        wait_until(lambda: api.status("busy")["scaling"]["lastScaleReason"] == "ScaleDown", timeout=30)
        wait_until(lambda: reasons(api, "busy")[-2:] == ["ScaleUp", "ScaleDown"], timeout=30,
                   message=f"events: {reasons(api, 'busy')}")


def test_an_idle_model_with_min_zero_goes_to_zero_and_keeps_its_volume(
        kube: KubeCluster, kube_namespace: str, api: Api) -> None:
    loads = Loads()
    with operator(kube, kube_namespace, loads):
        api.create_lm("idle", {"model": "hub-org/Scale-GGUF", "gpu": {"count": 0}, "storage": {"size": "1Gi"},
                               "scaling": {"minReplicas": 0, "maxReplicas": 1, "scaleDownDelay": 2, "window": 1}})
        loads.values["idle"] = 0
        wait_until(lambda: replicas(api, "idle") == (0, 0), timeout=60, message=f"{api.status('idle')}")
        wait_until(lambda: (api.status("idle").get("phase"), api.status("idle").get("replicas")) == ("ScaledToZero", 0),
                   timeout=60, message=f"{api.status('idle')}")
        assert api.status("idle")["scaling"]["lastScaleReason"] == "ScaleToZero"
        assert api.read("PersistentVolumeClaim", resources.replica_claim("idle", 0)) is not None
        # At zero it stays there: nothing serves the model, so no demand is measured.
        time.sleep(6 * INTERVAL)
        assert replicas(api, "idle") == (0, 0)
        # The scale subresource is how the gateway wakes it (tests/test_gateway_wake.py): one replica, kept.
        kube.kubectl("scale", "lm", "idle", "--replicas=1", "-n", kube_namespace)
        wait_until(lambda: api.status("idle").get("scaling", {}).get("lastScaleReason") == "ScaleFromZero",
                   timeout=30, message=f"{api.status('idle')}")
        assert replicas(api, "idle") == (1, 1)
        wait_until(lambda: "ScaleFromZero" in reasons(api, "idle"), timeout=30, message=f"{reasons(api, 'idle')}")


def test_kubectl_scale_through_the_scale_subresource(kube: KubeCluster, kube_namespace: str, api: Api) -> None:
    with operator(kube, kube_namespace, Loads()):
        api.create_lm("manual", SHARED)
        wait_until(lambda: replicas(api, "manual") == (1, 1), timeout=60)
        kube.kubectl("scale", "lm", "manual", "--replicas=2", "-n", kube_namespace)
        wait_until(lambda: replicas(api, "manual") == (2, 2), timeout=60, message=f"{replicas(api, 'manual')}")
        wait_until(lambda: api.status("manual").get("replicas") == 2, timeout=60, message=f"{api.status('manual')}")
        scale = json.loads(kube.kubectl("get", "lm", "manual", "--subresource=scale", "-o", "json",
                                        "-n", kube_namespace).stdout)
        assert scale["kind"] == "Scale" and scale["spec"]["replicas"] == 2 and scale["status"]["replicas"] == 2
        assert scale["status"]["selector"] == resources.selector_string("manual")
        kube.kubectl("scale", "lm", "manual", "--replicas=0", "-n", kube_namespace)
        wait_until(lambda: replicas(api, "manual") == (0, 0), timeout=60)
        wait_until(lambda: api.status("manual").get("phase") == "ScaledToZero", timeout=60)


def test_kubectl_scale_on_an_autoscaled_model_holds_until_the_delay(
        kube: KubeCluster, kube_namespace: str, api: Api) -> None:
    loads = Loads()
    scaling = {"minReplicas": 1, "maxReplicas": 3, "targetRequests": 4, "scaleDownDelay": 4, "window": 1}
    with operator(kube, kube_namespace, loads):
        api.create_lm("both", {**SHARED, "scaling": scaling})
        loads.values["both"] = 0
        wait_until(lambda: api.status("both").get("desiredReplicas") == 1, timeout=60)
        kube.kubectl("scale", "lm", "both", "--replicas=3", "-n", kube_namespace)
        wait_until(lambda: api.status("both").get("scaling", {}).get("lastScaleReason") == "External", timeout=30,
                   message=f"{api.status('both')}")
        accepted = time.monotonic()
        assert replicas(api, "both")[0] == 3
        wait_until(lambda: replicas(api, "both") == (1, 1), timeout=60)
        assert time.monotonic() - accepted >= 4 - 2 * INTERVAL
        # Past maxReplicas: clamped at once.
        kube.kubectl("scale", "lm", "both", "--replicas=7", "-n", kube_namespace)
        wait_until(lambda: api.status("both").get("scaling", {}).get("lastScaleReason") == "OutOfRange", timeout=30)
        wait_until(lambda: replicas(api, "both") == (3, 3), timeout=60)


def test_a_restarted_operator_keeps_the_count_it_reached(kube: KubeCluster, kube_namespace: str, api: Api) -> None:
    loads = Loads()
    scaling = {"minReplicas": 1, "maxReplicas": 3, "targetRequests": 4, "scaleDownDelay": 3, "window": 2}
    with operator(kube, kube_namespace, loads):
        api.create_lm("steady", {**SHARED, "scaling": scaling})
        loads.values["steady"] = 9  # ceil(9 / 4) = 3
        wait_until(lambda: replicas(api, "steady") == (3, 3), timeout=60)
    # Restarted mid-scale, with demand down to what 2 replicas carry: a fresh operator has no samples, so it
    # first gathers half a window and then waits the full scale-down delay, never dipping below 2 on the way.
    loads.values["steady"] = 5
    with operator(kube, kube_namespace, loads) as autoscaler:
        restarted = time.monotonic()
        seen: list[int | None] = []
        while (count := replicas(api, "steady")[0]) == 3:
            assert time.monotonic() - restarted < 60, f"{api.status('steady')}"
            seen.append(count)
            time.sleep(0.1)
        assert time.monotonic() - restarted >= 3 + 1 - INTERVAL
        assert count == 2 and len(seen) > 10, seen
        wait_until(lambda: replicas(api, "steady") == (2, 2), timeout=30)
        assert autoscaler.models() == {(kube_namespace, "steady")}
        wait_until(lambda: api.status("steady")["scaling"]["lastScaleReason"] == "ScaleDown", timeout=30)


def test_the_scale_subresource_validates_spec_scaling(kube: KubeCluster, kube_namespace: str, api: Api) -> None:
    body = {"apiVersion": crd.API_VERSION, "kind": crd.KIND, "metadata": {"name": f"bad-{secrets.token_hex(2)}"},
            "spec": {**SHARED, "scaling": {"minReplicas": 3, "maxReplicas": 2}}}
    result = kube.kubectl("apply", "-n", kube_namespace, "-f", "-", check=False, input=json.dumps(body))
    assert result.returncode != 0 and "minReplicas must not exceed maxReplicas" in result.stderr, result.stderr
