"""The pods' readiness gate (operator/readiness.py) through `reconcile()`, in process against the fakes of
tests/fake_kube.py (whose pods get their Ready condition as a kubelet derives it: containers ready and every
readiness gate True). A pod is Ready only once the operator has loaded the model into it. On a real node,
with a rollout of two replicas that always keeps one loaded: test_operator_e2e.py."""

from __future__ import annotations

from fake_kube import FakeCluster, Volume, pod_ready
from lmkube.operator import resources
from lmkube.operator.podclient import PodError
from reconcile_support import KEY, MODEL

GATE = resources.MODEL_LOADED_CONDITION


def gate(cluster: FakeCluster, pod: str) -> tuple[str, str] | None:
    found = next((c for c in cluster.pod(pod)["status"]["conditions"] if c["type"] == GATE), None)
    return (found["status"], found["reason"]) if found else None


def test_the_pod_template_has_the_gate() -> None:
    from lmkube.operator.spec import parse_spec

    template = resources.pod_template("tiny", parse_spec({"model": MODEL}))
    assert template["spec"]["readinessGates"] == [{"conditionType": "lmkube.dev/model-loaded"}]


def test_a_pod_is_ready_only_once_the_model_is_loaded(cluster: FakeCluster) -> None:
    cluster.apply("tiny", {"model": MODEL})
    cluster.reconcile("tiny")
    server = cluster.start_pod("tiny", "tiny-0")  # its server answers /health: containers ready
    assert not pod_ready(cluster.pod("tiny-0"))  # the gate has not been set: not Ready
    assert cluster.reconcile("tiny")["phase"] == "Downloading"
    assert gate(cluster, "tiny-0") == ("False", "Downloading") and not pod_ready(cluster.pod("tiny-0"))
    server.volume.complete()
    status = cluster.reconcile("tiny")
    assert status["phase"] == "Ready" and pod_ready(cluster.pod("tiny-0"))
    assert gate(cluster, "tiny-0") == ("True", "Loaded")
    # False (once) until the load request returned: the pod was never Ready before the model was loaded.
    assert cluster.kube.pod_conditions == [("tiny-0", "False", "Downloading"), ("tiny-0", "True", "Loaded")]
    writes = len(cluster.kube.pod_conditions)
    cluster.reconcile("tiny")  # settled: the gate is not written again
    assert len(cluster.kube.pod_conditions) == writes


def test_a_restarted_server_makes_the_pod_unready_until_it_is_loaded_again(cluster: FakeCluster) -> None:
    cluster.apply("tiny", {"model": MODEL})
    cluster.reconcile("tiny")
    cluster.start_pod("tiny", "tiny-0", volume=Volume(files={KEY: "q4_k_m"}))
    cluster.reconcile("tiny")
    assert pod_ready(cluster.pod("tiny-0"))
    # The container restarted and is not ready yet: a new server has nothing loaded, so the gate goes False
    # before its /health can make the pod Ready again.
    cluster.restart_server("tiny-0")
    cluster.set_ready("tiny-0", False)
    cluster.reconcile("tiny")
    assert gate(cluster, "tiny-0") == ("False", "ServerRestarted")
    cluster.set_ready("tiny-0", True)
    assert not pod_ready(cluster.pod("tiny-0"))
    assert cluster.reconcile("tiny")["phase"] == "Ready"
    assert gate(cluster, "tiny-0") == ("True", "Loaded") and pod_ready(cluster.pod("tiny-0"))


def test_a_new_model_unreadies_the_pods_while_it_loads(cluster: FakeCluster) -> None:
    cluster.apply("tiny", {"model": MODEL})
    cluster.reconcile("tiny")
    cluster.start_pod("tiny", "tiny-0", volume=Volume(files={KEY: "q4_k_m", "acme/other-gguf": "q4_k_m"}))
    cluster.reconcile("tiny")
    cluster.apply("tiny", {"model": "acme/Other-GGUF"})  # a load setting: the same pod loads another model
    assert cluster.reconcile("tiny")["phase"] == "Ready"
    assert cluster.kube.pod_conditions[-2:] == [("tiny-0", "False", "Loading"), ("tiny-0", "True", "Loaded")]


def test_a_server_briefly_not_ready_keeps_its_gate(cluster: FakeCluster) -> None:
    cluster.apply("tiny", {"model": MODEL})
    cluster.reconcile("tiny")
    cluster.start_pod("tiny", "tiny-0", volume=Volume(files={KEY: "q4_k_m"}))
    cluster.reconcile("tiny")
    cluster.set_ready("tiny-0", False)  # a probe timed out, the same server runs on
    cluster.reconcile("tiny")
    cluster.set_ready("tiny-0", True)
    assert gate(cluster, "tiny-0") == ("True", "Loaded") and pod_ready(cluster.pod("tiny-0"))


def test_an_unreachable_pod_keeps_its_gate_a_failed_load_loses_it(cluster: FakeCluster) -> None:
    cluster.apply("tiny", {"model": MODEL})
    cluster.reconcile("tiny")
    server = cluster.start_pod("tiny", "tiny-0", volume=Volume(files={KEY: "q4_k_m"}))
    cluster.reconcile("tiny")
    server.reachable = False  # busy or a network blip: the kubelet still sees it answer
    assert cluster.reconcile("tiny")["phase"] == "Failed"
    assert gate(cluster, "tiny-0") == ("True", "Loaded")
    server.reachable = True
    cluster.now += 5
    cluster.reconcile("tiny")
    # A new load setting, and the load fails: the model is no longer loaded, so the pod is not Ready.
    server.load_error = PodError("LoadFailed", "not enough memory", 409)
    cluster.apply("tiny", {"model": MODEL, "contextLength": 32768})
    assert cluster.reconcile("tiny")["phase"] == "Failed"
    # (set False, reason Loading, as the load began; a gate that already says False is not written again)
    assert gate(cluster, "tiny-0") == ("False", "Loading") and not pod_ready(cluster.pod("tiny-0"))
    server.load_error = None
    cluster.now += 5
    assert cluster.reconcile("tiny")["phase"] == "Ready"
    assert gate(cluster, "tiny-0") == ("True", "Loaded")


def test_a_model_the_ttl_unloaded_stays_ready_for_the_server_to_load_on_demand(cluster: FakeCluster) -> None:
    cluster.apply("tiny", {"model": MODEL, "ttl": 600})
    cluster.reconcile("tiny")
    server = cluster.start_pod("tiny", "tiny-0", volume=Volume(files={KEY: "q4_k_m"}))
    cluster.reconcile("tiny")
    server.instances.clear()
    assert cluster.reconcile("tiny")["phase"] == "Idle"
    assert gate(cluster, "tiny-0") == ("True", "Loaded") and pod_ready(cluster.pod("tiny-0"))


def test_in_a_rollout_only_the_new_template_pods_gates_are_written(cluster: FakeCluster) -> None:
    shared = {"model": MODEL, "replicas": 2, "storage": {"existingClaim": "shared-models"}}
    cluster.apply("tiny", shared)
    cluster.reconcile("tiny")
    volume = Volume(files={KEY: "q4_k_m"})
    for name in ("tiny-0", "tiny-1"):
        cluster.start_pod("tiny", name, volume=volume)
    cluster.reconcile("tiny")
    cluster.apply("tiny", {**shared, "image": "registry.local/lmkube:next"})
    cluster.reconcile("tiny")
    # The StatefulSet replaced tiny-1 (same name, a new pod); tiny-0, of the old template, serves meanwhile.
    del cluster.kube.objects[("Pod", "models", "tiny-1")]
    cluster.start_pod("tiny", "tiny-1", volume=volume)
    assert not pod_ready(cluster.pod("tiny-1"))
    before = len(cluster.kube.pod_conditions)
    cluster.reconcile("tiny")
    assert gate(cluster, "tiny-1") == ("True", "Loaded") and pod_ready(cluster.pod("tiny-1"))
    assert gate(cluster, "tiny-0") == ("True", "Loaded") and pod_ready(cluster.pod("tiny-0"))
    assert {pod for pod, _, _ in cluster.kube.pod_conditions[before:]} == {"tiny-1"}
