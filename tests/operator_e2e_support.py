"""What the operator's end-to-end tests on the real node share (tests/test_operator_e2e*.py, and the gateway's):
the local Hugging Face stand-in with generated models, the `lmkube operator` subprocess for the module's
namespace (tests/node_support.py `node_namespace`), and helpers to create LocalModels and wait on them.

The fixtures are used by importing them into a test module, with `kube` and `node_namespace` from node_support.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hf_hub_server import FakeHub
from kube_cluster import KubeCluster
from lmkube.operator import resources
from node_support import POD_TIMEOUT, provide_volume
from operator_support import OPERATOR_ACCOUNT, Api, OperatorProcess
from real_node import RealNode
from real_node_config import NODE_IP
from support import wait_until

from lmkube.synthetic_gguf import LlamaShape, write_llama_model

BIG = LlamaShape(n_vocab=4096, n_embd=128)  # ~2 MB: a throttled download lasts long enough to watch
# Small weights, a long context: its KV cache alone (8 layers x 8 KV heads x 16 x 2 x 2 bytes = 4 KiB per token,
# 256 MiB at 64k tokens, zeroed by llama.cpp at load; the server's estimate: 327 MiB) takes an idle server
# (~90 MiB RSS) past a 256 MiB memory limit (measured: ~355 MiB RSS once loaded).
WIDE = LlamaShape(n_embd=128, n_layer=8, n_head=8, n_head_kv=8, n_ctx_train=65536)
TINY_REPO, BIG_REPO, BIG2_REPO, WIDE_REPO = ("hub-org/Tiny-GGUF", "hub-org/Big-GGUF", "hub-org/Big2-GGUF",
                                             "hub-org/Wide-GGUF")
PHASE_ORDER = ["Pending", "Scheduling", "Downloading", "Loading", "Ready"]


@pytest.fixture(scope="module")
def hub(real_node: RealNode, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    d = tmp_path_factory.mktemp("op-hub")
    hub = FakeHub(host=NODE_IP).start()  # where pods reach the host
    hub.add_repo(TINY_REPO, {"tiny-Q4_K_M.gguf": write_llama_model(d / "tiny-Q4_K_M.gguf", seed=21, name="Tiny"),
                             "tiny-Q8_0.gguf": write_llama_model(d / "tiny-Q8_0.gguf", seed=22, name="Tiny")})
    big = write_llama_model(d / "big-Q4_K_M.gguf", BIG, seed=23, name="Big")
    hub.add_repo(BIG_REPO, {"big-Q4_K_M.gguf": big})
    hub.add_repo(BIG2_REPO, {"big2-Q4_K_M.gguf": write_llama_model(d / "big2-Q4_K_M.gguf", BIG, seed=24, name="B2")})
    hub.add_repo(WIDE_REPO, {"wide-Q4_K_M.gguf": write_llama_model(d / "wide-Q4_K_M.gguf", WIDE, seed=25, name="W")})
    yield hub
    hub.stop()


@pytest.fixture(scope="module")
def operator(kube: KubeCluster, node_namespace: str, node_image: str, tmp_path_factory: pytest.TempPathFactory,
             request: pytest.FixtureRequest) -> Iterator[OperatorProcess]:
    """The operator for the module's namespace, with the module's OPERATOR_ENV (if any) added to its environment."""
    ns = node_namespace
    workdir = tmp_path_factory.mktemp("operator")
    kubeconfig = kube.service_account_kubeconfig(ns, OPERATOR_ACCOUNT, workdir / "kubeconfig")
    # The node has no GPU image and no registry: GPU pods run the CPU image (a GPU is only advertised).
    images = {"LMKUBE_OPERATOR_CPU_IMAGE": node_image, "LMKUBE_OPERATOR_CUDA_IMAGE": node_image,
              "LMKUBE_OPERATOR_IMAGE_PULL_POLICY": "Never", **getattr(request.module, "OPERATOR_ENV", {})}
    process = OperatorProcess(kubeconfig, ns, workdir / "operator.log", env=images)
    process.start()
    yield process
    process.stop()
    log = process.log()
    assert "Forbidden" not in log and " 403" not in log, log[-6000:]


@pytest.fixture(scope="module")
def api(kube: KubeCluster, node_namespace: str) -> Iterator[Api]:
    api = Api(kube, node_namespace)
    yield api
    api.close()


def create_lm(node: RealNode, api: Api, name: str, spec: dict[str, Any]) -> list[Path]:
    """Creates the LocalModel with a volume for each replica's cache claim (none for an existingClaim); returns
    their directories."""
    volumes = []
    if not (spec.get("storage") or {}).get("existingClaim"):
        volumes = [provide_volume(node, api.namespace, resources.replica_claim(name, ordinal))
                   for ordinal in range(max(int(spec.get("replicas", 1)), 1))]
    api.create_lm(name, spec)
    return volumes


def lm_spec(hub: FakeHub, model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "gpu": {"count": 0}, "storage": {"size": "1Gi"},
            "env": [{"name": "HF_ENDPOINT", "value": hub.url}, {"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"}],
            **extra}


def wait_phase(api: Api, operator: OperatorProcess, name: str, phase: str, timeout: float = POD_TIMEOUT,
               **expect: Any) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        status = api.status(name)
        if status.get("phase") == phase and all(status.get(k) == v for k, v in expect.items()):
            return status
        return None

    try:
        return wait_until(reached, timeout=timeout, interval=0.2)
    except TimeoutError:
        raise AssertionError(f"{name} not {phase} {expect} after {timeout}s: {json.dumps(api.status(name), indent=1)}"
                             f"\n--- operator log:\n{operator.log()[-5000:]}") from None


def token_of(api: Api, name: str) -> str:
    secret = api.read("Secret", resources.names(name).secret)
    assert secret is not None
    return base64.b64decode(secret["data"]["token"]).decode()


def pod_models(ip: str, token: str) -> dict[str, dict[str, Any]]:
    r = httpx.get(f"http://{ip}:1234/api/v1/models", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert r.status_code == 200, r.text
    return {m["key"]: m for m in r.json()["models"]}


def hub_size(hub: FakeHub, repo: str) -> int:
    return max(len(data) for data in hub.repos[repo.lower()].files.values())


def delete_and_wait_gone(api: Api, name: str, timeout: float = POD_TIMEOUT) -> None:
    # Generous: on a loaded 2-core machine the garbage collector (restarted whenever a CRD appears, see
    # tests/kube_cluster.py) took more than 30 s to collect the owned objects.
    api.delete_lm(name)
    n = resources.names(name)
    wait_until(lambda: api.lm(name) is None and not api.pods(name) and all(
        api.read(kind, obj) is None for kind, obj in (("StatefulSet", n.statefulset), ("Service", n.service),
                                                      ("Secret", n.secret))), timeout=timeout,
        message=f"{name} and its objects garbage-collected")
