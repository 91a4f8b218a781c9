"""What the operator asked of the API server, from kube-apiserver's audit log (for bench/operator_scale.py).

Counts that do not depend on how loaded the machine is: API calls per model by verb and resource, and from
each LocalModel's DELETE to the operator's last patch of it (the one that releases its finalizer).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from lmkube.operator import crd

# Every request of a ServiceAccount (the operator's, in the benchmark), and the admin's creates and deletes of
# LocalModels; nothing else (the controller-manager, the benchmark's own polling). Metadata only: no bodies.
POLICY = f"""\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived", "ResponseStarted"]
rules:
  - level: Metadata
    userGroups: ["system:serviceaccounts"]
  - level: Metadata
    users: ["lmkube-admin"]
    verbs: ["create", "delete"]
    resources: [{{group: "{crd.GROUP}", resources: ["{crd.PLURAL}"]}}]
  - level: None
"""


def apiserver_args(workdir: Path) -> tuple[str, ...]:
    """kube-apiserver flags that write the audit log to workdir/audit.log."""
    policy = workdir / "audit-policy.yaml"
    policy.write_text(POLICY)
    return "--audit-policy-file", str(policy), "--audit-log-path", str(workdir / "audit.log"), \
        "--audit-log-maxsize", "0", "--audit-log-format", "json"


@dataclass(frozen=True)
class Call:
    at: float  # epoch seconds when the API server answered
    user: str
    verb: str
    resource: str  # "deployments", "localmodels/status", ...
    namespace: str
    name: str
    code: int
    took: float  # seconds from the request's arrival to its answer


def read_calls(path: Path) -> list[Call]:
    calls = []
    for line in path.read_text().splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line still being written
        ref = event.get("objectRef") or {}
        resource = ref.get("resource", "") + (f"/{ref['subresource']}" if ref.get("subresource") else "")
        answered = datetime.fromisoformat(event["stageTimestamp"]).timestamp()
        calls.append(Call(answered, event["user"]["username"], event["verb"], resource, ref.get("namespace", ""),
                          ref.get("name", ""), int((event.get("responseStatus") or {}).get("code") or 0),
                          answered - datetime.fromisoformat(event["requestReceivedTimestamp"]).timestamp()))
    return calls


def by_kind(calls: list[Call], user: str, begin: float, end: float) -> Counter[str]:
    """`user`'s calls answered between `begin` and `end`, by "verb resource"."""
    return Counter(f"{c.verb} {c.resource}" for c in calls if c.user == user and begin <= c.at < end)


def release_delays(calls: list[Call], namespace: str, operator: str) -> list[float]:
    """Per LocalModel deleted in `namespace`: seconds from its DELETE's answer to the operator's last successful
    patch of it (the finalizer's release: there is no object left to patch after that)."""
    deleted = {c.name: c.at for c in calls if c.verb == "delete" and c.resource == crd.PLURAL
               and c.namespace == namespace and c.code < 300}
    released: dict[str, float] = {}
    for c in calls:
        if (c.user == operator and c.verb == "patch" and c.resource == crd.PLURAL and c.name in deleted
                and c.code < 300 and c.at >= deleted[c.name]):
            released[c.name] = max(released.get(c.name, 0.0), c.at)
    return sorted(released[name] - at for name, at in deleted.items() if name in released)


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def breakdown(counts: Counter[str], per: int) -> str:
    """"12 calls/model: 2.00 get deployments, ..." (most first)."""
    total = sum(counts.values())
    return f"{total / per:.2f} calls/model: " + ", ".join(f"{n / per:.2f} {kind}" for kind, n in counts.most_common())
