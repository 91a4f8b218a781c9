"""The operator with many LocalModels, on the real control plane with no kubelet (every pod stays Pending, so
every model waits on the cluster): deletion releases the finalizer at once and runs the delete handler once,
nothing is kept per model once it is gone, and a model parked on a long back-off still reacts to a change of
its objects. How fast and how much at 50 and 200 models: bench/operator_scale.py.
"""

from __future__ import annotations

import asyncio
import secrets
import ssl
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import certifi
import kopf
import kubernetes.client
import kubernetes.config
import pytest
import urllib3
from kube_cluster import KubeCluster
from lmkube.operator import crd, resources
from lmkube.operator.handlers import Runtime, Timing, build_runtime, register
from lmkube.operator.kube import Kube, share_tls_context
from operator_support import OPERATOR_ACCOUNT, Api, OperatorProcess, grant_operator_rules, install_crd
from support import wait_until

pytestmark = pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")

SPEC = {"model": "hub-org/Scale-GGUF", "gpu": {"count": 0}, "storage": {"size": "1Gi"}}
# kopf polls a timer that is still running when its object is deleted every 60 s
# (settings.background.cancellation_polling): a finalizer held that long is the bug, not a slow machine.
KOPF_CANCELLATION_POLLING = 60


def create_all(api: Api, names: list[str]) -> None:
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda name: api.create_lm(name, SPEC), names))


def delete_all(api: Api, names: list[str]) -> None:
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(api.delete_lm, names))


def all_phased(api: Api, names: list[str]) -> bool:
    return all(api.status(name).get("phase") for name in names)


def test_deleting_many_waiting_models_releases_every_finalizer_at_once(
        kube: KubeCluster, kube_namespace: str, tmp_path: Path) -> None:
    install_crd(kube)
    grant_operator_rules(kube, kube_namespace)
    kubeconfig = kube.service_account_kubeconfig(kube_namespace, OPERATOR_ACCOUNT, tmp_path / "kubeconfig")
    operator = OperatorProcess(kubeconfig, kube_namespace, tmp_path / "operator.log")
    api = Api(kube, kube_namespace)
    names = [f"m{i:02d}" for i in range(20)]
    operator.start()
    try:
        assert operator.process is not None  # `lmkube operator` runs itself again with glibc's malloc
        assert b"PYTHONMALLOC=malloc" in Path(f"/proc/{operator.process.pid}/environ").read_bytes().split(b"\0")
        create_all(api, names)
        wait_until(lambda: all_phased(api, names), timeout=120, message=f"phases:\n{operator.log()[-3000:]}")
        delete_all(api, names)
        wait_until(lambda: all(api.lm(name) is None for name in names), timeout=KOPF_CANCELLATION_POLLING / 2,
                   message=f"LocalModels still there:\n{operator.log()[-3000:]}")
        log = operator.log()
        assert [log.count(f"LocalModel {kube_namespace}/{name} deleted") for name in names] == [1] * len(names)
        assert "Connection pool is full" not in log
    finally:
        operator.stop()
        api.close()


def verified_client(kube: KubeCluster, ca_file: str) -> kubernetes.client.ApiClient:
    config = kube.client_configuration()
    config.verify_ssl = True
    config.ssl_ca_cert = ca_file
    config.connection_pool_maxsize = 8
    config.retries = 0
    return kubernetes.client.ApiClient(config)


def test_every_connection_of_the_api_client_shares_one_verified_tls_context(kube: KubeCluster) -> None:
    # A context per connection (urllib3's default) holds ~0.8 MiB for as long as the connection idles in the pool.
    with verified_client(kube, str(kube.workdir / "certs" / "apiserver.crt")) as client:
        context = share_tls_context(client)
        core = kubernetes.client.CoreV1Api(client)
        together = threading.Barrier(8)

        def read(_: int) -> int:
            together.wait(timeout=30)  # eight requests at once: eight connections
            response = core.list_namespace(_preload_content=False)
            assert response.data  # read whole: the connection goes back to the pool
            return int(response.status)

        with ThreadPoolExecutor(8) as pool:
            assert set(pool.map(read, range(8))) == {200}
        connections = client.rest_client.pool_manager.connection_from_url(kube.server).pool.queue
        sockets = [c.sock for c in connections if c is not None and c.sock is not None]
        assert len(sockets) >= 2
        assert all(sock.context is context for sock in sockets)
        assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    # Still verified: a trust store without the API server's CA refuses it.
    with verified_client(kube, certifi.where()) as client:
        share_tls_context(client)
        with pytest.raises(urllib3.exceptions.MaxRetryError) as refused:
            kubernetes.client.CoreV1Api(client).list_namespace(_preload_content=False)
        assert isinstance(refused.value.reason, urllib3.exceptions.SSLError)


# -- in-process: the operator's own bookkeeping ----------------------------------------------------


@pytest.fixture(scope="module")
def scale_ns(kube: KubeCluster) -> str:
    name = f"op-scale-{secrets.token_hex(3)}"
    install_crd(kube)
    kube.create_namespace(name)
    return name


@pytest.fixture(scope="module")
def in_process(kube: KubeCluster, scale_ns: str) -> Iterator[Runtime]:
    """The operator's handlers on kopf in a thread of this process, so the test can look at its `Runtime`.
    The timing parks a model waiting on the cluster for 5 minutes after a pass: only events move it."""
    with pytest.MonkeyPatch.context() as patch:
        # kopf's login reads the kubeconfig the client library found at import ($KUBECONFIG then).
        patch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(kube.kubeconfig))
        runtime = build_runtime(timing=Timing(poll_seconds=300, resync_seconds=600, retry_seconds=1),
                                kube=Kube(kube.api_client()))
        registry = kopf.OperatorRegistry()
        register(registry, runtime)
        ready, stop = threading.Event(), threading.Event()
        thread = threading.Thread(target=lambda: asyncio.run(kopf.operator(
            registry=registry, standalone=True, clusterwide=False, namespaces=[scale_ns], ready_flag=ready,
            stop_flag=stop)), name="kopf-under-test", daemon=True)
        thread.start()
        try:
            assert ready.wait(60), "kopf did not start"
            yield runtime
        finally:
            stop.set()
            thread.join(60)
    assert not thread.is_alive()


@pytest.fixture(scope="module")
def scale_api(kube: KubeCluster, scale_ns: str) -> Iterator[Api]:
    api = Api(kube, scale_ns)
    yield api
    api.close()


def test_a_parked_model_reacts_to_its_objects(in_process: Runtime, scale_api: Api, scale_ns: str) -> None:
    scale_api.create_lm("parked", SPEC)
    key = (scale_ns, "parked")
    # Created, its objects' events handled, and then nothing due for minutes.
    wait_until(lambda: scale_api.status("parked").get("phase") and in_process.schedule.known().get(key, 0) > 120,
               timeout=60, message=f"not parked: {in_process.schedule.known()}")
    service = resources.names("parked").service
    uid = (scale_api.read("Service", service) or {})["metadata"]["uid"]
    scale_api.core.delete_namespaced_service(service, scale_ns)
    wait_until(lambda: (scale_api.read("Service", service) or {}).get("metadata", {}).get("uid") not in (None, uid),
               timeout=60, message="the deleted Service was not recreated")
    scale_api.delete_lm("parked")
    wait_until(lambda: scale_api.lm("parked") is None, timeout=KOPF_CANCELLATION_POLLING / 2)


def test_a_changed_spec_is_reconciled_and_kopf_keeps_nothing_in_the_model(
        in_process: Runtime, scale_api: Api, scale_ns: str) -> None:
    scale_api.create_lm("edited", SPEC)
    key = (scale_ns, "edited")
    wait_until(lambda: scale_api.status("edited").get("phase") and in_process.schedule.known().get(key, 0) > 120,
               timeout=60, message=f"not parked: {in_process.schedule.known()}")
    # No last-handled configuration or marker annotation: the finalizer is the one PATCH of a new model.
    metadata = (scale_api.lm("edited") or {})["metadata"]
    assert metadata["finalizers"] == [f"{crd.GROUP}/unload"]
    assert not [a for a in metadata.get("annotations") or {} if a.startswith(f"{crd.GROUP}/")], metadata
    assert scale_api.status("edited")["observedGeneration"] == 1
    # A new spec (generation 2) is reconciled at once, although the model is parked for minutes.
    scale_api.patch_lm("edited", {"contextLength": 2048})
    wait_until(lambda: scale_api.status("edited").get("observedGeneration") == 2, timeout=60,
               message=f"the new spec was not reconciled: {scale_api.status('edited')}")
    # Parked again once the events of the new template's pods have been seen to.
    wait_until(lambda: in_process.schedule.known().get(key, 0) > 120, timeout=30,
               message=f"not parked again: {in_process.schedule.known()}")
    scale_api.delete_lm("edited")
    wait_until(lambda: scale_api.lm("edited") is None, timeout=KOPF_CANCELLATION_POLLING / 2)


def test_nothing_is_kept_for_models_that_are_gone(in_process: Runtime, scale_api: Api, scale_ns: str) -> None:
    names = [f"gone{i:02d}" for i in range(12)]
    create_all(scale_api, names)
    wait_until(lambda: all_phased(scale_api, names), timeout=120)
    assert {name for _, name in in_process.schedule.known()} >= set(names)
    releases = in_process.memory_release.releases
    delete_all(scale_api, names)
    wait_until(lambda: all(scale_api.lm(name) is None for name in names), timeout=KOPF_CANCELLATION_POLLING / 2)
    # Events of the owned objects the garbage collector is deleting now must not bring any model back.
    wait_until(lambda: not scale_api.pods("gone00") and scale_api.read("StatefulSet", "lm-gone00") is None,
               timeout=120)
    assert in_process.schedule.known() == {}
    assert in_process.schedule.bookkeeping_sizes() == {"entries": 0, "aliases": 0, "scheduled": 0, "heap": 0}
    # And once the deletions are over, the freed memory goes back to the system (gc, malloc_trim).
    wait_until(lambda: in_process.memory_release.releases > releases, timeout=60, message="no memory release")
