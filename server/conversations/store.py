"""One JSON file per stored response under `$LMKUBE_HOME/conversations/`, written atomically."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

_ID = re.compile(r"resp_[0-9a-f]{48}")
MAX_DEPTH = 100_000  # a guard against a parent cycle in hand-edited files
CACHE_SIZE = 4096  # nodes kept in memory (they never change once written)


def new_response_id() -> str:
    return "resp_" + secrets.token_hex(24)


def is_response_id(value: str) -> bool:
    """Ids this store can hold; anything else can never be found (and never names a file)."""
    return _ID.fullmatch(value) is not None


@dataclass
class ConversationNode:
    id: str
    parent_id: str | None
    model: str
    messages: list[dict[str, Any]]
    created_at: float = field(default_factory=time.time)
    # /v1/responses only: the Response object as returned, and the request's input items (with ids), which
    # GET /v1/responses/{id} and its input_items answer. Nodes from /api/v1/chat have neither.
    response: dict[str, Any] | None = None
    input_items: list[dict[str, Any]] | None = None


class ConversationStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._cache: dict[str, ConversationNode] = {}
        self._lock = threading.Lock()

    def _path(self, response_id: str) -> Path:
        return self.root / f"{response_id}.json"

    def get(self, response_id: str) -> ConversationNode | None:
        if not is_response_id(response_id):
            return None
        if (node := self._cache.get(response_id)) is not None:
            return node
        try:
            raw = orjson.loads(self._path(response_id).read_bytes())
            node = ConversationNode(
                id=raw["id"], parent_id=raw.get("parent_id"), model=raw.get("model", ""),
                messages=list(raw.get("messages", [])), created_at=raw.get("created_at", 0.0),
                response=raw.get("response"), input_items=raw.get("input_items"),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None
        self._remember(node)
        return node

    def chain(self, response_id: str) -> list[ConversationNode] | None:
        """The nodes from the root to `response_id`, or None if it (or an ancestor) is missing."""
        nodes: list[ConversationNode] = []
        current: str | None = response_id
        while current is not None and len(nodes) < MAX_DEPTH:
            node = self.get(current)
            if node is None:
                return None
            nodes.append(node)
            current = node.parent_id
        nodes.reverse()
        return nodes

    def history(self, response_id: str) -> list[dict[str, Any]] | None:
        """Every message of the conversation ending at `response_id`, oldest first; None if unknown."""
        nodes = self.chain(response_id)
        if nodes is None:
            return None
        return [dict(m) for node in nodes for m in node.messages]

    def add(self, *, parent_id: str | None, model: str, messages: Sequence[Mapping[str, Any]],
            response_id: str | None = None, response: Mapping[str, Any] | None = None,
            input_items: Sequence[Mapping[str, Any]] | None = None) -> ConversationNode:
        node = ConversationNode(id=response_id or new_response_id(), parent_id=parent_id, model=model,
                                messages=[dict(m) for m in messages],
                                response=dict(response) if response is not None else None,
                                input_items=[dict(i) for i in input_items] if input_items is not None else None)
        self._write(node)
        self._remember(node)
        return node

    def delete(self, response_id: str) -> bool:
        """Forgets a stored response; False if there was none. Responses that continued it can no longer be
        continued (their history passes through it), as with any missing ancestor."""
        if not is_response_id(response_id):
            return False
        try:
            self._path(response_id).unlink()
            found = True
        except FileNotFoundError:
            found = False
        with self._lock:  # after the unlink: a concurrent get cannot bring it back into the cache
            self._cache.pop(response_id, None)
        return found

    def _remember(self, node: ConversationNode) -> None:
        with self._lock:
            self._cache[node.id] = node
            while len(self._cache) > CACHE_SIZE:
                del self._cache[next(iter(self._cache))]

    def _write(self, node: ConversationNode) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{node.id}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(orjson.dumps(asdict(node)))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._path(node.id))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
