"""Discovery from a file, for local use and tests: the LocalModels and their replicas, written by hand.

    models:
      - namespace: default          # optional, default "default"
        name: chat
        modelKey: acme/tiny-chat
        aliases: [tiny]
        replicas: [http://127.0.0.1:1234, http://127.0.0.1:1235]

YAML or JSON. The file is read again when its modification time changes, so a test (or an operator by
hand) can add and remove replicas while the gateway runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

import yaml

from .catalog import Catalog, Replica, ServedModel

log = logging.getLogger("lmkube.gateway")


def parse_models(document: Any) -> list[ServedModel]:
    if not isinstance(document, dict) or not isinstance(document.get("models", []), list):
        raise ValueError("a backends file is a mapping with a `models` list")
    models = []
    for item in document.get("models") or []:
        replicas = tuple(Replica(url=str(url).rstrip("/"), name=str(url).rstrip("/"))
                         for url in item.get("replicas") or [])
        models.append(ServedModel(namespace=str(item.get("namespace") or "default"), name=str(item["name"]),
                                  model_key=item.get("modelKey"), aliases=tuple(item.get("aliases") or ()),
                                  replicas=replicas))
    return models


class StaticDiscovery:
    def __init__(self, path: Path, catalog: Catalog, poll_seconds: float = 0.5) -> None:
        self.path = path
        self.catalog = catalog
        self.poll_seconds = poll_seconds
        self._mtime: float | None = None
        self._task: asyncio.Task[None] | None = None

    def load(self) -> None:
        mtime = self.path.stat().st_mtime
        if mtime == self._mtime:
            return
        self.catalog.replace(parse_models(yaml.safe_load(self.path.read_text())))
        self._mtime = mtime

    async def start(self) -> None:
        self.load()
        self._task = asyncio.create_task(self._follow())

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(self.poll_seconds)
            try:
                self.load()
            except (OSError, ValueError, KeyError, yaml.YAMLError) as exc:  # a half-written file: keep the last view
                log.warning("backends file %s: %s", self.path, exc)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
