"""Creates or updates a LocalModel's StatefulSet (built by `resources.statefulset`), the pod set of its servers.

- The pod template is replaced when its POD_HASH_ANNOTATION differs (a rollout), `spec.replicas` when the count
  differs: that field is the one replica count. Replaced whole (a JSON Patch), not merged: a merge patch would
  keep what the new template leaves out (a nodeSelector, tolerations, a priority class the spec dropped).
- `volumeClaimTemplates` cannot change on a live StatefulSet. A digest of them sits in an annotation; when the
  storage spec changes (size, class, existingClaim on or off) the StatefulSet is deleted and, once it is gone,
  created anew (with new claims: the old ones go with it, `whenDeleted: Delete`).
- A new StatefulSet's replica claims are made here, as its controller would make them (`replica_claims`). The
  controller creates a pod's claims before the pod, through the controller-manager's client (20 requests/s by
  default, shared with the pods, Events and status updates it writes), and then updates each claim's owner;
  with 200 models created at once, the last claim came after a minute. Finding them made, with its owner
  reference set, it goes straight to the pods. The StatefulSet is created with no replica, then its claims
  (which need its uid), then it is scaled: created whole, its controller would race the operator to the
  claims, and the loser's "already exists" is a FailedCreate Warning on the StatefulSet.
- The first time, the objects of releases that ran a Deployment go: the Deployment (its pods with it) and its one
  cache claim `lm-<name>-models` (released by Kubernetes once those pods are gone).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from typing import Any

from kubernetes.client.exceptions import ApiException
from lmkube.operator import resources
from lmkube.operator.kube import Kube

log = logging.getLogger("lmkube.operator")

CLAIMS_ANNOTATION = f"{resources.ANNOTATION_PREFIX}/volume-claims-hash"
KIND = "StatefulSet"


def claims_hash(statefulset: Mapping[str, Any]) -> str:
    templates = statefulset["spec"].get("volumeClaimTemplates") or []
    return hashlib.sha256(json.dumps(templates, sort_keys=True).encode()).hexdigest()[:16]


def replica_claims(statefulset: Mapping[str, Any], replicas: int) -> list[dict[str, Any]]:
    """The claims of a (created) StatefulSet's first `replicas` replicas, as its controller makes them
    (Kubernetes' getPersistentVolumeClaims and, for `whenDeleted: Delete`, the StatefulSet as their controlling
    owner)."""
    meta, spec = statefulset["metadata"], statefulset["spec"]
    owner = {"apiVersion": "apps/v1", "kind": KIND, "name": meta["name"], "uid": meta["uid"], "controller": True,
             "blockOwnerDeletion": True}
    return [
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {
                "name": resources.claim_name(template["metadata"]["name"], meta["name"], ordinal),
                "namespace": meta["namespace"],
                "labels": {**(template["metadata"].get("labels") or {}), **spec["selector"]["matchLabels"]},
                "ownerReferences": [owner],
            },
            "spec": template["spec"],
        }
        for template in spec.get("volumeClaimTemplates") or []
        for ordinal in range(replicas)
    ]


def _create_claims(kube: Kube, statefulset: Mapping[str, Any], replicas: int) -> None:
    for claim in replica_claims(statefulset, replicas):
        try:
            kube.create(claim)
        except ApiException as error:
            if error.status == 409:  # kept from before (a pass cut short, or retained): used as it is
                continue
            # Only a head start: the controller creates whatever is missing.
            log.warning("could not create claim %s/%s ahead of its StatefulSet's controller: %s %s",
                        claim["metadata"]["namespace"], claim["metadata"]["name"], error.status, error.reason)
            return


def _annotations(obj: Mapping[str, Any]) -> Mapping[str, str]:
    return (obj.get("metadata") or {}).get("annotations") or {}


def ensure_statefulset(kube: Kube, want: dict[str, Any], lm_name: str) -> None:
    """Makes the live StatefulSet `want` (LocalModel `lm_name`'s, from `resources.statefulset`) as far as one pass
    can."""
    meta = want["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    meta.setdefault("annotations", {})[CLAIMS_ANNOTATION] = claims_hash(want)
    live = kube.get(KIND, namespace, name)
    if live is None:
        _remove_deployment_era_objects(kube, namespace, lm_name)
        replicas = want["spec"]["replicas"]
        if not want["spec"].get("volumeClaimTemplates") or replicas == 0:
            kube.create(want)
            return
        # With no replica yet, so that its controller, which makes a missing claim itself, waits for ours.
        created = kube.create({**want, "spec": {**want["spec"], "replicas": 0}})
        _create_claims(kube, created, replicas)
        kube.replace_fields(KIND, namespace, name, {"/spec/replicas": replicas})
        return
    if live["metadata"].get("deletionTimestamp"):
        return  # being replaced: created again once it is gone
    if _annotations(live).get(CLAIMS_ANNOTATION) != meta["annotations"][CLAIMS_ANNOTATION]:
        log.info("storage of %s/%s changed: replacing the StatefulSet (its claims cannot change)", namespace, name)
        # Foreground: the new StatefulSet's pods and claims take the old ones' names, so it comes only once they
        # are gone (until then the old object stays, being deleted, and the branch above waits).
        kube.delete(KIND, namespace, name, foreground=True)
        return
    want_hash = _annotations(want["spec"]["template"])[resources.POD_HASH_ANNOTATION]
    live_hash = _annotations(live["spec"]["template"]).get(resources.POD_HASH_ANNOTATION)
    replicas = want["spec"]["replicas"]
    if live_hash != want_hash or live["spec"].get("replicas") != replicas:
        log.info("updating StatefulSet %s/%s (pod spec %s -> %s, replicas %s -> %s)", namespace, name, live_hash,
                 want_hash, live["spec"].get("replicas"), replicas)
        kube.replace_fields(KIND, namespace, name,
                            {"/spec/replicas": replicas, "/spec/template": want["spec"]["template"]})


def _remove_deployment_era_objects(kube: Kube, namespace: str, lm_name: str) -> None:
    names = resources.names(lm_name)
    mine = resources.labels(lm_name)

    def owned(obj: Mapping[str, Any] | None) -> bool:
        return obj is not None and mine.items() <= ((obj["metadata"].get("labels") or {}).items())

    deployment = names.service  # the Deployment had the Service's name (a StatefulSet's may be shorter)
    if owned(kube.get("Deployment", namespace, deployment)):
        log.info("replacing Deployment %s/%s by a StatefulSet", namespace, deployment)
        kube.delete("Deployment", namespace, deployment)
        if owned(kube.get("PersistentVolumeClaim", namespace, names.legacy_pvc)):
            kube.delete("PersistentVolumeClaim", namespace, names.legacy_pvc)
