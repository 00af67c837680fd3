"""What a variant would do under the live load: the switching policy's predictions, pure functions of
each variant's on-device profile (`Option`) and the last telemetry window (`Window`).

A variant's p95 is the window's observed p95 scaled by the ratio of profiled p95s (candidate / active);
in an idle window, its profiled p95 itself. Scaling latencies says nothing about a queue that would
grow without bound, so a variant the window's request rate would keep busy more than `MAX_UTILIZATION`
of the time is predicted to miss any SLO. The active variant busy more than `SATURATION` of the time
counts as over the SLO while its p95 still looks fine: open-loop load beyond what it serves grows a
queue whose p95 crosses the SLO only later, with a backlog that then takes long to drain. The gap
between the two thresholds is hysteresis.

A request costs more than its forward pass: decoding, gRPC and Python take the same time whatever the
variant. The window measures that overhead (the serving process's CPU time per request, or the wall
time a request held a slot if that is more, less the active variant's profiled p50) and every
utilization counts it. Waits for the CPU and for Python's lock cost no CPU time but hold the slot,
which is why the slot time counts. Intra-op threads and micro-batching only make these estimates
conservative.
"""

from __future__ import annotations

from edge.policy_types import Option, PolicyConfig, Window

MAX_UTILIZATION = 0.85  # a variant busier than this at the window's rate would build a queue: no candidate
SATURATION = 0.95  # the active variant busy this share of the time: a queue is building
QUEUE_ALARM = 1.0  # inferences in flight that would take this share of the SLO to serve: the last is late


def overhead_ms(active: Option, window: Window) -> float:
    """What a request costs beyond the model's forward pass as profiled, as the window measured it: the
    larger of the process's CPU time per request (decoding, gRPC, Python) and the wall time a request
    held a slot (the forward pass as slowed by other processes and by waits for Python's lock, which
    cost no CPU time), less the active variant's profiled p50; never below 0. The same for every
    variant, since only the forward pass changes between them."""
    return max(0.0, window.cpu_ms_per_request - active.p50_ms, window.slot_ms_per_request - active.p50_ms)


def utilization(option: Option, active: Option, window: Window) -> float:
    """Share of the time `option` would be busy serving the window's request rate on its slots, each
    request costing its profiled p50 plus the overhead measured while `active` served."""
    return window.rate * (option.p50_ms + overhead_ms(active, window)) / 1e3 / max(window.slots, 1)


def device_busy(option: Option, active: Option, window: Window) -> float:
    """Share of the device's CPU that would be in use serving the window's rate on `option`: what was
    in use (every process) plus the forward passes' difference, one core each."""
    return window.device_busy + window.rate * (option.p50_ms - active.p50_ms) / 1e3 / max(window.cores, 1)


def queue_ms(option: Option, active: Option, window: Window) -> float:
    """How long the inferences in flight at the window's close would take `option` to serve on the
    device's slots, each costing its p50 plus the overhead measured on `active` (0 while no request
    waits for a slot)."""
    if window.in_flight <= window.slots:
        return 0.0
    return window.in_flight / max(window.slots, 1) * (option.p50_ms + overhead_ms(active, window))


def queued(config: PolicyConfig, active: Option, window: Window) -> bool:
    """The inferences in flight would take `active` at least `QUEUE_ALARM` of the SLO to serve."""
    return queue_ms(active, active, window) >= QUEUE_ALARM * config.slo_ms


def explained_by_load(config: PolicyConfig, active: Option, window: Window) -> bool:
    """The window's request rate keeps `active` busy more than `up_headroom` of the time, each request
    costing its profiled p50 plus the CPU time the window measured beyond it; or the rate is unknown
    (0), and the p95 alone decides. The wall time requests held the slot is left out here: a stall of
    the device (the process descheduled, a page fault storm) inflates it without any change in load."""
    if window.rate <= 0:
        return True
    cost_ms = active.p50_ms + max(0.0, window.cpu_ms_per_request - active.p50_ms)
    return window.rate * cost_ms / 1e3 / max(window.slots, 1) > config.up_headroom


def predicted_p95(candidate: Option, active: Option, window: Window) -> float:
    """The p95 `candidate` would show under this window's load, and no less than the time it would take
    to serve the inferences in flight."""
    if window.requests <= 0:
        return max(candidate.p95_ms, queue_ms(candidate, active, window))
    if utilization(candidate, active, window) > MAX_UTILIZATION:
        return float("inf")
    return max(window.p95_ms * candidate.p95_ms / max(active.p95_ms, 1e-9), queue_ms(candidate, active, window))
