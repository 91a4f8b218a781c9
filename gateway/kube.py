"""Discovery from the Kubernetes API: LocalModels and their ready pods, and the gateway-key Secrets.

Each kind is listed, then watched from the list's resourceVersion (relisted after a 410 Gone or a broken
watch), in each namespace the gateway serves (or cluster-wide when it serves all). Ready replicas come from
the pods themselves (Ready condition, pod IP, the `http` container port), not from EndpointSlices: that
is the same readiness the Service's endpoints follow, one fewer kind to read, and a terminating pod
(deletionTimestamp set) is dropped at once so new requests avoid it while its in-flight ones finish.

Plain httpx on the REST API (the official client is synchronous): credentials from the pod's
ServiceAccount in a cluster, else from $KUBECONFIG or ~/.kube/config through the official client's loader
(token, client certificate, CA, and `exec` credential plugins such as EKS's and GKE's).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
from lmkube.operator import crd
from lmkube.operator.resources import PORT_NAME, selector_labels

from .catalog import Catalog, Replica, ServedModel
from .keys import KEY_LABEL, KeyRing, grant_from_fields

log = logging.getLogger("lmkube.gateway")

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
POD_SELECTOR = "app.kubernetes.io/name=lmkube,app.kubernetes.io/component=model-server"
DEFAULT_PORT = 1234


@dataclass
class KubeConfig:
    server: str
    verify: ssl.SSLContext | bool
    token: Callable[[], str | None]


def _ssl_context(ca_file: str | None, cert: tuple[str, str] | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca_file)
    if cert is not None:
        context.load_cert_chain(*cert)
    return context


def load_kube_config() -> KubeConfig:
    host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
    if host and port and (SERVICE_ACCOUNT / "token").exists():
        # Bound ServiceAccount tokens are rotated on disk: read it for every request.
        return KubeConfig(f"https://{host}:{port}", _ssl_context(str(SERVICE_ACCOUNT / "ca.crt"), None),
                          lambda: (SERVICE_ACCOUNT / "token").read_text().strip())
    return _from_kubeconfig()


def _from_kubeconfig() -> KubeConfig:
    """$KUBECONFIG (its files merged) or ~/.kube/config, read by the official client's loader: its current
    context's token or tokenFile, client certificate, CA, or an `exec` plugin (EKS, GKE, ...), which is run
    again whenever the credential it printed has expired (its `expirationTimestamp`)."""
    from kubernetes import client, config  # out of a cluster only

    configuration = client.Configuration()
    config.load_kube_config(client_configuration=configuration)
    cert: tuple[str, str] | None = None
    if configuration.cert_file and configuration.key_file:
        cert = (configuration.cert_file, configuration.key_file)
    verify: ssl.SSLContext | bool
    if configuration.verify_ssl:
        verify = _ssl_context(configuration.ssl_ca_cert, cert)
    elif cert is not None:  # insecure-skip-tls-verify, but a client certificate to present
        verify = ssl.create_default_context()
        verify.check_hostname = False
        verify.verify_mode = ssl.CERT_NONE
        verify.load_cert_chain(*cert)
    else:
        verify = False

    def token() -> str | None:
        if configuration.refresh_api_key_hook is not None:  # a token that expires: runs the plugin again
            configuration.refresh_api_key_hook(configuration)
        bearer = configuration.api_key.get("BearerToken")  # "Bearer <token>"
        return bearer.removeprefix("Bearer ") if isinstance(bearer, str) else None

    return KubeConfig(configuration.host.rstrip("/"), verify, token)


class Watch:
    """One kind in one namespace (or all): a list, then a watch; `on_change` after each change."""

    def __init__(self, client: httpx.AsyncClient, config: KubeConfig, path: str, selector: str | None,
                 on_change: Callable[[], None]) -> None:
        self.client, self.config, self.path, self.selector = client, config, path, selector
        self.on_change = on_change
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.synced = asyncio.Event()

    def _headers(self) -> dict[str, str]:
        token = self.config.token()
        return {"Authorization": f"Bearer {token}"} if token else {}

    def _params(self, **extra: str) -> dict[str, str]:
        return {**({"labelSelector": self.selector} if self.selector else {}), **extra}

    @staticmethod
    def _key(obj: dict[str, Any]) -> tuple[str, str]:
        meta = obj["metadata"]
        return meta.get("namespace", ""), meta["name"]

    async def _list(self) -> str:
        response = await self.client.get(self.config.server + self.path, params=self._params(),
                                         headers=self._headers())
        response.raise_for_status()
        document = response.json()
        self.objects = {self._key(item): item for item in document.get("items", [])}
        self.synced.set()
        self.on_change()
        return document["metadata"]["resourceVersion"]

    async def run(self) -> None:
        while True:
            try:
                version: str | None = await self._list()
                while version:
                    version = await self._watch(version)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the API server restarted, a token expired, RBAC is missing, ...
                log.warning("watching %s: %s; retrying in 2 s", self.path, exc)
                await asyncio.sleep(2)

    async def _watch(self, version: str) -> str | None:
        """Follows changes; the version to resume from, or None to relist (410 Gone)."""
        params = self._params(watch="1", resourceVersion=version, allowWatchBookmarks="true",
                              timeoutSeconds="300")
        async with self.client.stream("GET", self.config.server + self.path, params=params,
                                      headers=self._headers(), timeout=httpx.Timeout(10, read=330)) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line:
                    continue
                event = orjson.loads(line)
                kind, obj = event["type"], event["object"]
                if kind == "ERROR":
                    return None if obj.get("code") == 410 else version
                version = obj["metadata"].get("resourceVersion", version)
                if kind == "BOOKMARK":
                    continue
                if kind == "DELETED":
                    self.objects.pop(self._key(obj), None)
                else:
                    self.objects[self._key(obj)] = obj
                self.on_change()
        return version


def _ready(pod: dict[str, Any]) -> bool:
    """Ready, or about to be: its containers are ready and every readiness gate is True. The kubelet derives Ready
    from those, but only on its next sync of the pod: without this, the operator's gate write (after the load)
    would leave the gateway with no replica for that moment, though the model status already says Ready."""
    if pod["metadata"].get("deletionTimestamp") or not (pod.get("status") or {}).get("podIP"):
        return False
    true = {c.get("type") for c in (pod.get("status") or {}).get("conditions") or [] if c.get("status") == "True"}
    gates = {g.get("conditionType") for g in (pod.get("spec") or {}).get("readinessGates") or []}
    return "Ready" in true or ("ContainersReady" in true and gates <= true)


def _port(pod: dict[str, Any]) -> int:
    for container in pod.get("spec", {}).get("containers", []):
        for port in container.get("ports") or []:
            if port.get("name") == PORT_NAME:
                return int(port["containerPort"])
    return DEFAULT_PORT


def _serving_pods(status: dict[str, Any]) -> set[str] | None:
    """The pods the operator reports the model loaded on (status.pods[], phase Ready or Idle), or None when it
    reports no pod at all yet. The pods' readiness gate (lmkube.dev/model-loaded) keeps a pod un-Ready until the
    operator has loaded the model in it; this set also covers pods without the gate (an earlier operator's), Ready
    as soon as the server listens: a request sent there would load the model on its own, and the operator's
    load (which replaces what else is loaded) would cut it off."""
    records = status.get("pods") or []
    if not records:
        return None
    return {r.get("name") for r in records if r.get("phase") in ("Ready", "Idle")}


def served_models(local_models: list[dict[str, Any]], pods: list[dict[str, Any]]) -> list[ServedModel]:
    """Each LocalModel with its ready pods (matched by the operator's selector labels)."""
    models = []
    for body in local_models:
        meta, spec, status = body["metadata"], body.get("spec") or {}, body.get("status") or {}
        selector = selector_labels(meta["name"]).items()
        serving = _serving_pods(status)
        replicas = tuple(
            Replica(url=f"http://{pod['status']['podIP']}:{_port(pod)}", name=pod["metadata"]["name"])
            for pod in pods
            if pod["metadata"].get("namespace") == meta["namespace"] and _ready(pod)
            and selector <= (pod["metadata"].get("labels") or {}).items()
            and (serving is None or pod["metadata"]["name"] in serving))
        models.append(ServedModel(namespace=meta["namespace"], name=meta["name"], model_key=status.get("modelKey"),
                                  aliases=tuple(spec.get("aliases") or ()), replicas=replicas,
                                  scales_from_zero=(spec.get("scaling") or {}).get("minReplicas") == 0,
                                  serving=int(status.get("readyReplicas") or 0)))
    return models


class KubeDiscovery:
    """LocalModels and pods in `namespaces` (all when empty); gateway keys from Secrets labelled
    `lmkube.dev/gateway-key` in `key_namespace` (none when None)."""

    def __init__(self, catalog: Catalog, keys: KeyRing, namespaces: list[str], key_namespace: str | None,
                 config: KubeConfig | None = None) -> None:
        self.catalog, self.keys = catalog, keys
        self.config = config or load_kube_config()
        self.client = httpx.AsyncClient(verify=self.config.verify, timeout=30)
        scopes = [f"/namespaces/{ns}" for ns in namespaces] or [""]
        models = f"/apis/{crd.GROUP}/{crd.VERSION}"
        self.model_watches = [Watch(self.client, self.config, f"{models}{s}/{crd.PLURAL}", None, self._rebuild)
                              for s in scopes]
        self.pod_watches = [Watch(self.client, self.config, f"/api/v1{s}/pods", POD_SELECTOR, self._rebuild)
                            for s in scopes]
        self.key_watch = (Watch(self.client, self.config, f"/api/v1/namespaces/{key_namespace}/secrets", KEY_LABEL,
                                self._rekey) if key_namespace else None)
        self._tasks: list[asyncio.Task[None]] = []

    def _watches(self) -> list[Watch]:
        return [*self.model_watches, *self.pod_watches, *([self.key_watch] if self.key_watch else [])]

    def _rebuild(self) -> None:
        if not all(w.synced.is_set() for w in (*self.model_watches, *self.pod_watches)):
            return
        local_models = [obj for w in self.model_watches for obj in w.objects.values()]
        pods = [obj for w in self.pod_watches for obj in w.objects.values()]
        self.catalog.replace(served_models(local_models, pods))

    def _rekey(self) -> None:
        assert self.key_watch is not None
        entries = {}
        for (namespace, name), secret in self.key_watch.objects.items():
            fields = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
            try:
                entries[f"{namespace}/{name}"] = grant_from_fields(name, fields)
            except ValueError as exc:
                log.warning("Secret %s/%s: %s", namespace, name, exc)
        self.keys.replace(entries)

    async def start(self, timeout: float = 60) -> None:
        self._tasks = [asyncio.create_task(w.run()) for w in self._watches()]
        # Serve nothing half-known: wait for every first list (the watches keep retrying meanwhile).
        await asyncio.wait_for(asyncio.gather(*(w.synced.wait() for w in self._watches())), timeout)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.client.aclose()
