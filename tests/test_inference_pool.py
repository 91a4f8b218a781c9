"""Gateway API Inference Extension compatibility of the operator: the engine-type label on model pods, and the
InferencePool (`inference.networking.k8s.io/v1`) per LocalModel when the chart's inferenceExtension is enabled.

In-process against tests/fake_kube.py (the builder, the settings, the condition and Event when the CRD is
missing), then on the real control plane (no kubelet) with GIE's own CRD, fetched from its Go module by
scripts/install-test-cluster.sh: the real operator creates the pool once the CRD appears, the API server
validates it against GIE's schema, and the garbage collector deletes it with its LocalModel.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import kubernetes.client
import pytest
import yaml
from fake_kube import NAMESPACE, FakeCluster, FakeKube
from kube_cluster import ROOT, KubeCluster, install_binaries
from kubernetes.client.exceptions import ApiException
from lmkube.operator import inference_pool as ip
from lmkube.operator import rbac, resources
from lmkube.operator.spec import InferencePoolSettings, OperatorSettings, parse_spec
from operator_support import OPERATOR_ACCOUNT, Api, OperatorProcess, condition, grant_operator_rules, install_crd
from support import wait_until

pytestmark = pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")

MODEL = "acme/Tiny-Chat-GGUF"
POOLS = OperatorSettings(inference_pool=InferencePoolSettings())
GIE_CRD_NAME = f"{ip.PLURAL}.{ip.GROUP}"
CHART = ROOT / "charts" / "lmkube"


# -- in-process --------------------------------------------------------------------------------------


def test_model_pods_carry_the_engine_type_the_picker_reads() -> None:
    template = resources.statefulset("qwen", "ns", parse_spec({"model": MODEL}))["spec"]["template"]
    assert template["metadata"]["labels"]["llm-d.ai/engine-type"] == "vllm"
    assert resources.selector_labels("qwen").items() <= template["metadata"]["labels"].items()
    # The label is not part of the (immutable) selector, so adding it never needs a new StatefulSet ...
    assert "llm-d.ai/engine-type" not in resources.statefulset("qwen", "ns", parse_spec({"model": MODEL}))[
        "spec"]["selector"]["matchLabels"]
    # ... and it is in the pod hash: pods made before the label existed are rolled to get it.
    pod = template["spec"]
    assert resources.pod_hash(pod, None, template["metadata"]["labels"]) != resources.pod_hash(
        pod, None, resources.labels("qwen"))


def test_pools_make_the_metrics_public_and_roll_the_pods_once() -> None:
    spec = parse_spec({"model": MODEL, "gpu": {"count": 0}})
    plain, pooled = resources.serve_args(spec), resources.serve_args(spec, POOLS)
    assert "--public-metrics" not in plain and pooled == [*plain, "--public-metrics"]
    annotation = resources.POD_HASH_ANNOTATION

    def pod_hash(settings: OperatorSettings) -> str:
        return resources.pod_template("m", spec, settings)["metadata"]["annotations"][annotation]

    assert pod_hash(OperatorSettings()) != pod_hash(POOLS)


def test_settings_from_the_chart_env() -> None:
    assert OperatorSettings.from_env({}).inference_pool is None
    assert OperatorSettings.from_env({"LMKUBE_OPERATOR_INFERENCE_POOL": "false"}).inference_pool is None
    assert OperatorSettings.from_env({"LMKUBE_OPERATOR_INFERENCE_POOL": "true"}).inference_pool == \
        InferencePoolSettings("{pool}-epp", 9002, "FailClose")
    env = {"LMKUBE_OPERATOR_INFERENCE_POOL": "true", "LMKUBE_OPERATOR_ENDPOINT_PICKER": "shared-epp",
           "LMKUBE_OPERATOR_ENDPOINT_PICKER_PORT": "9100", "LMKUBE_OPERATOR_ENDPOINT_PICKER_FAILURE_MODE": "FailOpen"}
    assert OperatorSettings.from_env(env).inference_pool == InferencePoolSettings("shared-epp", 9100, "FailOpen")
    with pytest.raises(ValueError, match="FailClose or FailOpen"):
        OperatorSettings.from_env({**env, "LMKUBE_OPERATOR_ENDPOINT_PICKER_FAILURE_MODE": "Maybe"})


def test_the_pool_selects_the_models_pods_on_the_server_port() -> None:
    owner = resources.owner_reference({"apiVersion": "lmkube.dev/v1alpha1", "kind": "LocalModel",
                                       "metadata": {"name": "qwen", "uid": "u-1"}})
    pool = ip.inference_pool("qwen", "ns", replace(POOLS, port=8000), owner)
    assert (pool["apiVersion"], pool["kind"]) == ("inference.networking.k8s.io/v1", "InferencePool")
    assert pool["metadata"]["name"] == resources.names("qwen").service == "lm-qwen"
    assert pool["metadata"]["ownerReferences"] == [owner]
    assert pool["spec"] == {
        "selector": {"matchLabels": resources.selector_labels("qwen")},
        "targetPorts": [{"number": 8000}],
        "endpointPickerRef": {"name": "lm-qwen-epp", "port": {"number": 9002}, "failureMode": "FailClose"}}
    shared = replace(POOLS, inference_pool=InferencePoolSettings("shared-epp", 9100, "FailOpen"))
    assert ip.inference_pool("qwen", "ns", shared)["spec"]["endpointPickerRef"] == {
        "name": "shared-epp", "port": {"number": 9100}, "failureMode": "FailOpen"}


class NoPoolCrd(FakeKube):
    """An API server without GIE's CRD: every InferencePool request is a 404."""

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        if kind == ip.KIND:
            return None  # Kube.get answers None for any 404
        return super().get(kind, namespace, name)

    def create(self, obj: Any) -> dict[str, Any]:
        if obj["kind"] == ip.KIND:
            raise ApiException(status=404, reason="Not Found")
        return super().create(obj)


def pool_condition(status: dict[str, Any]) -> tuple[str, str]:
    found = condition(status, ip.CONDITION)
    return found.get("status", ""), found.get("reason", "")


def test_reconcile_creates_the_pool_and_says_so() -> None:
    cluster = FakeCluster()
    cluster.options.settings = POOLS
    cluster.apply("tiny", {"model": MODEL})
    status = cluster.reconcile("tiny")
    pool = cluster.kube.get(ip.KIND, NAMESPACE, "lm-tiny")
    assert pool is not None and pool["metadata"]["ownerReferences"][0]["name"] == "tiny"
    assert pool_condition(status) == ("True", "Created")
    assert "lm-tiny-epp:9002" in condition(status, ip.CONDITION)["message"]
    cluster.reconcile("tiny")
    assert ("patch", ip.KIND, "lm-tiny") not in cluster.kube.writes  # unchanged: left alone
    # Changed behind the operator's back (or by new settings): put back.
    cluster.kube.objects[(ip.KIND, NAMESPACE, "lm-tiny")]["spec"]["targetPorts"] = [{"number": 1}]
    cluster.reconcile("tiny")
    assert cluster.kube.get(ip.KIND, NAMESPACE, "lm-tiny")["spec"]["targetPorts"] == [{"number": 1234}]


def test_without_the_crd_the_model_is_served_and_the_condition_says_why() -> None:
    cluster = FakeCluster()
    cluster.kube = NoPoolCrd()
    cluster.options.settings = POOLS
    cluster.apply("tiny", {"model": MODEL})
    status = cluster.reconcile("tiny")
    assert status["phase"] == "Pending"  # the StatefulSet and the rest are there all the same
    assert cluster.kube.get("StatefulSet", NAMESPACE, "lm-tiny") is not None
    assert pool_condition(status) == ("False", "CRDNotInstalled")
    assert "inferencepools.inference.networking.k8s.io" in condition(status, ip.CONDITION)["message"]
    warnings = [e for e in cluster.events if e[0] == "Warning"]
    assert [e[1] for e in warnings] == ["InferencePoolCRDNotInstalled"]
    cluster.reconcile("tiny")
    assert len([e for e in cluster.events if e[0] == "Warning"]) == 1  # said once, not every pass


def test_pools_off_means_no_pool_and_no_condition() -> None:
    cluster = FakeCluster()
    cluster.apply("tiny", {"model": MODEL})
    status = cluster.reconcile("tiny")
    assert cluster.kube.get(ip.KIND, NAMESPACE, "lm-tiny") is None and pool_condition(status) == ("", "")


def test_rbac_for_pools_is_separate() -> None:
    rules = rbac.rules()
    assert rules["inferencePool"] == [{"apiGroups": [ip.GROUP], "resources": [ip.PLURAL],
                                       "verbs": ["get", "create", "patch"]}]
    assert not any(ip.GROUP in r["apiGroups"] for r in rules["namespaced"] + rules["cluster"])


def render_chart(tmp_path: Path, *sets: str) -> list[dict[str, Any]]:
    home = tmp_path / "helm-home"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home),
           **{f"HELM_{k}_HOME": str(home / k.lower()) for k in ("CACHE", "CONFIG", "DATA")}}
    args = [a for value in sets for a in ("--set", value)]
    result = subprocess.run([install_binaries()["LMKUBE_HELM"], "template", "lmkube", str(CHART), "--namespace",
                             "lmkube-system", *args], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def test_chart_value_turns_pools_on_with_their_rbac(tmp_path: Path) -> None:
    rules = rbac.rules()

    def operator_env(docs: list[dict[str, Any]]) -> dict[str, str]:
        (deployment,) = of_kind(docs, "Deployment")
        return {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}

    def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
        """The operator's objects of `kind` (the gateway, on by default, has its own: test_helm_gateway.py)."""
        return [d for d in docs if d["kind"] == kind
                and (d["metadata"].get("labels") or {}).get("app.kubernetes.io/component") != "gateway"]

    off = render_chart(tmp_path)
    assert "LMKUBE_OPERATOR_INFERENCE_POOL" not in operator_env(off)
    assert of_kind(off, "ClusterRole")[0]["rules"] == rules["cluster"] + rules["namespaced"]

    on = render_chart(tmp_path, "inferenceExtension.enabled=true", "inferenceExtension.endpointPicker.port=9100")
    env = operator_env(on)
    assert (env["LMKUBE_OPERATOR_INFERENCE_POOL"], env["LMKUBE_OPERATOR_ENDPOINT_PICKER"],
            env["LMKUBE_OPERATOR_ENDPOINT_PICKER_PORT"], env["LMKUBE_OPERATOR_ENDPOINT_PICKER_FAILURE_MODE"]) == (
        "true", "{pool}-epp", "9100", "FailClose")
    assert of_kind(on, "ClusterRole")[0]["rules"] == rules["cluster"] + rules["namespaced"] + rules["inferencePool"]
    scoped = render_chart(tmp_path, "inferenceExtension.enabled=true", "operator.watchNamespaces={team-a}")
    assert [r["rules"] for r in of_kind(scoped, "Role")] == [rules["namespaced"] + rules["inferencePool"]]


# -- the real control plane, with GIE's CRD ------------------------------------------------------------


@pytest.fixture(scope="module")
def gie_crd() -> Path:
    path = install_binaries().get("LMKUBE_GIE_CRD") or os.environ.get("LMKUBE_GIE_CRD", "")
    assert path and Path(path).is_file(), "scripts/install-test-cluster.sh did not provide GIE's InferencePool CRD"
    return Path(path)


def remove_crd(kube: KubeCluster, name: str) -> None:
    with kube.api_client() as client:
        extensions = kubernetes.client.ApiextensionsV1Api(client)
        try:
            extensions.delete_custom_resource_definition(name)
        except ApiException as error:
            if error.status != 404:
                raise
            return

        def gone() -> bool:
            try:
                extensions.read_custom_resource_definition(name)
            except ApiException as error:
                return error.status == 404
            return False

        wait_until(gone, timeout=60, message=f"CRD {name} not deleted")


@pytest.fixture
def pool_operator(kube: KubeCluster, kube_namespace: str, tmp_path: Path) -> Iterator[OperatorProcess]:
    install_crd(kube)
    grant_operator_rules(kube, kube_namespace, extra=rbac.rules()["inferencePool"])
    kubeconfig = kube.service_account_kubeconfig(kube_namespace, OPERATOR_ACCOUNT, tmp_path / "kubeconfig")
    operator = OperatorProcess(kubeconfig, kube_namespace, tmp_path / "operator.log",
                               env={"LMKUBE_OPERATOR_INFERENCE_POOL": "true"})
    operator.start()
    yield operator
    operator.stop()


def read_pool(api: Api, name: str) -> dict[str, Any] | None:
    try:
        return api.custom.get_namespaced_custom_object(ip.GROUP, ip.VERSION, api.namespace, ip.PLURAL, name)
    except ApiException as error:
        if error.status == 404:
            return None
        raise


def test_pool_on_the_real_api_server_with_gies_crd(kube: KubeCluster, kube_namespace: str, gie_crd: Path,
                                                   pool_operator: OperatorProcess) -> None:
    remove_crd(kube, GIE_CRD_NAME)  # a CRD is cluster-wide: start from a cluster without it
    api = Api(kube, kube_namespace)
    try:
        api.create_lm("tiny", {"model": MODEL, "gpu": {"count": 0}, "storage": {"size": "1Gi"}})
        wait_until(lambda: pool_condition(api.status("tiny")) == ("False", "CRDNotInstalled"), timeout=60,
                   message=f"status {api.status('tiny')}\n{pool_operator.log()[-3000:]}")
        assert api.read("StatefulSet", "lm-tiny") is not None  # the model goes on without its pool
        assert "InferencePoolCRDNotInstalled" in [e["reason"] for e in api.events("tiny")]

        kube.apply_crds(gie_crd)  # the cluster gets GIE: the next pass creates the pool
        wait_until(lambda: pool_condition(api.status("tiny")) == ("True", "Created"), timeout=60,
                   message=f"status {api.status('tiny')}\n{pool_operator.log()[-3000:]}")
        pool = read_pool(api, "lm-tiny")
        assert pool is not None
        assert pool["spec"]["selector"] == {"matchLabels": resources.selector_labels("tiny")}
        assert pool["spec"]["targetPorts"] == [{"number": 1234}]
        # GIE's schema filled in its defaults; the operator's comparison takes them as equal (no patch loop).
        assert pool["spec"]["endpointPickerRef"] == {"group": "", "kind": "Service", "name": "lm-tiny-epp",
                                                     "port": {"number": 9002}, "failureMode": "FailClose"}
        version = pool["metadata"]["resourceVersion"]
        owner = pool["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["name"], owner["uid"]) == ("LocalModel", "tiny", api.lm("tiny")["metadata"]["uid"])
        # The pool selects exactly the pods the StatefulSet makes.
        template = api.read("StatefulSet", "lm-tiny")["spec"]["template"]["metadata"]["labels"]
        assert pool["spec"]["selector"]["matchLabels"].items() <= template.items()
        assert template["llm-d.ai/engine-type"] == "vllm"
        pod_args = api.read("StatefulSet", "lm-tiny")["spec"]["template"]["spec"]["containers"][0]["args"]
        assert "--public-metrics" in pod_args

        api.patch_lm("tiny", {"parallel": 2})  # a few passes later: the pool was never rewritten
        wait_until(lambda: api.status("tiny").get("observedGeneration") == 2, timeout=60)
        assert read_pool(api, "lm-tiny")["metadata"]["resourceVersion"] == version

        api.delete_lm("tiny")
        wait_until(lambda: read_pool(api, "lm-tiny") is None, timeout=60,
                   message="the garbage collector did not delete the InferencePool with its LocalModel")
    finally:
        api.close()
