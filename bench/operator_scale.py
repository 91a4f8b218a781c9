"""The operator at scale: N LocalModels created at once, left alone, then deleted.

    .venv/bin/python bench/operator_scale.py                       # 50, then 200, on a throwaway control plane
    .venv/bin/python bench/operator_scale.py --counts 200 --idle-seconds 60
    .venv/bin/python bench/operator_scale.py --kubeconfig admin.kubeconfig   # a cluster that is already there
    .venv/bin/python bench/operator_scale.py --counts 200 --real-node      # next to the tests' real node

By default it starts tests/kube_cluster.py's control plane (real etcd, kube-apiserver, kube-controller-manager;
no scheduler and no kubelet, so every pod stays Pending and every model waits on the cluster). `--kubeconfig`
runs the same scenario on an existing cluster instead, with that kubeconfig's (admin) credentials; the
LocalModel CRD is applied if missing. There, models whose pods do get scheduled try to download
`--model` like any other LocalModel.

For each count: a fresh namespace, the operator's RBAC from operator/rbac.py (what the chart grants), and
`lmkube operator --standalone --namespace NS` as a subprocess with that ServiceAccount's token and the default
timing (poll 2 s, resync 30 s, retry 5 s). Then:

1. its idle RSS (no models yet);
2. N LocalModels created at once (`kubectl create -f` of a List): time until every StatefulSet, Service, PVC and
   Secret exists, until every pod does (the StatefulSet controller's work, at the controller-manager's client
   rate), and until every `status.phase` is written, and the operator's CPU meanwhile;
3. `--settle-seconds` for the passes that creation set off to settle, then its CPU (user + system,
   /proc/<pid>/stat) over `--idle-seconds`;
4. every LocalModel deleted (`kubectl delete lm --all --wait=false`): time until none is left (finalizers
   released) and until none of the owned objects is; how long kubectl took to send the DELETEs and the
   operator's CPU meanwhile;
5. its RSS `--after-seconds` after that, next to its idle RSS; its peak RSS over the whole run; with `--again`,
   the same models created and deleted once more, and its RSS after that round too;
6. from its log: how often the delete handler ran per model, and urllib3's "Connection pool is full" warnings;
7. where the benchmark started the API server, from its audit log (bench/apiserver_audit.py): the operator's
   API calls per model while creating (until the idle window) and deleting, per second while idle, and the time
   from each LocalModel's DELETE to the release of its finalizer (the operator's last PATCH of it). These do
   not depend on how loaded the machine is; the breakdown by verb and resource goes to
   bench/results/logs/opscale-*.calls.txt.

`--client python` creates and deletes with the Python client instead (8 threads, one request per model), as
this benchmark did before: on 2 busy cores that client's own pace, not the operator's, then sets most of both
times (200 DELETEs: 5 s with no operator running, where kubectl sends them in 0.5 s).

It prints a Markdown table (one column per count) and writes it to bench/results/operator-scale-<UTC time>.md
(the operator logs: bench/results/logs/opscale-*.log).

`--memory-report FRAMES` runs the operator with LMKUBE_OPERATOR_MEMORY_REPORT (operator/memreport.py) and asks
for a report (SIGUSR1) with no models, once every phase is written, and after they are gone:
bench/results/logs/opscale-*.memory.txt. FRAMES > 0 traces allocations (tracemalloc: live bytes and where they
grew; slows the operator, so its timings are not comparable); 0 reports the allocators only (glibc, pymalloc).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the control plane and the operator's harness live with the tests

import apiserver_audit  # noqa: E402  (bench/)
import kubernetes.client  # noqa: E402
import urllib3  # noqa: E402
import yaml  # noqa: E402
from footprint import Footprint  # noqa: E402  (bench/)
from lmkube.operator import crd  # noqa: E402
from operator_support import CRD_PATH, OPERATOR_ACCOUNT, OperatorProcess, grant_operator_rules  # noqa: E402
from scale_cluster import cluster_from, wait_for  # noqa: E402  (bench/)

OWNED = ("StatefulSet", "Service", "PersistentVolumeClaim", "Secret")
COLLECTED = (*OWNED, "Pod")  # pods and claims go with the StatefulSet
MANAGED = "app.kubernetes.io/managed-by=lmkube-operator"
DEFAULT_TIMING = {"LMKUBE_OPERATOR_POLL_SECONDS": "2", "LMKUBE_OPERATOR_RESYNC_SECONDS": "30",
                  "LMKUBE_OPERATOR_RETRY_SECONDS": "5"}
CLIENT_THREADS = 8


# -- one run ---------------------------------------------------------------------------------------


@dataclass
class Result:
    count: int
    objects_s: float
    phases_s: float
    idle_rss: int
    peak_rss: int
    after_rss: int
    idle_cpu: float
    lm_gone_s: float
    owned_gone_s: float
    deletes_per_model: tuple[int, int]  # (most delete-handler runs for one model, models with more than one)
    pool_warnings: int
    deletes_sent_s: float  # until the API server had answered every DELETE
    delete_cpu: float  # the operator's cores from the first DELETE until no LocalModel was left
    create_cpu: float  # the operator's cores from the first create until every phase was written
    again_rss: int  # RSS after a second round of the same models (--again), else 0
    create_cpu_s: tuple[float, float]  # operator CPU seconds: until every phase was written; until the idle window
    delete_cpu_s: tuple[float, float]  # operator CPU seconds: until no LocalModel was left; until no owned object
    calls: Calls | None  # from the API server's audit log, where the benchmark started the API server
    creates_sent_s: float  # until the API server had answered every create
    pods_s: float  # until the StatefulSet controller had created every pod
    failed_creates: int  # FailedCreate Warnings (a controller that could not create a pod or claim)


@dataclass
class Calls:
    """The operator's API calls: per model while creating (until the idle window) and deleting (until the RSS
    after), per second while idle; seconds from each DELETE's answer to its finalizer's release."""

    create: Counter[str]
    idle: Counter[str]
    delete: Counter[str]
    idle_seconds: float
    releases: list[float]


class Watcher:
    """Admin reads of the namespace (lists, so one call per kind and poll)."""

    def __init__(self, client: kubernetes.client.ApiClient, namespace: str) -> None:
        self.core = kubernetes.client.CoreV1Api(client)
        self.apps = kubernetes.client.AppsV1Api(client)
        self.custom = kubernetes.client.CustomObjectsApi(client)
        self.namespace = namespace

    def local_models(self) -> list[dict[str, Any]]:
        return json.loads(self.custom.list_namespaced_custom_object(
            crd.GROUP, crd.VERSION, self.namespace, crd.PLURAL, _preload_content=False).data)["items"]

    def failed_creates(self) -> int:
        return len(json.loads(self.core.list_namespaced_event(
            self.namespace, field_selector="reason=FailedCreate", _preload_content=False).data)["items"])

    def owned(self, kind: str) -> int:
        lister = {"StatefulSet": self.apps.list_namespaced_stateful_set, "Service": self.core.list_namespaced_service,
                  "PersistentVolumeClaim": self.core.list_namespaced_persistent_volume_claim,
                  "Secret": self.core.list_namespaced_secret, "Pod": self.core.list_namespaced_pod}[kind]
        return len(json.loads(lister(self.namespace, label_selector=MANAGED, _preload_content=False).data)["items"])


def run_count(cluster: Any, count: int, args: argparse.Namespace, workdir: Path, audit_log: Path | None) -> Result:
    namespace = f"opscale-{count}-{secrets.token_hex(3)}"
    cluster.create_namespace(namespace)
    grant_operator_rules(cluster, namespace)
    kubeconfig = cluster.service_account_kubeconfig(namespace, OPERATOR_ACCOUNT, workdir / f"{namespace}.kubeconfig")
    env = dict(DEFAULT_TIMING)
    memory_report = workdir / f"{namespace}.memory.txt"
    if args.memory_report is not None:
        env |= {"LMKUBE_OPERATOR_MEMORY_REPORT": str(memory_report),
                "LMKUBE_OPERATOR_MEMORY_REPORT_FRAMES": str(args.memory_report)}
    operator = OperatorProcess(kubeconfig, namespace, workdir / f"{namespace}.log", env=env)
    client = cluster.api_client()
    watch = Watcher(client, namespace)
    try:
        operator.start()
    except BaseException:
        operator.stop()  # a start that timed out leaves the process running
        raise
    assert operator.process is not None
    footprint = Footprint(operator.process.pid).start()

    def report_memory(label: str) -> None:
        if args.memory_report is not None and operator.process is not None:
            with memory_report.open("a") as out:
                out.write(f"--- {count} models: {label}\n")
            os.kill(operator.process.pid, signal.SIGUSR1)
            time.sleep(5)  # the report runs in the operator; the RSS samples of the next step should not see it

    try:
        idle_rss = footprint.settled_rss(5)
        report_memory("idle, no models")
        names = [f"m{i:04d}" for i in range(count)]
        spec = {"model": args.model, "gpu": {"count": 0}, "storage": {"size": "1Gi"}}

        def create_all() -> None:
            bodies = [{"apiVersion": crd.API_VERSION, "kind": crd.KIND,
                       "metadata": {"name": name, "namespace": namespace}, "spec": spec} for name in names]
            if args.client == "kubectl":
                cluster.kubectl("create", "-f", "-", input=yaml.safe_dump({"apiVersion": "v1", "kind": "List",
                                                                           "items": bodies}))
                return
            with ThreadPoolExecutor(CLIENT_THREADS) as pool:
                list(pool.map(lambda body: watch.custom.create_namespaced_custom_object(
                    crd.GROUP, crd.VERSION, namespace, crd.PLURAL, body, _preload_content=False), bodies))

        def delete_all() -> None:
            if args.client == "kubectl":
                cluster.kubectl("delete", f"{crd.PLURAL}.{crd.GROUP}", "--all", "-n", namespace, "--wait=false")
                return
            with ThreadPoolExecutor(CLIENT_THREADS) as pool:
                list(pool.map(lambda name: watch.custom.delete_namespaced_custom_object(
                    crd.GROUP, crd.VERSION, namespace, crd.PLURAL, name, _preload_content=False), names))

        began, create_wall = time.monotonic(), time.time()
        _, cpu_before = footprint.read()
        create_all()
        creates_sent_s = time.monotonic() - began
        objects_s = phases_s = pods_s = create_cpu = create_cpu_s = 0.0
        while not (objects_s and phases_s and pods_s):
            if time.monotonic() - began > args.timeout:
                raise TimeoutError(f"{count} models: objects or phases missing after {args.timeout} s")
            if not objects_s and all(watch.owned(kind) >= count for kind in OWNED):
                objects_s = time.monotonic() - began
            if not pods_s and watch.owned("Pod") >= count:
                pods_s = time.monotonic() - began
            if not phases_s and sum(1 for m in watch.local_models() if (m.get("status") or {}).get("phase")) >= count:
                phases_s = time.monotonic() - began
                create_cpu_s = footprint.read()[1] - cpu_before
                create_cpu = create_cpu_s / phases_s
            time.sleep(0.2)
        failed_creates = watch.failed_creates()
        print(f"  {count}: objects {objects_s:.1f} s, pods {pods_s:.1f} s, phases {phases_s:.1f} s; "
              f"settling {args.settle_seconds} s", flush=True)
        report_memory("every phase written")
        time.sleep(args.settle_seconds)
        idle_wall = time.time()
        settled_cpu_s = footprint.read()[1] - cpu_before
        idle_cpu = footprint.cpu_over(args.idle_seconds)
        print(f"  {count}: idle CPU {idle_cpu:.3f} cores; deleting", flush=True)
        began, delete_wall = time.monotonic(), time.time()
        _, cpu_before = footprint.read()
        delete_all()
        deletes_sent_s = time.monotonic() - began
        wait_for(lambda: not watch.local_models(), args.timeout, "LocalModels gone")
        lm_gone_s = time.monotonic() - began
        lm_gone_cpu_s = footprint.read()[1] - cpu_before
        delete_cpu = lm_gone_cpu_s / lm_gone_s
        wait_for(lambda: all(watch.owned(kind) == 0 for kind in COLLECTED), args.timeout, "owned objects gone")
        owned_gone_s = time.monotonic() - began
        owned_gone_cpu_s = footprint.read()[1] - cpu_before
        after_rss = footprint.settled_rss(args.after_seconds)
        calls = None
        if audit_log is not None:
            audit = apiserver_audit.read_calls(audit_log)
            user = f"system:serviceaccount:{namespace}:{OPERATOR_ACCOUNT}"
            calls = Calls(apiserver_audit.by_kind(audit, user, create_wall, idle_wall),
                          apiserver_audit.by_kind(audit, user, idle_wall, delete_wall),
                          apiserver_audit.by_kind(audit, user, delete_wall, time.time()), delete_wall - idle_wall,
                          apiserver_audit.release_delays(audit, namespace, user))
            with (workdir / f"{namespace}.calls.txt").open("w") as out:
                out.write(f"creating: {apiserver_audit.breakdown(calls.create, count)}\n"
                          f"idle ({calls.idle_seconds:.0f} s): {apiserver_audit.breakdown(calls.idle, count)}\n"
                          f"deleting: {apiserver_audit.breakdown(calls.delete, count)}\n"
                          f"release delays: {', '.join(f'{d:.2f}' for d in calls.releases)}\n")
        report_memory("all gone")
        runs = [operator.log().count(f"LocalModel {namespace}/{name} deleted") for name in names]  # first round
        again_rss = 0
        if args.again:  # the same models once more: what a second round adds is what the operator keeps
            create_all()
            wait_for(lambda: sum(1 for m in watch.local_models() if (m.get("status") or {}).get("phase")) >= count,
                     args.timeout, "phases, second round")
            delete_all()
            wait_for(lambda: not watch.local_models() and all(watch.owned(kind) == 0 for kind in COLLECTED),
                     args.timeout, "everything gone, second round")
            again_rss = footprint.settled_rss(args.after_seconds)
            report_memory("all gone, second round")
        return Result(count, objects_s, phases_s, idle_rss, footprint.peak_rss, after_rss, idle_cpu, lm_gone_s,
                      owned_gone_s, (max(runs), sum(1 for r in runs if r > 1)),
                      operator.log().count("Connection pool is full"), deletes_sent_s, delete_cpu, create_cpu,
                      again_rss, (create_cpu_s, settled_cpu_s), (lm_gone_cpu_s, owned_gone_cpu_s), calls,
                      creates_sent_s, pods_s, failed_creates)
    finally:
        footprint.stop()
        operator.stop()
        with ThreadPoolExecutor(1) as pool:  # the namespace goes in the background; nothing waits for it
            pool.submit(kubernetes.client.CoreV1Api(client).delete_namespace, namespace, _preload_content=False)
        client.close()


def calls(result: Result, pick: Callable[[Calls], Counter[str]], per: int) -> str:
    return "n/a" if result.calls is None else f"{sum(pick(result.calls).values()) / per:.1f}"


def releases(result: Result) -> str:
    if result.calls is None or not result.calls.releases:
        return "n/a"
    values = result.calls.releases
    return "; ".join(f"{apiserver_audit.percentile(values, q):.2f} s" for q in (0.5, 0.9, 1.0))


def table(results: list[Result]) -> str:
    mib = 1 << 20
    rows: list[tuple[str, Callable[[Result], str]]] = [
        ("every StatefulSet, Service, PVC and Secret exists", lambda r: f"{r.objects_s:.1f} s"),
        ("  of which the creates themselves", lambda r: f"{r.creates_sent_s:.1f} s"),
        ("every pod exists (the StatefulSet controller's pace)", lambda r: f"{r.pods_s:.1f} s"),
        ("  FailedCreate Warnings meanwhile", lambda r: str(r.failed_creates)),
        ("every `status.phase` written", lambda r: f"{r.phases_s:.1f} s"),
        ("  operator CPU meanwhile", lambda r: f"{r.create_cpu:.2f} cores"),
        ("  operator CPU seconds: until every phase; until the idle window",
         lambda r: f"{r.create_cpu_s[0]:.1f} s; {r.create_cpu_s[1]:.1f} s"),
        ("  operator API calls per model, until the idle window", lambda r: calls(r, lambda c: c.create, r.count)),
        ("operator idle RSS, no models", lambda r: f"{r.idle_rss / mib:.0f} MiB"),
        ("operator peak RSS", lambda r: f"{r.peak_rss / mib:.0f} MiB"),
        ("operator CPU, models waiting (Pending)", lambda r: f"{r.idle_cpu:.3f} cores"),
        ("  operator API calls per second meanwhile",
         lambda r: calls(r, lambda c: c.idle, 1) if r.calls is None else
         f"{sum(r.calls.idle.values()) / r.calls.idle_seconds:.2f}"),
        ("all LocalModels gone after the delete (finalizers released)", lambda r: f"{r.lm_gone_s:.1f} s"),
        ("  of which the DELETE requests themselves", lambda r: f"{r.deletes_sent_s:.1f} s"),
        ("  operator CPU meanwhile", lambda r: f"{r.delete_cpu:.2f} cores"),
        ("  each finalizer released after its DELETE (median; 90 %; max)", releases),
        ("all owned objects and their pods gone", lambda r: f"{r.owned_gone_s:.1f} s"),
        ("  operator CPU seconds: until no LocalModel; until no owned object",
         lambda r: f"{r.delete_cpu_s[0]:.1f} s; {r.delete_cpu_s[1]:.1f} s"),
        ("  operator API calls per model, deleting", lambda r: calls(r, lambda c: c.delete, r.count)),
        ("operator RSS after they are gone", lambda r: f"{r.after_rss / mib:.0f} MiB "
                                                       f"({(r.after_rss - r.idle_rss) / mib:+.0f})"),
        ("delete handler runs per model (most; models with >1)",
         lambda r: f"{r.deletes_per_model[0]}; {r.deletes_per_model[1]}"),
        ('"Connection pool is full" warnings', lambda r: str(r.pool_warnings)),
    ]
    if any(r.again_rss for r in results):
        rows.append(("operator RSS after a second round of the same models",
                     lambda r: f"{r.again_rss / mib:.0f} MiB ({(r.again_rss - r.idle_rss) / mib:+.0f})"))
    lines = ["| | " + " | ".join(str(r.count) for r in results) + " |", "|---" * (len(results) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join(cell(r) for r in results) + " |" for label, cell in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="50,200", help="LocalModel counts, comma-separated")
    parser.add_argument("--kubeconfig", default=None,
                        help="admin kubeconfig of an existing cluster (default: start a throwaway control plane)")
    parser.add_argument("--real-node", action="store_true",
                        help="start the tests' real node (tests/real_node.py, needs root) with its control plane, "
                             "cordoned so model pods stay Pending")
    parser.add_argument("--model", default="bench-org/Scale-GGUF", help="spec.model of every LocalModel")
    parser.add_argument("--client", choices=("kubectl", "python"), default="kubectl",
                        help="create and delete the LocalModels with `kubectl create -f` / `kubectl delete --all` "
                             "(default), or with the Python client, 8 threads, one request per model (slower: "
                             "the client's own pace then counts)")
    parser.add_argument("--settle-seconds", type=float, default=40.0,
                        help="after the phases are written, before measuring idle CPU")
    parser.add_argument("--idle-seconds", type=float, default=30.0, help="window of the idle CPU measurement")
    parser.add_argument("--after-seconds", type=float, default=10.0, help="after deletion, before reading RSS")
    parser.add_argument("--timeout", type=float, default=300.0, help="give up on a step after this long")
    parser.add_argument("--again", action="store_true",
                        help="create and delete the same models a second time, and report the RSS after that too")
    parser.add_argument("--memory-report", type=int, default=None, metavar="FRAMES",
                        help="memory reports from the operator (operator/memreport.py); FRAMES 0: allocators only")
    args = parser.parse_args(argv)
    urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
    counts = [int(c) for c in args.counts.split(",") if c.strip()]
    results = []
    out = ROOT / "bench" / "results" / f"operator-scale-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.md"
    logs = ROOT / "bench" / "results" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with cluster_from(args) as (cluster, audit_log):
        cluster.apply_crds(CRD_PATH)
        for count in counts:
            results.append(run_count(cluster, count, args, logs, audit_log))
            if args.memory_report is not None:
                print(f"memory reports: bench/results/logs/opscale-{count}-*.memory.txt", flush=True)
    report = table(results)
    print(report)
    out.write_text(report + "\n")
    print(f"written to {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
