"""What the gateway routes to: LocalModels and their ready replicas, as one snapshot discovery replaces.

Discovery (static.py, kube.py) writes; request handling only reads `Catalog.models`, a dict that is
replaced whole on every change, so a request never sees half an update and needs no lock.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Replica:
    """One ready server: its base URL (`http://<pod IP>:<port>`) and a name for logs and metrics."""

    url: str
    name: str


@dataclass(frozen=True)
class ServedModel:
    """One LocalModel as the gateway sees it. `model_key` is `status.modelKey` (the key its servers list the
    model under; None until the operator has loaded it once); `replicas` are the ready ones only."""

    namespace: str
    name: str
    model_key: str | None
    aliases: tuple[str, ...] = ()
    replicas: tuple[Replica, ...] = ()
    # spec.scaling.minReplicas is 0: a request while no replica serves asks for one and waits (wake.py).
    scales_from_zero: bool = False
    serving: int = 0  # status.readyReplicas: replicas the operator has loaded the model on

    @property
    def id(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass
class Catalog:
    models: dict[str, ServedModel] = field(default_factory=dict)
    # Set once discovery has delivered its first complete view (the gateway is ready only then).
    synced: bool = False

    def replace(self, models: Iterable[ServedModel]) -> None:
        self.models = {model.id: model for model in models}
        self.synced = True

    def put(self, model: ServedModel) -> None:
        self.models = {**self.models, model.id: model}

    def remove(self, model_id: str) -> None:
        if model_id in self.models:
            self.models = {k: v for k, v in self.models.items() if k != model_id}
