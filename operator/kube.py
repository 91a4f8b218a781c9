"""The few Kubernetes API calls the reconciler makes, on plain JSON dicts (camelCase, as stored).

A thin layer over the official `kubernetes` client with `_preload_content=False`, so the reconciler
works with exactly the JSON the API server returns and the builders in `resources.py` produce.
"""

from __future__ import annotations

import base64
import json
import ssl
from collections.abc import Mapping
from typing import Any

import kubernetes.client
import kubernetes.config
import urllib3
from kubernetes.client.exceptions import ApiException
from lmkube.operator import crd
from urllib3.util.ssl_ import create_urllib3_context

import lmkube

MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
# Custom resources of other projects the operator owns objects of: kind -> (group, version, plural).
CUSTOM_KINDS = {"InferencePool": ("inference.networking.k8s.io", "v1", "inferencepools")}


def load_config(pool_size: int | None = None) -> kubernetes.client.ApiClient:
    """In-cluster credentials when running in a pod, else $KUBECONFIG / ~/.kube/config.

    `pool_size`: connections kept per API server, at least the number of threads that call it at once
    (the client's default, 5 per CPU, is fewer than that on a small node: urllib3 then discards and
    reopens connections, and warns "Connection pool is full").
    """
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()
    configuration = kubernetes.client.Configuration.get_default_copy()
    if pool_size is not None:
        configuration.connection_pool_maxsize = max(pool_size, configuration.connection_pool_maxsize)
    client = kubernetes.client.ApiClient(configuration)
    # Named in audit logs and as the manager in its objects' managedFields (else "OpenAPI-Generator").
    client.user_agent = f"lmkube-operator/{lmkube.__version__}"
    share_tls_context(client)
    if not client.configuration.verify_ssl:
        # The kubeconfig asks for insecure-skip-tls-verify: one warning per request would drown the log.
        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
    return client


def share_tls_context(client: kubernetes.client.ApiClient) -> ssl.SSLContext:
    """One TLS context for every connection of `client`'s pool, with the trust and client certificate the
    configuration names.

    Without one, urllib3 builds a context per connection (and loads the CA into it); with OpenSSL 3 each costs
    about 0.8 MiB that stays allocated while the connection idles in the pool, and the connections a burst of
    reconciles opened stay there: measured, 24 of them held 20 MiB, and the fragments they left kept RSS up
    after they were closed.
    """
    config = client.configuration
    context = create_urllib3_context(cert_reqs=ssl.CERT_REQUIRED if config.verify_ssl else ssl.CERT_NONE)
    if config.ssl_ca_cert or config.ca_cert_data:
        context.load_verify_locations(cafile=config.ssl_ca_cert, cadata=config.ca_cert_data)
    elif config.verify_ssl:
        context.load_default_certs()
    if config.cert_file:
        context.load_cert_chain(config.cert_file, config.key_file)
    pool_kw = client.rest_client.pool_manager.connection_pool_kw
    # With these left in, urllib3 would load them into the shared context again on every connection.
    for key in ("ca_certs", "ca_cert_data", "cert_file", "key_file"):
        pool_kw.pop(key, None)
    pool_kw["ssl_context"] = context
    return context


def _json(response: Any) -> dict[str, Any]:
    return json.loads(response.data)


def not_found(error: ApiException) -> bool:
    return error.status == 404


class Kube:
    def __init__(self, client: kubernetes.client.ApiClient) -> None:
        self.client = client
        self.core = kubernetes.client.CoreV1Api(client)
        self.apps = kubernetes.client.AppsV1Api(client)
        self.custom = kubernetes.client.CustomObjectsApi(client)

    def close_idle_connections(self) -> None:
        """Closes the pooled connections no request is using (the next requests open new ones)."""
        self.client.rest_client.pool_manager.clear()

    # -- owned objects: get / create / patch by kind -----------------------------------------------

    def _ops(self, kind: str) -> tuple[Any, Any, Any]:
        match kind:
            case "Secret":
                return (self.core.read_namespaced_secret, self.core.create_namespaced_secret,
                        self.core.patch_namespaced_secret)
            case "PersistentVolumeClaim":
                return (self.core.read_namespaced_persistent_volume_claim,
                        self.core.create_namespaced_persistent_volume_claim,
                        self.core.patch_namespaced_persistent_volume_claim)
            case "Service":
                return (self.core.read_namespaced_service, self.core.create_namespaced_service,
                        self.core.patch_namespaced_service)
            case "Deployment":
                return (self.apps.read_namespaced_deployment, self.apps.create_namespaced_deployment,
                        self.apps.patch_namespaced_deployment)
            case "StatefulSet":
                return (self.apps.read_namespaced_stateful_set, self.apps.create_namespaced_stateful_set,
                        self.apps.patch_namespaced_stateful_set)
        if kind in CUSTOM_KINDS:
            return self._custom_ops(*CUSTOM_KINDS[kind])
        raise ValueError(f"unsupported kind {kind}")

    def _custom_ops(self, group: str, version: str, plural: str) -> tuple[Any, Any, Any]:
        """get / create / patch of a custom resource, with the argument order of the typed APIs above."""
        custom = self.custom

        def read(name: str, namespace: str, **kwargs: Any) -> Any:
            return custom.get_namespaced_custom_object(group, version, namespace, plural, name, **kwargs)

        def create(namespace: str, body: dict[str, Any], **kwargs: Any) -> Any:
            return custom.create_namespaced_custom_object(group, version, namespace, plural, body, **kwargs)

        def patch(name: str, namespace: str, body: dict[str, Any], **kwargs: Any) -> Any:
            return custom.patch_namespaced_custom_object(group, version, namespace, plural, name, body, **kwargs)

        return read, create, patch

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        read, _, _ = self._ops(kind)
        try:
            return _json(read(name, namespace, _preload_content=False))
        except ApiException as error:
            if not_found(error):
                return None
            raise

    def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        _, create, _ = self._ops(obj["kind"])
        return _json(create(obj["metadata"]["namespace"], dict(obj), _preload_content=False))

    def patch(self, kind: str, namespace: str, name: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        """A JSON merge patch: lists in it (containers, env, ports) replace the stored ones whole."""
        _, _, do_patch = self._ops(kind)
        return _json(do_patch(name, namespace, dict(patch), _content_type=MERGE_PATCH, _preload_content=False))

    def replace_fields(self, kind: str, namespace: str, name: str, fields: Mapping[str, Any]) -> dict[str, Any]:
        """Replaces whole fields, by JSON pointer (`/spec/template`): a JSON Patch (RFC 6902) of `replace`
        operations. Unlike a merge patch, what the new value leaves out goes (a merge patch keeps every key it
        does not name, such as a nodeSelector the spec no longer has)."""
        _, _, do_patch = self._ops(kind)
        operations = [{"op": "replace", "path": path, "value": value} for path, value in fields.items()]
        return _json(do_patch(name, namespace, operations, _content_type=JSON_PATCH, _preload_content=False))

    def delete(self, kind: str, namespace: str, name: str, foreground: bool = False) -> None:
        """Deletes an object, its dependents in the background or, with `foreground`, before it (the object
        stays, with a deletionTimestamp, until they are gone); one already gone is fine."""
        delete = {"StatefulSet": self.apps.delete_namespaced_stateful_set,
                  "Deployment": self.apps.delete_namespaced_deployment,
                  "PersistentVolumeClaim": self.core.delete_namespaced_persistent_volume_claim}[kind]
        try:
            delete(name, namespace, propagation_policy="Foreground" if foreground else "Background",
                   _preload_content=False)
        except ApiException as error:
            if not not_found(error):
                raise

    def set_pod_condition(self, namespace: str, pod: str, uid: str, condition: Mapping[str, Any]) -> None:
        """Sets one condition in a pod's status (a readiness gate's). A strategic merge patch merges
        `status.conditions` by type: the kubelet's own conditions stay as they are. The uid is a precondition (a
        StatefulSet's pod re-created under the same name is another pod); a pod already gone is fine."""
        body = {"metadata": {"uid": uid}, "status": {"conditions": [dict(condition)]}}
        try:
            self.core.patch_namespaced_pod_status(pod, namespace, body, _content_type=STRATEGIC_MERGE_PATCH,
                                                  _preload_content=False)
        except ApiException as error:
            # The uid precondition failed: a conflict, or (by the API server's version) an immutable-field error.
            if not (not_found(error) or (error.status in (409, 422) and "uid" in str(error.body).lower())):
                raise

    def list_pods(self, namespace: str, labels: Mapping[str, str]) -> list[dict[str, Any]]:
        selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
        return _json(self.core.list_namespaced_pod(namespace, label_selector=selector,
                                                   _preload_content=False)).get("items", [])

    def secret_value(self, namespace: str, name: str, key: str) -> str | None:
        secret = self.get("Secret", namespace, name)
        if secret is None:
            return None
        raw = (secret.get("data") or {}).get(key)
        return base64.b64decode(raw).decode() if raw is not None else None

    # -- the LocalModel ----------------------------------------------------------------------------

    def patch_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object_status(
            crd.GROUP, crd.VERSION, namespace, crd.PLURAL, name, {"status": dict(status)},
            _content_type=MERGE_PATCH, _preload_content=False)

    def get_local_model(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return _json(self.custom.get_namespaced_custom_object(crd.GROUP, crd.VERSION, namespace, crd.PLURAL,
                                                                  name, _preload_content=False))
        except ApiException as error:
            if not_found(error):
                return None
            raise
