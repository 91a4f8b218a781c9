"""Unit tests of the operator's pure parts: pod health from pod status, phase/conditions, the RBAC rules."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import yaml
from kube_cluster import ROOT
from lmkube.operator import clock, crd, peering, rbac
from lmkube.operator import status as st
from lmkube.operator.observe import PodFailure, PodView, pod_failure, view

HASH = "lmkube.dev/pod-spec-hash"


def pod(name: str = "p", *, ready: bool = False, ip: str | None = "127.0.0.9", conditions: list[dict] | None = None,
        waiting: tuple[str, str] | None = None, last_exit: int | None = None, node: str | None = "n",
        deleting: bool = False, phase: str = "Running", restarts: int = 0) -> dict[str, Any]:
    container: dict[str, Any] = {"name": "lmkube", "image": "img:1", "restartCount": restarts,
                                 "containerID": "c://1", "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}}
    if waiting:
        container["state"] = {"waiting": {"reason": waiting[0], "message": waiting[1]}}
    if last_exit is not None:
        container["lastState"] = {"terminated": {"exitCode": last_exit}}
    conds = conditions if conditions is not None else [{"type": "Ready", "status": "True" if ready else "False"}]
    meta: dict[str, Any] = {"name": name, "uid": f"uid-{name}", "annotations": {HASH: "h1"}}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"metadata": meta, "spec": {"nodeName": node} if node else {},
            "status": {"phase": phase, "podIP": ip, "conditions": conds, "containerStatuses": [container]}}


# -- observe -----------------------------------------------------------------------------------------


def test_ready_pod() -> None:
    v = view(pod(ready=True), HASH)
    assert (v.ready, v.scheduled, v.ip, v.pod_hash, v.failure) == (True, True, "127.0.0.9", "h1", None)
    assert not view(pod(ready=True, deleting=True), HASH).ready  # terminating pods never serve
    assert not view(pod(ready=True, ip=None), HASH).ready


def test_unschedulable() -> None:
    message = "0/1 nodes are available: 1 Insufficient nvidia.com/gpu."
    p = pod(node=None, phase="Pending", conditions=[
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}])
    failure = pod_failure(p)
    assert failure == PodFailure("Unschedulable", f"pod p cannot be scheduled: {message}")
    assert not view(p, HASH).scheduled


def test_a_claim_not_bound_yet_is_waiting_until_the_grace_runs_out() -> None:
    # The real scheduler's words when the StatefulSet controller's claim has not bound by its first try.
    message = "0/1 nodes are available: pod has unbound immediate PersistentVolumeClaims. preemption: 0/1 nodes"
    p = pod(node=None, phase="Pending", conditions=[
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}])
    p["metadata"]["creationTimestamp"] = "2026-01-01T00:00:00Z"
    created = datetime(2026, 1, 1, tzinfo=UTC).timestamp()
    young = view(p, HASH, now=created + 59)
    assert young.failure is None and not young.scheduled
    assert st.summarize(1, [young], []).phase == "Scheduling"
    failure = pod_failure(p, created + 61)
    assert failure is not None and failure.reason == "Unschedulable"
    assert message in failure.message and "storageClassName" in failure.message
    # Any other reason the scheduler gives is the user's to fix at once, however young the pod.
    other = pod(node=None, phase="Pending", conditions=[
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "1 Insufficient cpu."}])
    other["metadata"]["creationTimestamp"] = "2026-01-01T00:00:00Z"
    assert pod_failure(other, created + 1) is not None


def test_container_failures() -> None:
    pull = pod_failure(pod(waiting=("ImagePullBackOff", 'Back-off pulling image "img:1"')))
    assert pull is not None and pull.reason == "ImagePullFailed" and "img:1" in pull.message
    assert pod_failure(pod(waiting=("ErrImagePull", "not found"))).reason == "ImagePullFailed"
    crash = pod_failure(pod(waiting=("CrashLoopBackOff", "back-off 10s"), last_exit=3, restarts=4))
    assert crash is not None and crash.reason == "CrashLoopBackOff"
    assert "4 restarts" in crash.message and "exit code 3" in crash.message
    killed = {**pod(waiting=("CrashLoopBackOff", "back-off 20s"), restarts=2),
              "spec": {"containers": [{"resources": {"limits": {"memory": "256Mi"}}}]}}
    killed["status"]["containerStatuses"][0]["lastState"] = {"terminated": {"reason": "OOMKilled", "exitCode": 137}}
    oom = pod_failure(killed)
    assert oom is not None and oom.reason == "OOMKilled" and "memory limit (256Mi)" in oom.message, oom
    assert view(killed, HASH).oom_killed and view(killed, HASH).memory_limit == "256Mi"
    config = pod_failure(pod(waiting=("CreateContainerConfigError", 'secret "absent" not found')))
    assert config == PodFailure("CreateContainerConfigError", 'pod p: secret "absent" not found')
    assert pod_failure(pod(waiting=("ContainerCreating", ""))) is None  # just starting: no failure
    assert pod_failure(pod(phase="Failed")) is not None


def test_server_id_changes_with_restarts() -> None:
    assert view(pod(ready=True), HASH).server_id != view(pod(ready=True, restarts=1), HASH).server_id


# -- summarize / conditions --------------------------------------------------------------------------


def pv(name: str, ready: bool = True, failure: PodFailure | None = None, scheduled: bool = True) -> PodView:
    return PodView(name, f"u-{name}", "127.0.0.2" if ready else None, ready, scheduled, False, name, "h", failure)


def test_phases() -> None:
    assert st.summarize(1, [], []).phase == "Pending"
    assert st.summarize(1, [pv("a", ready=False, scheduled=False)], []).phase == "Scheduling"
    failure = PodFailure("Unschedulable", "no gpu")
    s = st.summarize(1, [pv("a", ready=False, failure=failure, scheduled=False)], [])
    assert (s.phase, s.reason, s.message, s.pods_ready[0]) == ("Failed", "Unschedulable", "no gpu", "False")
    dl = st.PodState("a", st.DOWNLOADING, "Downloading", "50%", progress=st.Progress(50, 100, 10.0))
    s = st.summarize(1, [pv("a")], [dl])
    assert (s.phase, s.progress.percent, s.downloaded[0], s.ready_replicas) == ("Downloading", 50.0, "False", 0)
    assert st.summarize(1, [pv("a")], [st.PodState("a", st.LOADING)]).phase == "Loading"
    s = st.summarize(1, [pv("a")], [st.PodState("a", st.READY)])
    assert (s.phase, s.ready_replicas, s.downloaded[0], s.loaded[0]) == ("Ready", 1, "True", "True")
    s = st.summarize(1, [pv("a")], [st.PodState("a", st.IDLE)])
    assert (s.phase, s.loaded[:2]) == ("Idle", ("False", "IdleUnloaded"))
    assert st.summarize(0, [], []).phase == "ScaledToZero"


def test_ready_needs_every_replica() -> None:
    s = st.summarize(2, [pv("a"), pv("b", ready=False)], [st.PodState("a", st.READY)])
    assert s.phase == "Scheduling" and s.ready_replicas == 1
    s = st.summarize(2, [pv("a"), pv("b")], [st.PodState("a", st.READY),
                                             st.PodState("b", st.FAILED, "LoadFailed", "out of memory")])
    assert (s.phase, s.reason, s.message) == ("Failed", "LoadFailed", "out of memory")
    # The slowest download is the one shown.
    states = [st.PodState("a", st.DOWNLOADING, progress=st.Progress(90, 100)),
              st.PodState("b", st.DOWNLOADING, progress=st.Progress(10, 100))]
    assert st.summarize(2, [pv("a"), pv("b")], states).progress.percent == 10.0


def test_condition_transition_time_kept_while_status_unchanged() -> None:
    first = st.set_condition([], "Ready", "False", "Downloading", "1%", 1, "2026-01-01T00:00:00Z")
    same = st.set_condition(first, "Ready", "False", "Loading", "loading", 2, "2026-01-01T00:01:00Z")
    assert same[0]["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    assert (same[0]["reason"], same[0]["observedGeneration"]) == ("Loading", 2)
    flipped = st.set_condition(same, "Ready", "True", "Ready", "ok", 2, "2026-01-01T00:02:00Z")
    assert flipped[0]["lastTransitionTime"] == "2026-01-01T00:02:00Z"
    summary = st.summarize(1, [pv("a")], [st.PodState("a", st.READY)])
    conditions = st.conditions(flipped, summary, 2, "2026-01-01T00:03:00Z")
    assert [c["type"] for c in conditions] == ["Ready", "PodsReady", "Downloaded", "Loaded"]
    assert all(c["status"] == "True" for c in conditions)
    assert conditions[0]["lastTransitionTime"] == "2026-01-01T00:02:00Z"


def test_progress() -> None:
    p = st.Progress(512, 2048, 1234.56)
    assert p.as_status() == {"downloadedBytes": 512, "totalBytes": 2048, "percent": 25.0, "bytesPerSecond": 1234.6}
    assert st.Progress(0, 0).percent == 0.0 and st.Progress(5, 4).percent == 100.0


# -- RBAC --------------------------------------------------------------------------------------------


def test_rbac_rules_cover_what_the_operator_does() -> None:
    rules = yaml.safe_load(rbac.render())
    assert set(rules) == {"cluster", "namespaced", "inferencePool"}

    def verbs(scope: str, group: str, resource: str) -> set[str]:
        return {v for r in rules[scope] if group in r["apiGroups"] and resource in r["resources"] for v in r["verbs"]}

    assert {"get", "list", "watch", "patch"} <= verbs("namespaced", crd.GROUP, crd.PLURAL)
    assert "patch" in verbs("namespaced", crd.GROUP, f"{crd.PLURAL}/status")
    assert {"get", "create", "patch", "delete"} <= verbs("namespaced", "apps", "statefulsets")
    assert verbs("namespaced", "", "secrets") == {"get", "create"}  # never list/watch every Secret
    # The garbage collector deletes what a LocalModel owns. The operator deletes only its StatefulSet when the
    # storage spec changes (claim templates are immutable), and once the Deployment and cache claim of releases
    # before the StatefulSet.
    deletable = {(g, res) for scope in rules.values() for r in scope if "delete" in r["verbs"]
                 for g in r["apiGroups"] for res in r["resources"]}
    assert deletable == {("apps", "statefulsets"), ("apps", "deployments"), ("", "persistentvolumeclaims")}
    assert verbs("namespaced", "", "events") == {"create"}
    assert {"list", "watch"} <= verbs("cluster", "apiextensions.k8s.io", "customresourcedefinitions")


def test_chart_files_are_generated() -> None:
    rules = ROOT / rbac.RULES_FILE
    assert rules.read_text() == rbac.render(), f"{rbac.RULES_FILE} is stale: python -P -m lmkube.operator.rbac"
    crds = ROOT / "charts" / "lmkube" / "crds" / peering.CRD_FILE
    assert crds.read_text() == peering.render(), (
        f"{crds.relative_to(ROOT)} is stale: .venv/bin/python -P -m lmkube.operator.peering > {crds.relative_to(ROOT)}")
    assert [d["metadata"]["name"] for d in yaml.safe_load_all(crds.read_text())] == [
        "clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"]


def test_operator_command_line_and_timing() -> None:
    from lmkube.operator.handlers import Timing

    from lmkube.cli import build_parser

    args = build_parser().parse_args(["operator", "--namespace", "a", "-n", "b", "--peering", "lmkube",
                                      "--liveness", "http://0.0.0.0:8080/healthz", "--priority", "7"])
    assert (args.namespace, args.peering, args.priority, args.standalone) == (["a", "b"], "lmkube", 7, False)
    args = build_parser().parse_args(["operator", "--standalone", "--verbose"])
    assert (args.namespace, args.standalone, args.verbose, args.peering) == ([], True, True, None)
    assert Timing.from_env({}) == Timing(poll_seconds=2.0, resync_seconds=30.0, retry_seconds=5.0)
    assert Timing.from_env({"LMKUBE_OPERATOR_POLL_SECONDS": "0.5", "LMKUBE_OPERATOR_RETRY_SECONDS": "1"}) == \
        Timing(poll_seconds=0.5, resync_seconds=30.0, retry_seconds=1.0)


def test_next_pass_polls_busy_models_and_backs_off_waiting_ones() -> None:
    from lmkube.operator.handlers import Timing

    timing = Timing(poll_seconds=2, resync_seconds=30, retry_seconds=5)
    now = 1_800_000_000.0
    assert timing.next_delay({"phase": "Downloading"}, {"phase": "Downloading"}, 2, now) == 2
    assert timing.next_delay({"phase": "Loading"}, {"phase": "Ready"}, 2, now) == 30
    # Waiting on the cluster: the watch events of its pods bring the next pass; polling only resyncs.
    for before in ({}, {"phase": "Pending"}, {"phase": "Scheduling"}):
        assert timing.next_delay(before, {"phase": "Scheduling"}, 2, now) == 30
    assert timing.next_delay({"phase": "Ready"}, {"phase": "ScaledToZero"}, 2, now) == 30
    # A failure with no retry time: the poll interval on arrival, then doubling up to the resync interval.
    delays, before, delay = [], {"phase": "Scheduling"}, 0.0
    for _ in range(6):
        delay = timing.next_delay(before, {"phase": "Failed"}, delay, now)
        delays.append(delay)
        before = {"phase": "Failed"}
    assert delays == [2, 4, 8, 16, 30, 30]
    # A failed pod's retry comes first; one whose time has passed is no reason to poll.
    retry_at = clock.iso(now + 7)
    failed = {"phase": "Failed", "pods": [{"name": "p", "retryAt": retry_at}]}
    assert 6 <= timing.next_delay({"phase": "Failed"}, failed, 30, now) <= 7
    assert timing.next_delay({"phase": "Failed"}, failed, 30, now + 100) == 30
    # A pod's own failure (unschedulable, image pull, crash loop): its next change is a watch event.
    for reason in ("Unschedulable", "ImagePullFailed", "CrashLoopBackOff"):
        by_pod = {"phase": "Failed", "conditions": [{"type": "PodsReady", "status": "False", "reason": reason},
                                                    {"type": "Ready", "status": "False", "reason": reason}]}
        assert timing.next_delay({"phase": "Scheduling"}, by_pod, 2, now) == 30
    # A failed load with a pod that runs fine backs off as above.
    load_failed = {"phase": "Failed", "conditions": [{"type": "PodsReady", "status": "True", "reason": "PodsReady"},
                                                     {"type": "Ready", "status": "False", "reason": "LoadFailed"}]}
    assert timing.next_delay({"phase": "Loading"}, load_failed, 2, now) == 2


def test_memory_is_released_once_when_a_burst_of_deletions_is_over() -> None:
    import time

    from lmkube.operator.handlers import MemoryRelease
    from support import wait_until

    closed: list[float] = []
    release = MemoryRelease(before=lambda: closed.append(time.monotonic()), quiet_seconds=2.0)
    began = time.monotonic()
    for _ in range(10):  # each deletion of the burst postpones the release
        release.soon()
        time.sleep(0.05)
    wait_until(lambda: release.releases >= 1, timeout=30, message="no release")
    assert release.releases == 1 and len(closed) == 1
    assert closed[0] - began >= 0.45 + 2.0



def test_which_watch_events_start_a_pass() -> None:
    from lmkube.operator.handlers import ever_examined, only_status_changed, spec_not_reconciled

    new = {"metadata": {"name": "m", "generation": 1}}
    reconciled = {"metadata": {"name": "m", "generation": 1}, "status": {"observedGeneration": 1}}
    edited = {"metadata": {"name": "m", "generation": 2}, "status": {"observedGeneration": 1}}
    deleting = {"metadata": {"name": "m", "generation": 2, "deletionTimestamp": "2026-12-02T00:00:00Z"}}
    # A LocalModel not known yet (created, or listed at start-up), or with a spec not reconciled yet.
    assert spec_not_reconciled(None, reconciled, known=False) and spec_not_reconciled("ADDED", new, known=False)
    assert spec_not_reconciled("MODIFIED", edited, known=True)
    # Not the operator's own status writes, nor a model on its way out.
    assert not spec_not_reconciled("MODIFIED", reconciled, known=True)
    assert not spec_not_reconciled("MODIFIED", deleting, known=False)
    assert not spec_not_reconciled("DELETED", new, known=False)
    # A Deployment's status update is no reason for a pass; a spec its controller has not seen is.
    assert only_status_changed({"metadata": {"generation": 3}, "status": {"observedGeneration": 3}})
    assert not only_status_changed({"metadata": {"generation": 4}, "status": {"observedGeneration": 3}})
    assert not only_status_changed({"metadata": {"generation": 1}})  # just created
    assert not only_status_changed({"metadata": {}})  # a Service
    # A pod's status updates are what a waiting model waits for, whatever its observedGeneration says.
    assert not only_status_changed({"kind": "Pod", "metadata": {"generation": 1}, "status": {"observedGeneration": 1}})
    # The delete handler asks the pods only when a pass ever talked to one.
    assert not ever_examined({"status": {"phase": "Scheduling", "pods": []}}) and not ever_examined({})
    assert ever_examined({"status": {"pods": [{"name": "lm-m-0", "loaded": "abc"}]}})
