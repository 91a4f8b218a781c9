"""What the in-process reconcile tests share (their `cluster` fixture is conftest's): the model they apply and
short-hands."""

from __future__ import annotations

from fake_kube import FakeCluster, Volume

MODEL = "acme/Tiny-Chat-GGUF"
KEY = "acme/tiny-chat-gguf"


def conditions(status: dict) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def ready_model(cluster: FakeCluster, name: str = "tiny", **spec: object) -> None:
    """A LocalModel whose pod has the files, after the pass that loads it."""
    cluster.apply(name, {"model": MODEL, **spec})
    cluster.reconcile(name)
    cluster.start_pod(name, f"{name}-0", volume=Volume(files={KEY: "q4_k_m"}))
    assert cluster.reconcile(name)["phase"] == "Ready"
