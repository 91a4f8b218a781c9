"""The autoscaler's decisions over a load ramp: operator/autoscale.py's `decide`, fed a scripted load.

    .venv/bin/python bench/scaling.py                        # the defaults (window 60 s, delay 5 m) and a fast policy
    .venv/bin/python bench/scaling.py --window 30 --delay 120 --target 4 --max 8 --interval 5

The load is what the pods' /metrics would report: closed-loop clients, each with one request running or queued
at all times, so the load equals the number of clients whatever the replica count. Each step of the ramp holds
a client count for a while; every `--interval` seconds the autoscaler samples the load (none while no replica
serves: a replica asked for serves `--start-seconds` later, the time a pod takes to start and load) and decides,
exactly as the operator does (the same functions, the same memory between steps). No cluster and no model: this
measures the policy, not the cluster; the real end-to-end times (scale-up under 16 streams, scale from zero
through the gateway) come from tests/test_scaling_real_node.py and are in bench/README.md.

It prints, per policy, every change of the count (time, clients, averaged load, count, reason) and, per step
of the ramp, how long the count took to reach what that step needs.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass

from lmkube.operator.autoscale import LoadWindow, Memory, Policy, decide

# (clients, seconds): up in steps from one busy replica, a peak, down, idle long enough to reach zero, back.
RAMP = ((4, 120), (8, 120), (16, 180), (32, 180), (12, 180), (2, 240), (0, 900), (6, 120))


@dataclass
class Change:
    at: float
    clients: int
    load: float | None
    replicas: int
    reason: str


def run(policy: Policy, interval: float, start_seconds: float, initial: int = 1) -> tuple[list[Change], list[str]]:
    window = LoadWindow()
    memory = Memory(decided=initial)
    replicas = initial
    serving_from = 0.0  # when the current replicas (>= 1) serve
    changes: list[Change] = []
    steps: list[str] = []
    t = 0.0
    for clients, seconds in RAMP:
        begin, end = t, t + seconds
        needed = policy.needed(clients) if clients else policy.min_replicas
        reached: float | None = None
        while t < end:
            measured = replicas > 0 and t >= serving_from
            if measured:
                window.add(t, float(clients), keep=policy.window)
            elif replicas == 0:
                window.clear()
            before = replicas
            decision = decide(policy, replicas, window, t, memory, measured)
            memory = decision.memory
            replicas = decision.replicas
            if before == 0 and replicas > 0:
                serving_from = t + start_seconds
            if decision.reason:
                changes.append(Change(t, clients, decision.load, replicas, decision.reason))
            # A client arriving at zero replicas is what the gateway turns into a scale from zero.
            if replicas == 0 and clients > 0:
                replicas = 1
                memory = Memory(1, t, "ScaleFromZero", None)
                serving_from = t + start_seconds
                changes.append(Change(t, clients, None, 1, "ScaleFromZero"))
            if reached is None and replicas == needed:
                reached = t - begin
            t += interval
        took = f"{reached:.0f} s" if reached is not None else f"not within {seconds} s"
        steps.append(f"| {begin:.0f} s | {clients} | {needed} | {took} |")
    return changes, steps


def report(name: str, policy: Policy, interval: float, start_seconds: float) -> str:
    changes, steps = run(policy, interval, start_seconds)
    lines = [f"### {name}: window {policy.window:g} s, scaleDownDelay {policy.scale_down_delay:g} s, target "
             f"{policy.target}, replicas {policy.min_replicas}-{policy.max_replicas}, interval {interval:g} s, "
             f"a new replica serves {start_seconds:g} s after it is asked for", "",
             "| time | clients | load (window mean) | replicas | reason |", "|---|---|---|---|---|"]
    for change in changes:
        load = "-" if change.load is None else f"{change.load:.1f}"
        lines.append(f"| {change.at:.0f} s | {change.clients} | {load} | {change.replicas} | {change.reason} |")
    lines += ["", "| step at | clients | replicas needed | reached after |", "|---|---|---|---|", *steps, ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--window", type=float, help="seconds (default: both policies below)")
    parser.add_argument("--delay", type=float, help="scaleDownDelay, seconds")
    parser.add_argument("--target", type=int, default=4)
    parser.add_argument("--min", type=int, default=0)
    parser.add_argument("--max", type=int, default=8)
    parser.add_argument("--interval", type=float, default=5.0)
    parser.add_argument("--start-seconds", type=float, default=20.0,
                        help="from asking for a replica at zero to it serving (pod start + load from the volume)")
    args = parser.parse_args()
    if args.window or args.delay:
        policies = [("custom", Policy(args.min, args.max, args.target, args.delay or 300, args.window or 60))]
    else:
        policies = [("defaults", Policy(args.min, args.max, args.target, 300, 60)),
                    ("fast", Policy(args.min, args.max, args.target, 60, 20))]
    assert all(math.isfinite(p.window) for _, p in policies)
    print("\n".join(report(name, policy, args.interval, args.start_seconds) for name, policy in policies))
    return 0


if __name__ == "__main__":
    sys.exit(main())
