"""The StatefulSet of a LocalModel through `reconcile()` in-process (tests/fake_kube.py): one cache volume per
replica, the replica count in one place, storage changes that replace the StatefulSet, and the move from the
Deployment of earlier releases. The same on a real node: test_operator_e2e.py's per-replica storage test."""

from __future__ import annotations

from fake_kube import NAMESPACE, FakeCluster, Volume
from lmkube.operator import resources
from lmkube.operator.statefulset import CLAIMS_ANNOTATION

MODEL = "acme/Tiny-Chat-GGUF"
KEY = "acme/tiny-chat-gguf"


def test_replicas_with_default_storage_get_a_volume_each_and_load_independently() -> None:
    cluster = FakeCluster()
    cluster.apply("tiny", {"model": MODEL, "replicas": 2, "storage": {"size": "2Gi"}})
    status = cluster.reconcile("tiny")
    assert status["phase"] == "Pending"  # valid: no InvalidSpec for replicas > 1 without existingClaim
    sts = cluster.statefulset("tiny")
    assert sts["spec"]["replicas"] == 2
    assert [t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]] == ["models"]
    # Two pods, two volumes: each downloads into its own (no waiting for the other, as on a shared claim).
    first = cluster.start_pod("tiny", "lm-tiny-0", volume=Volume())
    second = cluster.start_pod("tiny", "lm-tiny-1", volume=Volume())
    status = cluster.reconcile("tiny")
    assert status["phase"] == "Downloading"
    assert "POST download" in first.requests and "POST download" in second.requests
    first.volume.complete()
    second.volume.complete()
    status = cluster.reconcile("tiny")
    assert (status["phase"], status["readyReplicas"]) == ("Ready", 2)
    assert KEY in first.instances and KEY in second.instances


def test_the_replica_count_is_patched_alone() -> None:
    cluster = FakeCluster()
    cluster.apply("tiny", {"model": MODEL})
    cluster.reconcile("tiny")
    template = cluster.statefulset("tiny")["spec"]["template"]
    patches = cluster.kube.writes.count(("patch", "StatefulSet", "lm-tiny"))  # 1: scaled once its claims exist
    cluster.apply("tiny", {"model": MODEL, "replicas": 3})
    cluster.reconcile("tiny")
    sts = cluster.statefulset("tiny")
    assert sts["spec"]["replicas"] == 3 and sts["spec"]["template"] == template  # no rollout for a count
    assert cluster.kube.writes.count(("patch", "StatefulSet", "lm-tiny")) == patches + 1


def test_a_storage_change_replaces_the_statefulset() -> None:
    cluster = FakeCluster()
    cluster.apply("tiny", {"model": MODEL, "storage": {"size": "2Gi"}})
    cluster.reconcile("tiny")
    before = cluster.statefulset("tiny")["metadata"]["annotations"][CLAIMS_ANNOTATION]
    cluster.apply("tiny", {"model": MODEL, "storage": {"size": "4Gi"}})
    cluster.reconcile("tiny")  # claim templates cannot change: the StatefulSet goes ...
    assert cluster.kube.get("StatefulSet", NAMESPACE, "lm-tiny") is None
    cluster.reconcile("tiny")  # ... and comes back with the new ones
    sts = cluster.statefulset("tiny")
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "4Gi"
    assert sts["metadata"]["annotations"][CLAIMS_ANNOTATION] != before
    cluster.apply("tiny", {"model": MODEL, "storage": {"existingClaim": "shared"}})
    cluster.reconcile("tiny")
    cluster.reconcile("tiny")
    assert "volumeClaimTemplates" not in cluster.statefulset("tiny")["spec"]


def test_the_deployment_of_an_earlier_release_and_its_claim_go() -> None:
    cluster = FakeCluster()
    cluster.apply("tiny", {"model": MODEL})
    names = resources.names("tiny")
    labels = resources.labels("tiny")
    cluster.kube.objects[("Deployment", NAMESPACE, names.service)] = {
        "metadata": {"name": names.statefulset, "namespace": NAMESPACE, "labels": labels}, "spec": {}}
    cluster.kube.objects[("PersistentVolumeClaim", NAMESPACE, names.legacy_pvc)] = {
        "metadata": {"name": names.legacy_pvc, "namespace": NAMESPACE, "labels": labels}, "spec": {}}
    # Someone else's claim of the same name pattern is left alone.
    cluster.apply("other", {"model": MODEL, "storage": {"existingClaim": "lm-other-models"}})
    cluster.kube.objects[("PersistentVolumeClaim", NAMESPACE, "lm-other-models")] = {
        "metadata": {"name": "lm-other-models", "namespace": NAMESPACE}, "spec": {}}
    cluster.reconcile("tiny")
    cluster.reconcile("other")
    assert cluster.kube.get("Deployment", NAMESPACE, names.service) is None
    assert cluster.kube.get("PersistentVolumeClaim", NAMESPACE, names.legacy_pvc) is None
    assert cluster.kube.get("PersistentVolumeClaim", NAMESPACE, "lm-other-models") is not None
    assert cluster.statefulset("tiny") is not None and cluster.statefulset("other") is not None


def test_a_new_statefulsets_replica_claims_are_made_with_it_as_its_controller_would() -> None:
    cluster = FakeCluster()
    kept = {"apiVersion": "v1", "kind": "PersistentVolumeClaim",  # from an earlier StatefulSet: used as it is
            "metadata": {"name": resources.replica_claim("tiny", 1), "namespace": NAMESPACE}, "spec": {}}
    cluster.kube.create(kept)
    cluster.apply("tiny", {"model": MODEL, "replicas": 3, "storage": {"size": "2Gi", "storageClassName": "fast"}})
    cluster.reconcile("tiny")
    sts = cluster.statefulset("tiny")
    template = sts["spec"]["volumeClaimTemplates"][0]
    for ordinal in (0, 2):
        claim = cluster.kube.get("PersistentVolumeClaim", NAMESPACE, resources.replica_claim("tiny", ordinal))
        assert claim is not None
        assert claim["spec"] == template["spec"] == {"accessModes": ["ReadWriteOnce"], "storageClassName": "fast",
                                                     "resources": {"requests": {"storage": "2Gi"}}}
        assert claim["metadata"]["labels"] == {**template["metadata"]["labels"],
                                               **sts["spec"]["selector"]["matchLabels"]}
        assert claim["metadata"]["ownerReferences"] == [
            {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "lm-tiny", "uid": sts["metadata"]["uid"],
             "controller": True, "blockOwnerDeletion": True}]
    assert cluster.kube.get("PersistentVolumeClaim", NAMESPACE, resources.replica_claim("tiny", 1)) == {
        **kept, "metadata": {**kept["metadata"], "uid": "uid-persistentvolumeclaim-" + kept["metadata"]["name"]}}
    assert cluster.kube.get("PersistentVolumeClaim", NAMESPACE, resources.replica_claim("tiny", 3)) is None

    cluster.apply("shared", {"model": MODEL, "replicas": 2, "storage": {"existingClaim": "models"}})
    cluster.reconcile("shared")
    assert not [key for key in cluster.kube.objects if key[0] == "PersistentVolumeClaim" and "shared" in key[2]]


def test_what_a_new_spec_drops_goes_from_the_pod_template_too() -> None:
    cluster = FakeCluster()
    placed = {"model": MODEL, "gpu": {"count": 1}, "nodeSelector": {"pool": "gpu"},
              "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
              "priorityClassName": "models"}
    cluster.apply("tiny", placed)
    cluster.reconcile("tiny")
    pod = cluster.statefulset("tiny")["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "1"} and pod["nodeSelector"]
    cluster.apply("tiny", {"model": MODEL, "gpu": {"count": 0}})  # moved to CPU nodes
    cluster.reconcile("tiny")
    pod = cluster.statefulset("tiny")["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in pod["containers"][0]["resources"].get("limits", {})
    assert not {"nodeSelector", "tolerations", "priorityClassName"} & set(pod), pod
