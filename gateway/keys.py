"""Gateway API keys and what each may use.

A key is a Secret in the gateway's own namespace labelled `lmkube.dev/gateway-key` (or an entry of a keys
file, for local use and tests), with these data fields:

    key             the API key clients send (`Authorization: Bearer <key>` or `x-api-key: <key>`)
    models          optional: LocalModels it may use, comma or space separated; each `namespace/name`,
                    `namespace/*`, a name, a model key or an alias; `*` for all
    namespaces      optional: namespaces whose LocalModels it may use, comma or space separated; `*` for all
    maxConcurrency  optional: requests it may have in flight at once through one gateway replica

A key with neither `models` nor `namespaces` may use nothing. Keys are compared in constant time against
every configured key, so timing tells neither which key nor how much of one matched.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from .catalog import ServedModel
from .resolve import names_of

KEY_LABEL = "lmkube.dev/gateway-key"
_SPLIT = re.compile(r"[\s,]+")


def _names(text: str | None) -> frozenset[str]:
    return frozenset(part.lower() for part in _SPLIT.split(text or "") if part)


@dataclass(frozen=True)
class Grant:
    """What one key may use. `name` (the Secret's name) labels metrics and logs; the key itself never does."""

    name: str
    models: frozenset[str]
    namespaces: frozenset[str]
    max_concurrency: int | None = None

    def allows(self, model: ServedModel) -> bool:
        if "*" in self.models or "*" in self.namespaces or model.namespace.lower() in self.namespaces:
            return True
        if f"{model.namespace.lower()}/*" in self.models:
            return True
        return not self.models.isdisjoint(names_of(model))


def grant_from_fields(name: str, fields: Mapping[str, str]) -> tuple[bytes, Grant]:
    """(key, grant) from a Secret's decoded data or a keys-file entry; ValueError when it has no key."""
    key = (fields.get("key") or "").strip()
    if not key:
        raise ValueError(f"gateway key {name!r} has no `key`")
    limit = fields.get("maxConcurrency")
    max_concurrency = int(limit) if limit not in (None, "") else None
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(f"gateway key {name!r}: maxConcurrency must be at least 1")
    return key.encode(), Grant(name=name, models=_names(fields.get("models")),
                               namespaces=_names(fields.get("namespaces")), max_concurrency=max_concurrency)


class KeyRing:
    """The keys in force; replaced whole when the Secrets (or the file) change."""

    def __init__(self, entries: Mapping[str, tuple[bytes, Grant]] | None = None) -> None:
        self.entries: dict[str, tuple[bytes, Grant]] = dict(entries or {})

    def __len__(self) -> int:
        return len(self.entries)

    def replace(self, entries: Mapping[str, tuple[bytes, Grant]]) -> None:
        self.entries = dict(entries)

    def put(self, source: str, entry: tuple[bytes, Grant]) -> None:
        self.entries = {**self.entries, source: entry}

    def remove(self, source: str) -> None:
        self.entries = {k: v for k, v in self.entries.items() if k != source}

    def lookup(self, presented: str) -> Grant | None:
        candidate = presented.encode()
        found: Grant | None = None
        for key, grant in self.entries.values():  # every key, whatever matched, for constant time
            if hmac.compare_digest(candidate, key):
                found = grant
        return found


def load_keys_file(path: Path) -> dict[str, tuple[bytes, Grant]]:
    """`keys: [{name, key, models, namespaces, maxConcurrency}]` (YAML or JSON; lists or strings)."""
    document = yaml.safe_load(path.read_text()) or {}
    entries = {}
    for index, item in enumerate(document.get("keys") or []):
        name = str(item.get("name") or f"key-{index}")
        fields = {k: " ".join(map(str, v)) if isinstance(v, list) else str(v) for k, v in item.items()
                  if v is not None}
        entries[f"file/{name}"] = grant_from_fields(name, fields)
    return entries


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key from `Authorization: Bearer` (OpenAI, LM Studio) or `x-api-key` (Anthropic)."""
    authorization = headers.get("authorization")
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    api_key = headers.get("x-api-key")
    return api_key.strip() if api_key else None
