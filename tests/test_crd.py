"""The LocalModel CRD: the chart's file is the generator's output, and a real kube-apiserver enforces it."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes.client
import pytest
import yaml
from kube_cluster import ROOT, KubeCluster
from kubernetes.client.exceptions import ApiException
from lmkube.operator import crd

# The test apiserver's certificate is self-signed (verify_ssl is off on purpose).
pytestmark = pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")

CRD_PATH = ROOT / "charts" / "lmkube" / "crds" / crd.CRD_FILE
NAMESPACE = "crd-test"


def test_crd_file_is_generated_from_operator_crd() -> None:
    assert CRD_PATH.read_text() == crd.render(), (
        f"{CRD_PATH.relative_to(ROOT)} is stale; regenerate it with\n"
        f"  .venv/bin/python -P -m lmkube.operator.crd > {CRD_PATH.relative_to(ROOT)}"
    )


def test_crd_shape() -> None:
    document = yaml.safe_load(CRD_PATH.read_text())
    assert document["metadata"]["name"] == "localmodels.lmkube.dev"
    spec = document["spec"]
    assert spec["scope"] == "Namespaced"
    assert spec["names"]["shortNames"] == ["lm"]
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}, "scale": {
        "specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector"}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Model", "Variant", "Phase", "Progress", "Load", "Ready", "Endpoint", "Age",
    ]


# -- against the apiserver -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api(kube: KubeCluster) -> Iterator[kubernetes.client.CustomObjectsApi]:
    """Applies the chart's CRD file (as a user would, with kubectl) and waits until it is Established."""
    kube.kubectl("apply", "-f", str(CRD_PATH))
    client = kube.api_client()
    extensions = kubernetes.client.ApiextensionsV1Api(client)
    deadline = time.monotonic() + 30
    while True:
        status = extensions.read_custom_resource_definition(crd.NAME).status
        conditions = {c.type: c.status for c in (status.conditions or [])}
        if conditions.get("Established") == "True":
            break
        assert time.monotonic() < deadline, f"CRD not Established: {conditions}"
        time.sleep(0.2)
    core = kubernetes.client.CoreV1Api(client)
    try:
        core.create_namespace({"metadata": {"name": NAMESPACE}})
    except ApiException as error:
        if error.status != 409:
            raise
    yield kubernetes.client.CustomObjectsApi(client)
    client.close()


def local_model(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": crd.API_VERSION, "kind": crd.KIND, "metadata": {"name": name},
        "spec": {"model": "acme/tiny-chat", **spec},
    }


def create(api: kubernetes.client.CustomObjectsApi, body: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    return api.create_namespaced_custom_object(crd.GROUP, crd.VERSION, NAMESPACE, crd.PLURAL, body, **kwargs)


def rejected(api: kubernetes.client.CustomObjectsApi, body: dict[str, Any], **kwargs: Any) -> str:
    """Creates `body`, expects the apiserver to refuse it, and returns its message."""
    with pytest.raises(ApiException) as raised:
        create(api, body, **kwargs)
    assert raised.value.status in (400, 422), raised.value.body
    return json.loads(raised.value.body)["message"]


def patch_status(api: kubernetes.client.CustomObjectsApi, name: str, status: dict[str, Any]) -> dict[str, Any]:
    return api.patch_namespaced_custom_object_status(
        crd.GROUP, crd.VERSION, NAMESPACE, crd.PLURAL, name, {"status": status},
        _content_type="application/merge-patch+json",
    )


def test_only_model_gets_schema_defaults(api: kubernetes.client.CustomObjectsApi) -> None:
    created = create(api, local_model("defaults"))
    assert created["spec"] == {
        "model": "acme/tiny-chat",
        "gpu": {"count": 1, "resource": "nvidia.com/gpu", "offload": "max"},
        "parallel": 4,
        "replicas": 1,
    }
    # A partly given gpu block keeps what was given and gets the rest defaulted.
    cpu = create(api, local_model("cpu", gpu={"count": 0}))
    assert cpu["spec"]["gpu"] == {"count": 0, "resource": "nvidia.com/gpu", "offload": "max"}


def test_full_spec_is_accepted_and_kept(api: kubernetes.client.CustomObjectsApi) -> None:
    spec = {
        "model": "https://huggingface.co/acme/tiny-chat",
        "variant": "Q4_K_M",
        "contextLength": 8192,
        "ttl": "1h30m",
        "gpu": {"count": 2, "resource": "amd.com/gpu", "offload": 0.5},
        "parallel": 256,
        "replicas": 0,
        "storage": {"size": "20Gi", "storageClassName": "fast", "existingClaim": "models"},
        "auth": {"secretRef": {"name": "api-token", "key": "token"}},
        "image": "ghcr.io/acme/lmkube:1.0",
        "resources": {"limits": {"memory": "8Gi"}, "requests": {"cpu": "2"}},
        "nodeSelector": {"gpu": "a100"},
        "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]}}},
        "runtimeClassName": "nvidia",
        "priorityClassName": "high",
        "env": [{"name": "A", "value": "1"}, {"name": "B", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}],
        "imagePullSecrets": [{"name": "registry"}],
        "mcp": {"configMapRef": {"name": "mcp-servers", "key": "mcp.json"}},
        "scaling": {"minReplicas": 0, "maxReplicas": 4, "targetRequests": 8, "scaleDownDelay": "5m", "window": 30},
        "sampling": {"temperature": 0, "topK": 20, "topP": 0.9, "minP": 0.1, "repeatPenalty": 1.1},
    }
    created = create(api, {**local_model("full"), "spec": spec}, field_validation="Strict")
    assert created["spec"] == spec


@pytest.mark.parametrize(("ttl", "offload"), [(90, "off"), ("45s", "0.25"), ("30m", 1), ("3600", 0)])
def test_ttl_and_offload_forms(api: kubernetes.client.CustomObjectsApi, ttl: object, offload: object) -> None:
    created = create(api, local_model(f"forms-{abs(hash((ttl, offload))) % 10**8}", ttl=ttl, gpu={"offload": offload}))
    assert created["spec"]["ttl"] == ttl
    assert created["spec"]["gpu"]["offload"] == offload


@pytest.mark.parametrize(("spec", "field"), [
    ({"parallel": 0}, "spec.parallel"),
    ({"parallel": 257}, "spec.parallel"),
    ({"replicas": -1}, "spec.replicas"),
    ({"contextLength": 0}, "spec.contextLength"),
    ({"ttl": "90 minutes"}, "spec.ttl"),
    ({"ttl": "1m1h"}, "spec.ttl"),
    ({"ttl": 0}, "spec.ttl"),
    ({"gpu": {"count": -1}}, "spec.gpu.count"),
    ({"gpu": {"offload": "most"}}, "spec.gpu.offload"),
    ({"gpu": {"offload": 1.5}}, "spec.gpu.offload"),
    ({"gpu": {"offload": True}}, "spec.gpu.offload"),
    ({"storage": {"size": "lots"}}, "spec.storage.size"),
    ({"auth": {"secretRef": {}}}, "spec.auth.secretRef.name"),
    ({"nodeSelector": {"gpu": 1}}, "spec.nodeSelector.gpu"),
    ({"imagePullSecrets": [{}]}, "spec.imagePullSecrets[0].name"),
    ({"mcp": {"secretRef": {}}}, "spec.mcp.secretRef.name"),
    ({"mcp": {"configMapRef": {"name": "a"}, "secretRef": {"name": "b"}}}, "spec.mcp"),
    ({"model": ""}, "spec.model"),
    ({"scaling": {"minReplicas": -1}}, "spec.scaling.minReplicas"),
    ({"scaling": {"maxReplicas": 0}}, "spec.scaling.maxReplicas"),
    ({"scaling": {"targetRequests": 0}}, "spec.scaling.targetRequests"),
    ({"scaling": {"scaleDownDelay": "soon"}}, "spec.scaling.scaleDownDelay"),
    ({"scaling": {"window": "1m1h"}}, "spec.scaling.window"),
    ({"scaling": {"minReplicas": 3, "maxReplicas": 2}}, "minReplicas must not exceed maxReplicas"),
    ({"sampling": {"temperature": -0.1}}, "spec.sampling.temperature"),
    ({"sampling": {"topP": 1.5}}, "spec.sampling.topP"),
    ({"sampling": {"minP": -1}}, "spec.sampling.minP"),
    ({"sampling": {"repeatPenalty": 0}}, "spec.sampling.repeatPenalty"),
    ({"sampling": {"topK": 1.5}}, "spec.sampling.topK"),
])
def test_invalid_spec_is_rejected_naming_the_field(
    api: kubernetes.client.CustomObjectsApi, spec: dict[str, Any], field: str,
) -> None:
    message = rejected(api, local_model("invalid", **spec))
    assert field in message, message


def test_model_is_required(api: kubernetes.client.CustomObjectsApi) -> None:
    body = local_model("no-model")
    del body["spec"]["model"]
    assert "spec.model" in rejected(api, body)


def test_unknown_spec_fields(api: kubernetes.client.CustomObjectsApi) -> None:
    # Strict field validation (kubectl's default) refuses them, naming the field ...
    message = rejected(api, local_model("unknown-strict", modle="typo"), field_validation="Strict")
    assert "spec.modle" in message, message
    # ... otherwise the structural schema prunes them (the apiserver only warns).
    created = create(api, local_model("unknown-pruned", modle="typo"))
    assert "modle" not in created["spec"]


def test_status_subresource(api: kubernetes.client.CustomObjectsApi) -> None:
    created = create(api, local_model("status"))
    generation = created["metadata"]["generation"]
    # status in the main resource is ignored ...
    replaced = api.patch_namespaced_custom_object(
        crd.GROUP, crd.VERSION, NAMESPACE, crd.PLURAL, "status", {"status": {"phase": "Ready"}},
        _content_type="application/merge-patch+json",
    )
    assert "status" not in replaced
    # ... and written through /status without bumping the generation.
    status = {
        "phase": "Downloading",
        "download": {"downloadedBytes": 512, "totalBytes": 2048, "percent": 25.0, "bytesPerSecond": 1e6},
        "endpoint": "http://status.crd-test.svc:1234",
        "modelKey": "acme/tiny-chat",
        "variant": "F16",
        "contextLength": 4096,
        "readyReplicas": 0,
        "observedGeneration": generation,
        "message": "downloading tiny-chat-F16.gguf",
        "conditions": [{
            "type": "Ready", "status": "False", "reason": "Downloading", "message": "not yet",
            "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": generation,
        }],
    }
    updated = patch_status(api, "status", status)
    assert updated["status"] == status
    assert updated["metadata"]["generation"] == generation
    # A spec change does bump it.
    bumped = api.patch_namespaced_custom_object(
        crd.GROUP, crd.VERSION, NAMESPACE, crd.PLURAL, "status", {"spec": {"parallel": 8}},
        _content_type="application/merge-patch+json",
    )
    assert bumped["metadata"]["generation"] == generation + 1


@pytest.mark.parametrize(("status", "field"), [
    ({"phase": "Running"}, "status.phase"),
    ({"download": {"percent": 101}}, "status.download.percent"),
    ({"readyReplicas": -1}, "status.readyReplicas"),
    ({"conditions": [{"type": "Ready", "status": "Yes"}]}, "status.conditions[0].status"),
    ({"conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "yesterday"}]},
     "status.conditions[0].lastTransitionTime"),
    ({"conditions": [{"type": "Ready", "status": "True"}, {"type": "Ready", "status": "False"}]},
     "status.conditions[1]"),
])
def test_invalid_status_is_rejected(
    api: kubernetes.client.CustomObjectsApi, status: dict[str, Any], field: str,
) -> None:
    try:
        create(api, local_model("bad-status"))
    except ApiException as error:
        if error.status != 409:
            raise
    with pytest.raises(ApiException) as raised:
        patch_status(api, "bad-status", status)
    assert raised.value.status == 422, raised.value.body
    message = json.loads(raised.value.body)["message"]
    assert field in message, message


def test_kubectl_get_prints_the_columns(kube: KubeCluster, api: kubernetes.client.CustomObjectsApi) -> None:
    create(api, local_model("printed", variant="Q8_0"))
    patch_status(api, "printed", {
        "phase": "Ready", "variant": "Q8_0", "download": {"percent": 100}, "load": {"percent": 100},
        "readyReplicas": 1, "endpoint": "http://printed.crd-test.svc:1234",
    })
    output = kube.kubectl("get", "lm", "printed", "-n", NAMESPACE).stdout
    header, row = output.splitlines()
    assert header.split() == ["NAME", "MODEL", "VARIANT", "PHASE", "PROGRESS", "LOAD", "READY", "ENDPOINT", "AGE"]
    assert row.split()[:8] == ["printed", "acme/tiny-chat", "Q8_0", "Ready", "100", "100", "1",
                               "http://printed.crd-test.svc:1234"]
    # A model being loaded: the load's percentage, as the operator writes it while the server loads.
    create(api, local_model("loading", variant="Q8_0"))
    patch_status(api, "loading", {"phase": "Loading", "download": {"percent": 100}, "load": {"percent": 42.5},
                                  "readyReplicas": 0})
    columns = kube.kubectl("get", "lm", "loading", "-n", NAMESPACE).stdout.splitlines()[1].split()
    phase = columns.index("Loading")  # the empty VARIANT column prints as nothing
    assert columns[phase:phase + 4] == ["Loading", "100", "42.5", "0"]
    # The short name, the full names and the category all resolve.
    for name in ("localmodels", "localmodel", "localmodels.lmkube.dev", "lmkube"):
        assert "printed" in kube.kubectl("get", name, "-n", NAMESPACE, "-o", "name").stdout


def test_example_file_applies_with_kubectl(kube: KubeCluster, api: kubernetes.client.CustomObjectsApi,
                                          tmp_path: Path) -> None:
    manifest = tmp_path / "lm.yaml"
    manifest.write_text(
        "apiVersion: lmkube.dev/v1alpha1\nkind: LocalModel\nmetadata:\n  name: qwen\n"
        f"  namespace: {NAMESPACE}\nspec:\n  model: Qwen/Qwen3-0.6B-GGUF\n  ttl: 30m\n  gpu:\n    count: 0\n"
    )
    kube.kubectl("apply", "-f", str(manifest))
    got = api.get_namespaced_custom_object(crd.GROUP, crd.VERSION, NAMESPACE, crd.PLURAL, "qwen")
    assert got["spec"]["gpu"] == {"count": 0, "resource": "nvidia.com/gpu", "offload": "max"}
    # kubectl validates strictly by default: a misspelt field is an error, not silently dropped.
    manifest.write_text(manifest.read_text().replace("ttl: 30m", "tll: 30m"))
    result = kube.kubectl("apply", "-f", str(manifest), check=False)
    assert result.returncode != 0 and "spec.tll" in result.stderr, result.stderr
