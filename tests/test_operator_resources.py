"""Unit tests of the operator's spec parsing and object builders (no cluster, no kopf)."""

from __future__ import annotations

import re
from importlib.metadata import version

import pytest
from lmkube.operator.resources import (
    POD_HASH_ANNOTATION,
    claim_template,
    download_request,
    endpoint,
    labels,
    load_request,
    names,
    owner_reference,
    replica_claim,
    service,
    statefulset,
    token_secret,
)
from lmkube.operator.spec import LocalModelSpec, OperatorSettings, parse_spec, parse_ttl

REPO = "Qwen/Qwen2.5-0.5B-Instruct-GGUF"
VERSION = version("lmkube")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def container(dep: dict) -> dict:
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    return c


def env_of(c: dict) -> dict:
    return {e["name"]: e for e in c["env"]}


def pod_hash(spec: dict) -> str:
    return statefulset("m", "ns", parse_spec(spec))["spec"]["template"]["metadata"]["annotations"][POD_HASH_ANNOTATION]


# --- spec parsing -----------------------------------------------------------------------------------


def test_defaults():
    s = parse_spec({"model": REPO})
    assert s.model == REPO and s.variant is None and s.context_length is None and s.ttl is None
    assert (s.gpu.count, s.gpu.resource, s.gpu.offload) == (1, "nvidia.com/gpu", "max")
    assert (s.parallel, s.replicas) == (4, 1)
    assert (s.storage.size, s.storage.storage_class_name, s.storage.existing_claim) == ("20Gi", None, None)
    assert s.auth is None and s.image is None
    assert s.resources == {} and s.node_selector == {} and s.tolerations == () and s.env == ()
    assert s.affinity is None and s.runtime_class_name is None and s.priority_class_name is None
    assert s.image_pull_secrets == ()
    settings = OperatorSettings()
    assert settings.cpu_image == f"lmkube/lmkube:{VERSION}"
    assert settings.cuda_image == f"lmkube/lmkube:{VERSION}-cuda"
    assert (settings.models_dir, settings.port) == ("/models", 1234)


def test_full_spec():
    s = parse_spec({
        "model": REPO, "variant": "Q4_K_M", "contextLength": 8192, "ttl": "1h",
        "gpu": {"count": 2, "resource": "amd.com/gpu", "offload": 0.5}, "parallel": 8, "replicas": 2,
        "storage": {"size": "50Gi", "storageClassName": "fast", "existingClaim": "shared"},
        "auth": {"secretRef": {"name": "mine"}}, "imagePullSecrets": [{"name": "reg"}, "reg2"],
    })
    assert (s.variant, s.context_length, s.ttl, s.parallel, s.replicas) == ("Q4_K_M", 8192, 3600, 8, 2)
    assert (s.gpu.count, s.gpu.resource, s.gpu.offload) == (2, "amd.com/gpu", 0.5)
    assert s.storage.existing_claim == "shared" and s.storage.storage_class_name == "fast"
    assert (s.auth.name, s.auth.key) == ("mine", "token")
    assert s.image_pull_secrets == ("reg", "reg2")


@pytest.mark.parametrize(("value", "seconds"), [
    (None, None), (90, 90), ("90", 90), ("45s", 45), ("30m", 1800), ("1h30m", 5400), ("1d", 86400),
    (" 2H ", 7200), (120.0, 120),
])
def test_ttl(value, seconds):
    assert parse_ttl(value) == seconds


@pytest.mark.parametrize("value", ["", "abc", "1.5h", "30 m", "m", "-5", 0, -3, True, 1.5, [], "1m1h"])
def test_ttl_invalid(value):
    with pytest.raises(ValueError, match="ttl"):
        parse_ttl(value)


@pytest.mark.parametrize("spec", [
    {}, {"model": ""}, {"model": 3},
    {"model": REPO, "ttl": "soon"},
    {"model": REPO, "gpu": {"offload": 1.5}}, {"model": REPO, "gpu": {"offload": "all"}},
    {"model": REPO, "gpu": {"count": -1}}, {"model": REPO, "gpu": {"count": "1"}},
    {"model": REPO, "parallel": 0}, {"model": REPO, "parallel": 1000}, {"model": REPO, "contextLength": 0},
    {"model": REPO, "auth": {"secretRef": {"key": "k"}}},
    {"model": f"{REPO}@q4_k_m", "variant": "Q8_0"},
    {"model": REPO, "env": {"A": "b"}}, {"model": REPO, "storage": {"size": True}},
    {"model": REPO, "sampling": {"temperature": -1}}, {"model": REPO, "sampling": {"topP": "high"}},
    {"model": REPO, "sampling": {"minP": 2}}, {"model": REPO, "sampling": {"repeatPenalty": 0}},
    {"model": REPO, "sampling": {"topK": True}},
])
def test_invalid_specs(spec):
    with pytest.raises(ValueError):
        parse_spec(spec)


def test_offload_forms():
    assert parse_spec({"model": REPO, "gpu": {"offload": "OFF"}}).gpu.offload == "off"
    assert parse_spec({"model": REPO, "gpu": {"offload": "0.25"}}).gpu.offload == 0.25
    assert parse_spec({"model": REPO, "gpu": {"offload": 1}}).gpu.offload == 1.0


def test_variant_suffix_in_model():
    s = parse_spec({"model": f"{REPO}@q4_k_m"})
    assert (s.model, s.variant) == (REPO, "q4_k_m")
    s = parse_spec({"model": f"{REPO}:Q8_0", "variant": "q8_0"})
    assert (s.model, s.variant) == (REPO, "q8_0")
    url = "https://huggingface.co/Qwen/Qwen2.5-0.5B-Instruct-GGUF/blob/main/qwen2.5-0.5b-instruct-q4_k_m.gguf"
    s = parse_spec({"model": url})
    assert (s.model, s.variant, s.model_key) == (url, None, "qwen/qwen2.5-0.5b-instruct-gguf")


def test_settings_from_env():
    s = OperatorSettings.from_env({"LMKUBE_OPERATOR_CPU_IMAGE": "r/cpu:1", "LMKUBE_OPERATOR_CUDA_IMAGE": "r/gpu:1",
                                   "LMKUBE_OPERATOR_PORT": "8080"})
    assert (s.cpu_image, s.cuda_image, s.port, s.models_dir) == ("r/cpu:1", "r/gpu:1", 8080, "/models")
    assert OperatorSettings.from_env({}) == OperatorSettings()


# --- names and labels -------------------------------------------------------------------------------


def test_names():
    n = names("qwen")
    assert (n.statefulset, n.service, n.legacy_pvc, n.secret) == (
        "lm-qwen", "lm-qwen", "lm-qwen-models", "lm-qwen-token")
    assert replica_claim("qwen", 1) == "models-lm-qwen-1"


def test_long_and_dotted_names_truncate_with_hash():
    long = "a" * 200
    n = names(long)
    for value in (n.statefulset, n.legacy_pvc, n.secret):
        assert len(value) <= 63 and DNS_LABEL.match(value)
    assert len(n.statefulset) <= 52 and n.statefulset.startswith("lm-a")  # its pods' revision label fits
    assert names("b" * 49).statefulset == "lm-" + "b" * 49 and names("b" * 50).statefulset != "lm-" + "b" * 50
    assert n.legacy_pvc.endswith("-models") and n.secret.endswith("-token")
    assert names(long + "b").statefulset != n.statefulset  # distinct names never collide
    dotted = names("my.model").statefulset
    assert DNS_LABEL.match(dotted) and dotted != names("my-model").statefulset
    assert names("x" * 60).statefulset == names("x" * 60).statefulset  # deterministic
    assert len(labels(long)["app.kubernetes.io/instance"]) <= 63


def test_labels():
    assert labels("qwen") == {
        "app.kubernetes.io/name": "lmkube", "app.kubernetes.io/instance": "qwen",
        "app.kubernetes.io/managed-by": "lmkube-operator", "app.kubernetes.io/component": "model-server",
    }


# --- Secret, PVC, Service ---------------------------------------------------------------------------


OWNER = owner_reference({"apiVersion": "lmkube.dev/v1alpha1", "kind": "LocalModel",
                         "metadata": {"name": "qwen", "uid": "u-1"}})


def test_token_secret():
    sec = token_secret("qwen", "ns", "sk-lm-abc", owner=OWNER)
    assert sec["kind"] == "Secret" and sec["metadata"]["name"] == "lm-qwen-token"
    assert sec["metadata"]["namespace"] == "ns" and sec["stringData"] == {"token": "sk-lm-abc"}
    assert sec["metadata"]["ownerReferences"] == [
        {"apiVersion": "lmkube.dev/v1alpha1", "kind": "LocalModel", "name": "qwen", "uid": "u-1",
         "controller": True, "blockOwnerDeletion": True}]
    assert "ownerReferences" not in token_secret("qwen", "ns", "t")["metadata"]


def test_every_replica_gets_its_own_cache_volume():
    spec = parse_spec({"model": REPO, "replicas": 3, "storage": {"size": "5Gi", "storageClassName": "fast"}})
    sts = statefulset("qwen", "ns", spec)
    assert sts["spec"]["replicas"] == 3  # replicas > 1 without a shared claim is valid
    assert sts["spec"]["volumeClaimTemplates"] == [{
        "metadata": {"name": "models", "labels": labels("qwen")},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "5Gi"}},
                 "storageClassName": "fast"}}]
    assert sts["spec"]["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Delete", "whenScaled": "Retain"}
    assert "volumes" not in sts["spec"]["template"]["spec"]  # the claim template's volume, one per pod
    assert container(sts)["volumeMounts"] == [{"name": "models", "mountPath": "/models"}]
    assert claim_template("q", parse_spec({"model": REPO}))["spec"].get("storageClassName") is None
    sized = claim_template("q", parse_spec({"model": REPO, "storage": {"size": 1 << 30}}))  # int-or-string
    assert sized["spec"]["resources"]["requests"]["storage"] == str(1 << 30)


def test_existing_claim_no_pvc_and_mounted():
    spec = parse_spec({"model": REPO, "storage": {"existingClaim": "shared"}, "replicas": 3})
    assert claim_template("qwen", spec) is None
    assert "volumeClaimTemplates" not in statefulset("qwen", "ns", spec)["spec"]
    pod = statefulset("qwen", "ns", spec)["spec"]["template"]["spec"]
    assert pod["volumes"] == [{"name": "models", "persistentVolumeClaim": {"claimName": "shared"}}]
    assert container({"spec": {"template": {"spec": pod}}})["volumeMounts"] == [
        {"name": "models", "mountPath": "/models"}]


@pytest.mark.parametrize(("ref", "source"), [
    ({"configMapRef": {"name": "tools"}}, {"configMap": {"name": "tools"}}),
    ({"secretRef": {"name": "tools", "key": "servers.json"}}, {"secret": {"secretName": "tools"}}),
])
def test_mcp_json_mounted_from_a_config_map_or_secret(ref, source):
    spec = parse_spec({"model": REPO, "mcp": ref})
    pod = statefulset("qwen", "ns", spec)["spec"]["template"]["spec"]
    assert pod["volumes"] == [{"name": "mcp", **source}]  # the models volume is the claim template's
    c = container({"spec": {"template": {"spec": pod}}})
    assert c["volumeMounts"][1:] == [{"name": "mcp", "mountPath": "/etc/lmkube/mcp", "readOnly": True}]
    key = ref.get("secretRef", ref.get("configMapRef")).get("key", "mcp.json")
    assert c["args"][-2:] == ["--mcp-json", f"/etc/lmkube/mcp/{key}"]  # where `lmkube serve` reads it
    assert pod_hash({"model": REPO, "mcp": ref}) != pod_hash({"model": REPO})  # adding it rolls the pods
    plain = statefulset("qwen", "ns", parse_spec({"model": REPO}))["spec"]["template"]["spec"]
    assert "volumes" not in plain and "--mcp-json" not in container({"spec": {"template": {"spec": plain}}})["args"]
    with pytest.raises(ValueError, match="not both"):
        parse_spec({"model": REPO, "mcp": {"configMapRef": {"name": "a"}, "secretRef": {"name": "b"}}})
    with pytest.raises(ValueError, match="name is required"):
        parse_spec({"model": REPO, "mcp": {"configMapRef": {}}})


def test_service_and_endpoint():
    svc = service("qwen", "ns", owner=OWNER)
    assert svc["metadata"]["name"] == "lm-qwen" and svc["spec"]["type"] == "ClusterIP"
    assert svc["spec"]["ports"] == [{"name": "http", "port": 1234, "targetPort": "http", "protocol": "TCP"}]
    dep = statefulset("qwen", "ns", parse_spec({"model": REPO}))
    assert dep["spec"]["serviceName"] == svc["metadata"]["name"]
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert endpoint("qwen", "ns") == "http://lm-qwen.ns.svc:1234"


# --- StatefulSet ------------------------------------------------------------------------------------


def test_statefulset_gpu():
    dep = statefulset("qwen", "ns", parse_spec({"model": REPO, "ttl": "30m", "parallel": 2}), owner=OWNER)
    assert (dep["kind"], dep["metadata"]["name"]) == ("StatefulSet", "lm-qwen")
    assert dep["metadata"]["ownerReferences"] == [OWNER]
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["updateStrategy"] == {"type": "RollingUpdate"}
    assert dep["spec"]["podManagementPolicy"] == "Parallel"
    # Ready only once the operator has loaded the model into the pod.
    assert dep["spec"]["template"]["spec"]["readinessGates"] == [{"conditionType": "lmkube.dev/model-loaded"}]
    c = container(dep)
    assert c["image"] == f"lmkube/lmkube:{VERSION}-cuda"
    assert c["command"] == ["lmkube"]
    assert c["args"] == ["serve", "--host", "0.0.0.0", "--port", "1234", "--models-dir", "/models",
                         "--parallel", "2", "--ttl", "1800"]
    assert c["args"][-2:] == ["--ttl", "1800"]
    sampled = container(statefulset("qwen", "ns", parse_spec(
        {"model": REPO, "sampling": {"temperature": 0, "topK": 20, "topP": 0.9, "minP": 0.1, "repeatPenalty": 1.1}})))
    # Only what spec.sampling sets; `lmkube serve` keeps its own default for the rest.
    assert sampled["args"][sampled["args"].index("--temp"):] == [
        "--temp", "0.0", "--top-k", "20", "--top-p", "0.9", "--min-p", "0.1", "--repeat-penalty", "1.1"]
    assert "--temp" not in container(statefulset("qwen", "ns", parse_spec(
        {"model": REPO, "sampling": {"topK": 1}})))["args"]
    assert c["resources"] == {"limits": {"nvidia.com/gpu": "1"}}
    assert c["ports"] == [{"name": "http", "containerPort": 1234, "protocol": "TCP"}]
    env = env_of(c)
    assert env["LMKUBE_API_TOKENS"]["valueFrom"] == {"secretKeyRef": {"name": "lm-qwen-token", "key": "token"}}
    assert env["LMKUBE_HOME"]["value"] == "/models/.lmkube"
    assert c["volumeMounts"] == [{"name": "models", "mountPath": "/models"}]
    assert dep["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "models"


def test_statefulset_cpu_and_image_override():
    c = container(statefulset("m", "ns", parse_spec({"model": REPO, "gpu": {"count": 0}})))
    assert c["image"] == f"lmkube/lmkube:{VERSION}"
    assert "nvidia.com/gpu" not in str(c["resources"])
    assert c["args"][-2:] == ["--ttl", "0"]  # unset: never unload, JIT loads included
    settings = OperatorSettings(cpu_image="reg/cpu:x", cuda_image="reg/cuda:x", image_pull_policy="Always")
    assert container(statefulset("m", "ns", parse_spec({"model": REPO, "gpu": {"count": 0}}), settings))["image"] \
        == "reg/cpu:x"
    c = container(statefulset("m", "ns", parse_spec({"model": REPO}), settings))
    assert (c["image"], c["imagePullPolicy"]) == ("reg/cuda:x", "Always")
    c = container(statefulset("m", "ns", parse_spec({"model": REPO, "image": "me/custom:1"}), settings))
    assert c["image"] == "me/custom:1"


def test_user_secret_ref():
    spec = parse_spec({"model": REPO, "auth": {"secretRef": {"name": "api", "key": "k"}}})
    env = env_of(container(statefulset("m", "ns", spec)))
    assert env["LMKUBE_API_TOKENS"]["valueFrom"] == {"secretKeyRef": {"name": "api", "key": "k"}}


def test_probes():
    c = container(statefulset("m", "ns", parse_spec({"model": REPO})))
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 120


def test_security_context():
    dep = statefulset("m", "ns", parse_spec({"model": REPO}))
    pod = dep["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["fsGroup"]) == (1000, 1000)
    sc = container(dep)["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 1000
    assert pod["automountServiceAccountToken"] is False


def test_knobs_passed_through():
    raw = {
        "model": REPO, "gpu": {"count": 2},
        "resources": {"limits": {"memory": "16Gi", "nvidia.com/gpu": "9"},
                      "requests": {"cpu": "2", "nvidia.com/gpu": "9"}},
        "nodeSelector": {"gpu": "a100"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"x": 1}},
        "runtimeClassName": "nvidia", "priorityClassName": "high",
        "env": [{"name": "FOO", "value": "bar"}],
        "imagePullSecrets": [{"name": "reg"}],
    }
    spec = parse_spec(raw)
    dep = statefulset("m", "ns", spec)
    pod = dep["spec"]["template"]["spec"]
    c = container(dep)
    assert c["resources"] == {"limits": {"memory": "16Gi", "nvidia.com/gpu": "2"},
                              "requests": {"cpu": "2", "nvidia.com/gpu": "2"}}
    assert pod["nodeSelector"] == {"gpu": "a100"} and pod["tolerations"] == raw["tolerations"]
    assert pod["affinity"] == raw["affinity"]
    assert (pod["runtimeClassName"], pod["priorityClassName"]) == ("nvidia", "high")
    assert pod["imagePullSecrets"] == [{"name": "reg"}]
    assert c["env"][-1] == {"name": "FOO", "value": "bar"}  # appended after the operator's own
    # Rendering never aliases (or mutates) the spec's own objects.
    c["env"][-1]["value"] = "changed"
    pod["tolerations"][0]["key"] = "changed"
    assert spec.env[0]["value"] == "bar" and spec.tolerations[0]["key"] == "nvidia.com/gpu"
    assert spec.resources["limits"]["nvidia.com/gpu"] == "9"


def test_statefulset_is_deterministic():
    spec = parse_spec({"model": REPO, "env": [{"name": "A", "value": "1"}]})
    assert statefulset("m", "ns", spec) == statefulset("m", "ns", spec)


def test_pod_hash_rolls_only_for_pod_fields():
    base = {"model": REPO, "contextLength": 4096}
    h = pod_hash(base)
    # Reloaded through the API: the pods stay.
    for same in ({"model": "other/model-GGUF"}, {"variant": "Q8_0"}, {"contextLength": 32768},
                 {"gpu": {"offload": 0.5}}):
        assert pod_hash({**base, **same}) == h, same
    # Pod-affecting: a new hash.
    for changed in ({"image": "me/x:1"}, {"gpu": {"count": 2}}, {"gpu": {"count": 0}},
                    {"resources": {"limits": {"memory": "8Gi"}}}, {"env": [{"name": "A", "value": "1"}]},
                    {"parallel": 8}, {"ttl": "5m"}, {"nodeSelector": {"a": "b"}},
                    {"auth": {"secretRef": {"name": "s"}}}, {"runtimeClassName": "nvidia"}):
        assert pod_hash({**base, **changed}) != h, changed
    spec = parse_spec(base)

    def annotation(**kw):
        return statefulset("m", "ns", spec, **kw)["spec"]["template"]["metadata"]["annotations"][POD_HASH_ANNOTATION]

    assert annotation(secret_version="1") != annotation(secret_version="2") != annotation()


# --- server request bodies --------------------------------------------------------------------------


def test_load_request():
    body = load_request(parse_spec({"model": REPO, "variant": "Q4_K_M", "contextLength": 8192, "ttl": "1h",
                                    "parallel": 2, "gpu": {"offload": 0.5}}))
    assert body == {"model": "qwen/qwen2.5-0.5b-instruct-gguf@q4_k_m", "context_length": 8192, "gpu": 0.5,
                    "parallel": 2, "ttl": 3600}
    assert load_request(parse_spec({"model": REPO})) == {
        "model": "qwen/qwen2.5-0.5b-instruct-gguf", "gpu": "max", "parallel": 4}
    assert load_request(parse_spec({"model": REPO, "gpu": {"count": 0}}))["gpu"] == "off"
    url = "https://huggingface.co/Org/Repo-GGUF"
    assert load_request(parse_spec({"model": url}))["model"] == "org/repo-gguf"


def test_download_request():
    assert download_request(parse_spec({"model": REPO})) == {"model": REPO}
    assert download_request(parse_spec({"model": REPO, "variant": "Q4_K_M"})) == {
        "model": REPO, "quantization": "Q4_K_M"}
    assert download_request(parse_spec({"model": f"{REPO}@q8_0"})) == {"model": REPO, "quantization": "q8_0"}


def test_spec_is_frozen():
    spec = parse_spec({"model": REPO})
    assert isinstance(spec, LocalModelSpec)
    with pytest.raises(AttributeError):
        spec.model = "x"  # type: ignore[misc]
