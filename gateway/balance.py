"""Which replica of a LocalModel gets a request.

- Without an affinity key: least outstanding requests (counted by this gateway replica), ties taken in
  turn.
- With one (the conversation's prefix, see routes.affinity_key): consistent hashing with bounded loads
  (CHWBL, as KubeAI's PrefixHash): the key's point on a ring of virtual nodes picks the replica that holds
  the conversation's KV cache, unless that replica already has more than `load_factor` times the mean
  load, in which case the walk goes on to the next replica on the ring. A multi-turn chat thus returns to
  its replica, and a hot conversation cannot pile everything onto one pod.
- A replica that failed (connection refused, died mid-stream) is avoided for `eject_seconds` or until
  discovery drops it; when every replica is avoided, all are tried.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence

from .catalog import Replica

VIRTUAL_NODES = 128  # points per replica on the ring: spreads keys evenly over a handful of replicas
DEFAULT_LOAD_FACTOR = 1.25  # KubeAI's meanLoadFactor 125


def _point(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class Ring:
    def __init__(self, urls: Iterable[str]) -> None:
        points = sorted((_point(f"{url}#{i}"), url) for url in urls for i in range(VIRTUAL_NODES))
        self.hashes = [h for h, _ in points]
        self.urls = [u for _, u in points]

    def walk(self, key: str) -> list[str]:
        """Every replica once, in ring order from the key's point."""
        if not self.urls:
            return []
        start = bisect.bisect(self.hashes, _point(key)) % len(self.urls)
        seen: dict[str, None] = {}
        for index in range(len(self.urls)):
            seen.setdefault(self.urls[(start + index) % len(self.urls)])
            if len(seen) == len(set(self.urls)):
                break
        return list(seen)


class Balancer:
    def __init__(self, load_factor: float = DEFAULT_LOAD_FACTOR, eject_seconds: float = 10.0) -> None:
        self.load_factor = load_factor
        self.eject_seconds = eject_seconds
        self.outstanding: defaultdict[str, int] = defaultdict(int)
        self._ejected: dict[str, float] = {}
        self._rings: dict[tuple[str, ...], Ring] = {}
        self._turn = 0

    def _ring(self, urls: tuple[str, ...]) -> Ring:
        ring = self._rings.get(urls)
        if ring is None:
            if len(self._rings) > 1024:  # replica sets come and go with rollouts
                self._rings.clear()
            ring = self._rings[urls] = Ring(urls)
        return ring

    def eject(self, url: str) -> None:
        self._ejected[url] = time.monotonic() + self.eject_seconds

    def _healthy(self, url: str) -> bool:
        until = self._ejected.get(url)
        if until is None:
            return True
        if until <= time.monotonic():
            del self._ejected[url]
            return True
        return False

    def pick(self, replicas: Sequence[Replica], affinity: str | None = None,
             exclude: frozenset[str] = frozenset()) -> Replica | None:
        candidates = [r for r in replicas if r.url not in exclude]
        healthy = [r for r in candidates if self._healthy(r.url)]
        candidates = healthy or candidates
        if not candidates:
            return None
        by_url = {r.url: r for r in candidates}
        if affinity is not None and len(candidates) > 1:
            total = sum(self.outstanding[url] for url in by_url)
            bound = math.ceil((total + 1) * self.load_factor / len(by_url))
            ring = self._ring(tuple(sorted(r.url for r in replicas)))
            for url in ring.walk(affinity):
                if url in by_url and self.outstanding[url] + 1 <= bound:
                    return by_url[url]
        self._turn += 1
        least = min(self.outstanding[r.url] for r in candidates)
        tied = [r for r in candidates if self.outstanding[r.url] == least]
        return tied[self._turn % len(tied)]

    def acquire(self, url: str) -> None:
        self.outstanding[url] += 1

    def release(self, url: str) -> None:
        self.outstanding[url] -= 1
        if self.outstanding[url] <= 0:
            del self.outstanding[url]
