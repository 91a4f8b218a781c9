"""Per-key concurrency limits: a key with `maxConcurrency` N has at most N requests in flight through one
gateway replica; the next gets 429 with Retry-After (the limit is per gateway replica, so with R replicas
behind the Service a key may reach R x N)."""

from __future__ import annotations

from collections import defaultdict

from .keys import Grant


class ConcurrencyLimiter:
    def __init__(self) -> None:
        self.in_flight: defaultdict[str, int] = defaultdict(int)

    def try_acquire(self, grant: Grant) -> bool:
        if grant.max_concurrency is not None and self.in_flight[grant.name] >= grant.max_concurrency:
            return False
        self.in_flight[grant.name] += 1
        return True

    def release(self, grant: Grant) -> None:
        self.in_flight[grant.name] -= 1
        if self.in_flight[grant.name] <= 0:
            del self.in_flight[grant.name]
