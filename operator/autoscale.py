"""The autoscaler's decision for one LocalModel with `spec.scaling`, as plain data and pure functions.

KubeAI's autoscaler is the model: the load is the requests running and queued on the replicas, sampled every
interval and averaged over a window; the replica count that carries it is ceil(load / targetRequests),
clamped to [minReplicas, maxReplicas]. More replicas are added at once; fewer only once demand has stayed
lower for `scaleDownDelay`, and never sooner than `scaleDownDelay` after the last change of the count.

What has to survive an operator restart is kept in the LocalModel's status (`Memory`): the count the
autoscaler last set (`desiredReplicas`), the last change of the count and since when demand has been low.
The samples themselves are not: a restarted operator first gathers half a window of them before it changes
anything, so a restart never acts on one sample. A count that someone else set (`kubectl scale`, the
gateway waking a model at zero, an HPA) counts as a change of the count: the scale-down delay runs from it.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from lmkube.operator.spec import LocalModelSpec

# Reasons, in status.scaling.lastScaleReason and in the Events.
SCALE_UP, SCALE_DOWN, SCALE_TO_ZERO = "ScaleUp", "ScaleDown", "ScaleToZero"
SCALE_FROM_ZERO, OUT_OF_RANGE, EXTERNAL = "ScaleFromZero", "OutOfRange", "External"


@dataclass(frozen=True)
class Policy:
    min_replicas: int
    max_replicas: int
    target: int  # running + queued requests per replica
    scale_down_delay: float
    window: float

    @classmethod
    def of(cls, spec: LocalModelSpec) -> Policy:
        scaling = spec.scaling
        assert scaling is not None
        return cls(scaling.min_replicas, scaling.max_replicas, spec.target_requests, scaling.scale_down_delay,
                   scaling.window)

    def clamp(self, replicas: int) -> int:
        return min(max(replicas, self.min_replicas), self.max_replicas)

    def needed(self, load: float) -> int:
        """Replicas that carry `load` at the target, clamped (any load at all needs one replica)."""
        return self.clamp(math.ceil(round(load, 3) / self.target))


class LoadWindow:
    """One model's load samples (wall-clock time, running + queued over all its replicas)."""

    def __init__(self) -> None:
        self.samples: deque[tuple[float, float]] = deque()

    def add(self, at: float, load: float, keep: float) -> None:
        self.samples.append((at, load))
        while self.samples and self.samples[0][0] < at - keep:
            self.samples.popleft()

    def clear(self) -> None:
        self.samples.clear()

    def mean(self, now: float, window: float) -> float | None:
        recent = [load for at, load in self.samples if at > now - window]
        return sum(recent) / len(recent) if recent else None

    def covers(self, now: float, seconds: float) -> bool:
        """Samples go back at least `seconds` (a restarted operator first waits for half a window)."""
        return bool(self.samples) and self.samples[0][0] <= now - seconds


@dataclass(frozen=True)
class Memory:
    """What the autoscaler keeps in status between its steps and across restarts."""

    decided: int | None = None  # status.desiredReplicas: the count it last set or accepted
    last_scale_time: float | None = None
    last_reason: str | None = None
    low_demand_since: float | None = None


@dataclass(frozen=True)
class Decision:
    replicas: int  # what spec.replicas should be now
    desired: int | None  # what the load asks for (None: not measured)
    load: float | None  # the window's mean
    reason: str | None  # set when the count changes (or was changed by someone else)
    message: str
    memory: Memory  # to keep in status

    def changes(self, current: int) -> bool:
        return self.replicas != current


def decide(policy: Policy, current: int, window: LoadWindow, now: float, memory: Memory,
           measured: bool) -> Decision:
    """The count for a model that asks for `current` replicas now. `measured`: this step read the load of
    at least one replica serving the model (no sample while none does: a model starting up or at zero)."""
    if memory.decided is not None and memory.decided != current:
        # Someone else set spec.replicas: accept it, and let the scale-down delay run from now.
        reason = SCALE_FROM_ZERO if memory.decided == 0 else EXTERNAL
        message = (f"spec.replicas set to {current} from outside the autoscaler (it had set "
                   f"{replicas_text(memory.decided)})")
        return Decision(current, None, None, reason, message, Memory(current, now, reason, None))
    clamped = policy.clamp(current)
    if clamped != current:
        message = (f"spec.replicas {current} is outside [{policy.min_replicas}, {policy.max_replicas}]: "
                   f"set to {clamped}")
        return Decision(clamped, None, None, OUT_OF_RANGE, message, Memory(clamped, now, OUT_OF_RANGE, None))
    load = window.mean(now, policy.window) if measured else None
    if load is None:
        # Nothing serves the model yet (starting, loading, at zero): no demand is known, so nothing changes and
        # no scale-down clock runs.
        why = ("scaled to zero: a request through the gateway brings a replica back" if current == 0
               else "no replica serves the model yet: waiting for one before measuring its load")
        return Decision(current, None, None, None, why, Memory(current, memory.last_scale_time, memory.last_reason))
    load = round(load, 3)
    desired = policy.needed(load)
    seen = f"{load:g} requests running or queued (mean over {policy.window:g} s), target {policy.target} per replica"
    if not window.covers(now, policy.window / 2):
        return Decision(current, desired, load, None, f"{seen}: gathering load samples before deciding",
                        Memory(current, memory.last_scale_time, memory.last_reason, memory.low_demand_since))
    if desired > current:
        message = f"{seen}: {current} -> {desired} replicas"
        return Decision(desired, desired, load, SCALE_UP, message, Memory(desired, now, SCALE_UP, None))
    if desired == current:
        return Decision(current, desired, load, None, f"{seen}: {current} replica(s) fit",
                        Memory(current, memory.last_scale_time, memory.last_reason, None))
    low_since = memory.low_demand_since if memory.low_demand_since is not None else now
    ready_at = max(low_since, memory.last_scale_time or low_since) + policy.scale_down_delay
    if now >= ready_at:
        reason = SCALE_TO_ZERO if desired == 0 else SCALE_DOWN
        message = f"{seen}: {current} -> {desired} replicas after {now - low_since:.0f} s of lower demand"
        return Decision(desired, desired, load, reason, message, Memory(desired, now, reason, None))
    return Decision(current, desired, load, None,
                    f"{seen}: {desired} would do; scaling down in {ready_at - now:.0f} s if demand stays low",
                    Memory(current, memory.last_scale_time, memory.last_reason, low_since))


def replicas_text(replicas: int) -> str:
    return f"{replicas} replica" + ("" if replicas == 1 else "s")
