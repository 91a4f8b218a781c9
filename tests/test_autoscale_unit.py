"""The autoscaler's decision logic (operator/autoscale.py) and spec.scaling parsing, in-process.

Time is explicit (wall-clock seconds passed in), so each rule is checked at its edges: the window's mean,
the clamp, the scale-down delay (from low demand and from the last change), a restart (memory from status, no
samples), a count set from outside.
"""

from __future__ import annotations

import pytest
from lmkube.operator import autoscale as a
from lmkube.operator.autoscaler import memory_of, status_of
from lmkube.operator.loadprobe import load_from_metrics
from lmkube.operator.spec import ScalingSpec, parse_spec

POLICY = a.Policy(min_replicas=1, max_replicas=4, target=4, scale_down_delay=30, window=10)


def window_of(*samples: tuple[float, float]) -> a.LoadWindow:
    window = a.LoadWindow()
    for at, load in samples:
        window.add(at, load, keep=60)
    return window


def steady(load: float, until: float, every: float = 1.0, start: float = 0.0) -> a.LoadWindow:
    window = a.LoadWindow()
    t = start
    while t <= until:
        window.add(t, load, keep=60)
        t += every
    return window


def test_the_load_is_averaged_over_the_window_only() -> None:
    window = window_of((0, 100), (5, 2), (8, 4))
    assert window.mean(10, 10) == 3  # the sample at t=0 is outside (10 - 10, 10]
    assert window.mean(10, 11) == pytest.approx(106 / 3)
    assert window.mean(30, 10) is None
    # Samples older than `keep` are dropped as new ones arrive.
    window.add(100, 1, keep=10)
    assert list(window.samples) == [(100, 1)]


def test_needed_replicas_is_the_ceiling_of_load_over_target_clamped() -> None:
    assert [POLICY.needed(load) for load in (0, 0.1, 4, 4.0001, 4.01, 8, 16, 100)] == [1, 1, 1, 1, 2, 2, 4, 4]
    to_zero = a.Policy(0, 3, 4, 30, 10)
    assert [to_zero.needed(load) for load in (0, 0.01, 12.5)] == [0, 1, 3]


def test_scales_up_at_once_to_what_the_load_needs() -> None:
    decision = a.decide(POLICY, 1, steady(16, 10), 10, a.Memory(decided=1), measured=True)
    assert (decision.replicas, decision.desired, decision.reason) == (4, 4, a.SCALE_UP)
    assert decision.memory == a.Memory(4, 10, a.SCALE_UP, None)
    assert "16 requests" in decision.message and "1 -> 4" in decision.message


def test_a_partly_loaded_window_scales_up_in_steps() -> None:
    # 16 streams start at t=5 on a model idle before: the 10 s mean grows, so does the count.
    window = steady(0, 4)
    counts = []
    replicas = 1
    memory = a.Memory(decided=1)
    for t in range(5, 16):
        window.add(t, 16, keep=60)
        decision = a.decide(POLICY, replicas, window, t, memory, measured=True)
        replicas, memory = decision.replicas, decision.memory
        counts.append(replicas)
    assert counts == sorted(counts) and counts[0] < counts[-1] == 4


def test_scale_down_waits_for_the_delay_of_low_demand() -> None:
    memory = a.Memory(decided=4, last_scale_time=0, last_reason=a.SCALE_UP)
    window = steady(16, 100)

    def at(t: int) -> a.LoadWindow:  # demand for one replica from t=101
        while window.samples[-1][0] < t:
            window.add(window.samples[-1][0] + 1, 3, keep=60)
        return window

    first = a.decide(POLICY, 4, at(115), 115, memory, measured=True)  # the window's mean is 3 from t=111 on
    assert (first.replicas, first.desired, first.reason) == (4, 1, None)
    assert first.memory.low_demand_since == 115 and "scaling down in 30 s" in first.message
    waiting = a.decide(POLICY, 4, at(144), 144, first.memory, measured=True)
    assert waiting.replicas == 4 and waiting.memory.low_demand_since == 115
    done = a.decide(POLICY, 4, at(145), 145, waiting.memory, measured=True)
    assert (done.replicas, done.reason) == (1, a.SCALE_DOWN)
    assert done.memory == a.Memory(1, 145, a.SCALE_DOWN, None)


def test_demand_coming_back_resets_the_scale_down_clock() -> None:
    memory = a.Memory(decided=2, last_scale_time=0, low_demand_since=100)
    back = a.decide(POLICY, 2, steady(8, 120), 120, memory, measured=True)
    assert back.replicas == 2 and back.memory.low_demand_since is None


def test_no_scale_down_sooner_than_the_delay_after_the_last_change() -> None:
    # Low demand long since, but the count changed 10 s ago: wait until 30 s after that change.
    memory = a.Memory(decided=3, last_scale_time=100, low_demand_since=50)
    window = steady(1, 110)
    assert a.decide(POLICY, 3, window, 110, memory, measured=True).replicas == 3
    assert a.decide(POLICY, 3, steady(1, 130), 130, memory, measured=True).replicas == 1


def test_an_idle_model_with_min_zero_scales_to_zero_and_stays_there() -> None:
    policy = a.Policy(0, 1, 4, 30, 10)
    memory = a.Memory(decided=1, last_scale_time=0, low_demand_since=60)
    decision = a.decide(policy, 1, steady(0, 90), 90, memory, measured=True)
    assert (decision.replicas, decision.reason) == (0, a.SCALE_TO_ZERO)
    # At zero nothing is measured: it stays there, with no clock running.
    still = a.decide(policy, 0, a.LoadWindow(), 200, decision.memory, measured=False)
    assert (still.replicas, still.reason, still.memory.low_demand_since) == (0, None, None)
    assert "gateway" in still.message


def test_any_request_in_the_window_keeps_a_replica() -> None:
    policy = a.Policy(0, 1, 4, 30, 10)
    window = steady(0, 90)
    window.add(85, 1, keep=60)
    memory = a.Memory(decided=1, last_scale_time=0, low_demand_since=10)
    assert a.decide(policy, 1, window, 90, memory, measured=True).replicas == 1


def test_nothing_is_decided_while_no_replica_serves_the_model() -> None:
    # A model loading for longer than the delay must not be scaled away for looking idle.
    memory = a.Memory(decided=2, last_scale_time=0, low_demand_since=5)
    decision = a.decide(POLICY, 2, steady(0, 100), 100, memory, measured=False)
    assert (decision.replicas, decision.reason, decision.load) == (2, None, None)
    assert decision.memory.low_demand_since is None


def test_a_count_outside_the_range_is_clamped_at_once() -> None:
    up = a.decide(POLICY, 9, a.LoadWindow(), 5, a.Memory(decided=9), measured=False)
    assert (up.replicas, up.reason) == (4, a.OUT_OF_RANGE)
    low = a.decide(a.Policy(2, 4, 4, 30, 10), 1, a.LoadWindow(), 5, a.Memory(decided=1), measured=False)
    assert (low.replicas, low.reason) == (2, a.OUT_OF_RANGE)


def test_a_count_set_from_outside_is_accepted_and_starts_the_delay() -> None:
    # `kubectl scale` to 3 while the autoscaler had set 1: kept, and no scale-down for scaleDownDelay.
    memory = a.Memory(decided=1, last_scale_time=0, low_demand_since=None)
    accepted = a.decide(POLICY, 3, steady(0, 100), 100, memory, measured=True)
    assert (accepted.replicas, accepted.reason) == (3, a.EXTERNAL)
    assert accepted.memory == a.Memory(3, 100, a.EXTERNAL, None)
    assert a.decide(POLICY, 3, steady(0, 129), 129, accepted.memory, measured=True).replicas == 3
    # The gateway waking a model at zero is named for what it is.
    woken = a.decide(a.Policy(0, 1, 4, 30, 10), 1, a.LoadWindow(), 50, a.Memory(decided=0), measured=False)
    assert woken.reason == a.SCALE_FROM_ZERO


def test_a_restart_gathers_half_a_window_before_changing_anything() -> None:
    # The restarted operator read its memory back from status; its first samples show a spike.
    memory = memory_of(status_of(a.Decision(2, 2, 6.0, a.SCALE_UP, "up", a.Memory(2, 1000, a.SCALE_UP, 1010)), {}))
    assert memory == a.Memory(2, 1000, a.SCALE_UP, 1010)
    window = a.LoadWindow()
    window.add(2000, 40, keep=60)
    first = a.decide(POLICY, 2, window, 2000, memory, measured=True)
    assert (first.replicas, first.reason) == (2, None) and "gathering" in first.message
    assert first.memory.low_demand_since == 1010  # kept while it gathers
    window.add(2005, 40, keep=60)
    assert a.decide(POLICY, 2, window, 2005, first.memory, measured=True).replicas == 4


def test_a_restart_keeps_the_low_demand_clock_from_status() -> None:
    memory = a.Memory(decided=4, last_scale_time=0, low_demand_since=100)
    decision = a.decide(POLICY, 4, steady(2, 131, start=120), 131, memory, measured=True)
    assert (decision.replicas, decision.reason) == (1, a.SCALE_DOWN)


def test_status_fields_round_trip_and_keep_the_last_message() -> None:
    hold = a.Decision(1, 1, 0.5, None, "fits", a.Memory(1, 1000, a.SCALE_UP, None))
    fields = status_of(hold, {"scaling": {"lastScaleMessage": "1 -> 2"}})
    assert fields == {"desiredReplicas": 1, "scaling": {"load": 0.5, "lastScaleTime": "1970-01-01T00:16:40.000000Z",
                                                        "lastScaleReason": "ScaleUp", "lowDemandSince": None,
                                                        "lastScaleMessage": "1 -> 2"}}
    # The times the scale-down delay runs from keep their fraction: whole seconds would cut the delay short.
    waiting = a.Decision(2, 1, 0.5, None, "waits", a.Memory(2, 1000.25, a.SCALE_UP, 1001.75))
    assert memory_of(status_of(waiting, {})) == waiting.memory
    assert memory_of({"scaling": {"lastScaleTime": "2026-12-02T17:10:04Z"}}).last_scale_time == 1796231404.0


def test_load_from_the_servers_metrics_page() -> None:
    page = "\n".join([
        "# HELP llamacpp:requests_processing Number of requests processing.",
        "# TYPE llamacpp:requests_processing gauge",
        'llamacpp:requests_processing{model="org/a"} 4',
        'llamacpp:requests_processing{model="org/b"} 1',
        "# TYPE llamacpp:requests_deferred gauge",
        'llamacpp:requests_deferred{model="org/a"} 3',
        'llamacpp:requests_deferred_other{model="org/a"} 100',
        'lmkube_http_requests_total{method="GET",route="/metrics",status="200"} 7',
    ])
    assert load_from_metrics(page) == 8
    # Nothing loaded: the families have no samples, and the load is unknown rather than zero.
    assert load_from_metrics("# TYPE llamacpp:requests_processing gauge\n") is None


def test_spec_scaling_is_parsed_with_defaults() -> None:
    spec = parse_spec({"model": "org/m", "parallel": 6, "storage": {"existingClaim": "shared"},
                       "scaling": {"minReplicas": 0, "maxReplicas": 3, "scaleDownDelay": "2m", "window": 20}})
    assert spec.scaling == ScalingSpec(min_replicas=0, max_replicas=3, target_requests=None, scale_down_delay=120,
                                       window=20)
    assert spec.target_requests == 6  # spec.parallel: the replica's slots
    assert parse_spec({"model": "org/m", "scaling": {"targetRequests": 2}}).target_requests == 2
    assert parse_spec({"model": "org/m", "scaling": {}}).scaling == ScalingSpec(1, 1, None, 300, 60)
    assert parse_spec({"model": "org/m", "scaling": {"minReplicas": 0, "scaleDownDelay": 0}}).scaling == \
        ScalingSpec(0, 1, None, 0, 60)
    assert parse_spec({"model": "org/m"}).scaling is None


@pytest.mark.parametrize(("scaling", "message"), [
    ({"minReplicas": 3, "maxReplicas": 2}, "minReplicas (3) must not exceed scaling.maxReplicas (2)"),
    ({"minReplicas": -1}, "spec.scaling.minReplicas must be at least 0"),
    ({"maxReplicas": 0}, "spec.scaling.maxReplicas must be at least 1"),
    ({"targetRequests": 0}, "spec.scaling.targetRequests must be at least 1"),
    ({"scaleDownDelay": "soon"}, "spec.scaling.scaleDownDelay must be a duration"),
    ({"window": 0}, "spec.scaling.window must be a duration"),
])
def test_invalid_scaling_is_refused(scaling: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_spec({"model": "org/m", "scaling": scaling})


def test_scaling_past_one_replica_needs_no_shared_claim() -> None:
    # Every replica gets its own cache volume (the StatefulSet's claim template), so the default storage scales.
    spec = parse_spec({"model": "org/m", "replicas": 3, "scaling": {"minReplicas": 0, "maxReplicas": 4}})
    assert (spec.replicas, spec.scaling and spec.scaling.max_replicas, spec.storage.existing_claim) == (3, 4, None)
