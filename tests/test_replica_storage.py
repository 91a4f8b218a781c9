"""Per-replica cache volumes on the real control plane (no kubelet: pods stay Pending, which is all the API and
the controllers need): the StatefulSet the operator makes gets one claim per replica (the first replicas' made
by the operator with it, later ones by the StatefulSet controller), keeps them when it scales down, and loses
them with its LocalModel. The same on a real node, with pods that download, load and answer:
test_operator_e2e.py's per-replica storage test."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kube_cluster import KubeCluster
from lmkube.operator import resources
from operator_support import OPERATOR_ACCOUNT, Api, OperatorProcess, grant_operator_rules, install_crd
from support import wait_until

pytestmark = pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")

SPEC = {"model": "hub-org/Pair-GGUF", "gpu": {"count": 0}, "storage": {"size": "1Gi"}}


@pytest.fixture
def operator(kube: KubeCluster, kube_namespace: str, tmp_path: Path) -> Iterator[OperatorProcess]:
    install_crd(kube)
    grant_operator_rules(kube, kube_namespace)
    kubeconfig = kube.service_account_kubeconfig(kube_namespace, OPERATOR_ACCOUNT, tmp_path / "kubeconfig")
    process = OperatorProcess(kubeconfig, kube_namespace, tmp_path / "operator.log")
    process.start()
    yield process
    process.stop()
    assert "Forbidden" not in process.log(), process.log()[-4000:]


def claims(api: Api) -> dict[str, dict[str, Any]]:
    items = json.loads(api.core.list_namespaced_persistent_volume_claim(api.namespace,
                                                                        _preload_content=False).data)["items"]
    return {c["metadata"]["name"]: c for c in items if not c["metadata"].get("deletionTimestamp")}


def writers(obj: dict[str, Any]) -> set[tuple[str, str]]:
    """(manager, operation) of the writes to the object itself (a status subresource's aside)."""
    return {(f["manager"], f["operation"]) for f in obj["metadata"].get("managedFields", [])
            if not f.get("subresource")}


def test_each_replica_gets_a_claim_that_outlives_scale_down_but_not_the_model(
        kube: KubeCluster, kube_namespace: str, operator: OperatorProcess) -> None:
    api = Api(kube, kube_namespace)
    try:
        api.create_lm("pair", {**SPEC, "replicas": 2})
        wanted = {resources.replica_claim("pair", 0), resources.replica_claim("pair", 1)}
        wait_until(lambda: set(claims(api)) == wanted and len(api.pods("pair")) == 2, timeout=60,
                   message=f"claims {sorted(claims(api))}, pods {len(api.pods('pair'))}\n{operator.log()[-3000:]}")
        assert api.status("pair").get("phase") != "Failed", api.status("pair")  # no InvalidSpec any more
        sts = api.read("StatefulSet", "lm-pair")
        assert sts is not None and sts["metadata"]["ownerReferences"][0]["name"] == "pair"
        for claim in claims(api).values():
            assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
            assert claim["spec"]["resources"]["requests"]["storage"] == "1Gi"
            assert claim["metadata"]["labels"]["app.kubernetes.io/instance"] == "pair"
            # whenDeleted: Delete. Made by the operator as the controller makes it, so the controller neither made
            # it nor had to update its owner (on its rate-limited client, with 200 models a minute's work)
            assert claim["metadata"]["ownerReferences"] == [
                {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "lm-pair", "uid": sts["metadata"]["uid"],
                 "controller": True, "blockOwnerDeletion": True}]
            assert writers(claim) == {("lmkube-operator", "Update")}, claim["metadata"]["managedFields"]
        # and it did not race the controller to them (the loser's "already exists" is a FailedCreate Warning)
        events = json.loads(api.core.list_namespaced_event(kube_namespace, _preload_content=False).data)["items"]
        assert not [e["message"] for e in events if e["reason"] == "FailedCreate"]
        mounted = {p["metadata"]["name"]: next(v["persistentVolumeClaim"]["claimName"] for v in p["spec"]["volumes"]
                                               if v["name"] == "models") for p in api.pods("pair")}
        assert mounted == {"lm-pair-0": resources.replica_claim("pair", 0),
                           "lm-pair-1": resources.replica_claim("pair", 1)}

        api.patch_lm("pair", {"replicas": 3})  # a replica added later: its claim comes from the controller
        wanted.add(resources.replica_claim("pair", 2))
        wait_until(lambda: set(claims(api)) == wanted and len(api.pods("pair")) == 3, timeout=60,
                   message=f"claims {sorted(claims(api))}, pods {len(api.pods('pair'))}")
        assert writers(claims(api)[resources.replica_claim("pair", 2)]) == {("kube-controller-manager", "Update")}

        api.patch_lm("pair", {"replicas": 1})  # scale down: the pods go, their claims (their files) stay
        wait_until(lambda: [p["metadata"]["name"] for p in api.pods("pair")] == ["lm-pair-0"], timeout=60)
        assert set(claims(api)) == wanted

        api.delete_lm("pair")
        wait_until(lambda: not claims(api) and api.read("StatefulSet", "lm-pair") is None, timeout=90,
                   message=f"claims left: {sorted(claims(api))}")
    finally:
        api.close()


def test_the_operator_account_sets_a_pods_gate_and_keeps_the_kubelets_conditions(
        kube: KubeCluster, kube_namespace: str, operator: OperatorProcess, tmp_path: Path) -> None:
    """The readiness gate's write (operator/readiness.py) on the real API server, as the operator's ServiceAccount
    with the chart's rules: a strategic merge patch of pods/status that merges by condition type."""
    import kubernetes.client
    import kubernetes.config
    from lmkube.operator.kube import Kube

    api = Api(kube, kube_namespace)
    kubeconfig = kube.service_account_kubeconfig(kube_namespace, OPERATOR_ACCOUNT, tmp_path / "operator-kubeconfig")
    client = kubernetes.config.new_client_from_config(str(kubeconfig))
    try:
        api.create_lm("gated", {**SPEC})
        wait_until(lambda: len(api.pods("gated")) == 1, timeout=60, message=f"no pod\n{operator.log()[-3000:]}")
        (pod,) = api.pods("gated")
        name = pod["metadata"]["name"]
        assert pod["spec"]["readinessGates"] == [{"conditionType": resources.MODEL_LOADED_CONDITION}]
        # What a kubelet would have written (no kubelet here).
        api.core.patch_namespaced_pod_status(name, kube_namespace, {"status": {"conditions": [
            {"type": "ContainersReady", "status": "True"}, {"type": "Ready", "status": "False"}]}})
        Kube(client).set_pod_condition(kube_namespace, name, pod["metadata"]["uid"], {
            "type": resources.MODEL_LOADED_CONDITION, "status": "True", "reason": "Loaded",
            "message": "the model is loaded", "lastTransitionTime": "2026-12-02T21:00:00Z"})
        conditions = {c["type"]: c["status"] for c in api.read("Pod", name)["status"]["conditions"]}
        assert conditions[resources.MODEL_LOADED_CONDITION] == "True"
        assert conditions["ContainersReady"] == "True" and conditions["Ready"] == "False"  # merged, not replaced
        Kube(client).set_pod_condition(kube_namespace, "no-such-pod", "0", {  # a pod gone meanwhile: no error
            "type": resources.MODEL_LOADED_CONDITION, "status": "False"})
        # Nor a pod re-created under the same name (another uid): the write does not reach it.
        Kube(client).set_pod_condition(kube_namespace, name, "another-uid", {
            "type": resources.MODEL_LOADED_CONDITION, "status": "False"})
        conditions = {c["type"]: c["status"] for c in api.read("Pod", name)["status"]["conditions"]}
        assert conditions[resources.MODEL_LOADED_CONDITION] == "True"
        api.delete_lm("gated")
    finally:
        client.close()
        api.close()


def test_what_a_new_spec_drops_goes_from_the_statefulsets_pods(
        kube: KubeCluster, kube_namespace: str, operator: OperatorProcess) -> None:
    api = Api(kube, kube_namespace)
    try:
        placed = {**SPEC, "nodeSelector": {"pool": "gpu"},
                  "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}
        api.create_lm("moved", placed)

        def pod_spec() -> dict[str, Any]:
            sts = api.read("StatefulSet", "lm-moved")
            return sts["spec"]["template"]["spec"] if sts else {}

        wait_until(lambda: "nodeSelector" in pod_spec(), timeout=60, message=operator.log()[-3000:])
        assert pod_spec()["tolerations"] == placed["tolerations"]
        api.patch_lm("moved", {"nodeSelector": None, "tolerations": None})  # off the GPU pool
        wait_until(lambda: pod_spec() and not {"nodeSelector", "tolerations"} & set(pod_spec()), timeout=60,
                   message=f"{pod_spec()}\n{operator.log()[-3000:]}")
        # and the pods the controller makes now are the new template's
        wait_until(lambda: [p["spec"].get("nodeSelector") for p in api.pods("moved")] == [None], timeout=60,
                   message=f"{[p['spec'].get('nodeSelector') for p in api.pods('moved')]}")
        api.delete_lm("moved")
    finally:
        api.close()
