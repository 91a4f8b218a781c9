"""Shared fixtures: generated GGUF models, real `lmkube serve` processes on free ports, a real kube-apiserver."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kube_cluster import KubeCluster
from support import LMKUBE, ServerProcess, free_port, write_test_models


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
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeCluster]:
    """A real etcd + kube-apiserver (no controllers, no nodes) for the session; see tests/kube_cluster.py.

    The binaries come from scripts/install-test-cluster.sh, which this runs (instant once they are cached).
    """
    with KubeCluster(workdir=tmp_path_factory.mktemp("kube")) as cluster:
        yield cluster
