"""The overhead budget's rule: over budget the stride grows by the power of two that brings the
overhead under it, well under it the stride halves, within bounds."""

from __future__ import annotations

from train_telemetry.budget import MAX_GROWTH, MAX_STRIDE, MAX_WINDOW_S, OverheadBudget


def _budget(limit: float) -> OverheadBudget:
    b = OverheadBudget(limit, lambda: None, sample=False)  # the test feeds it, not a thread
    b.cores = 2  # as on the 2-core machines the figures come from (observe's idle cores depend on it)
    return b


def test_over_budget_the_stride_grows_enough_in_one_period_up_to_its_bound() -> None:
    """Hook time plus the worker CPU that does not fit in the cores training leaves idle, over the budget: the
    stride becomes the power of two that would have kept that period within it (26% / 5%
    at stride 1 -> 8), by at most MAX_GROWTH a period, up to MAX_STRIDE."""
    b = _budget(0.05)
    b.update(hook_s=0.02, worker_cpu_s=0.5, wall_s=2.0, idle_cores=0.0)  # 1% + 25%
    assert b.stride == 8 and abs((b.last_overhead or 0) - 0.26) < 1e-9
    b.update(0.0, 0.11, 2.0, 0.0)  # 5.5% at stride 8: 8.8 -> 16
    assert b.stride == 16
    b.update(0.0, 2.0, 2.0, 0.0)  # 100%: 320 wanted, 8x at most
    assert b.stride == min(16 * MAX_GROWTH, MAX_STRIDE)
    b.update(0.0, 2.0, 2.0, 0.0)
    assert b.stride == MAX_STRIDE


def test_an_idle_machine_makes_worker_cpu_free() -> None:
    """Worker CPU costs nothing where it fits in the cores training leaves idle (a GPU trainer,
    or one torch thread on two cores); only what does not fit is charged."""
    b = _budget(0.05)
    b.update(0.01, 1.9, 2.0, idle_cores=1.0)  # 0.5% + a worker using 0.95 of the idle core: free
    assert b.stride == 1 and abs((b.last_overhead or 0) - 0.005) < 1e-9
    b.update(0.01, 1.9, 2.0, idle_cores=0.5)  # half a core idle: 0.45 of a core taken from training
    assert abs((b.last_overhead or 0) - 0.455) < 1e-9 and b.stride == MAX_GROWTH  # 9.1 wanted, 8x at most
    # observe: the idle cores are the usable ones minus the trainer's CPU per wall second
    b = _budget(0.05)
    assert not b.observe(0.0, 0.0, 0.0, 0, 0.0)
    assert b.observe(2.0, 2.0, 0.0, 2, 1.8)  # trainer 1 core, worker 0.9: fits
    assert b.stride == 1 and b.last_overhead == 0.0
    assert b.observe(4.0, 5.6, 0.0, 4, 3.6)  # trainer 1.8 cores, worker 0.9: 0.7 taken
    assert abs((b.last_overhead or 0) - 0.7) < 1e-9


def test_well_under_budget_the_stride_falls_in_one_period_with_hysteresis() -> None:
    """Between a third of the budget and the budget the stride holds; under a third it falls
    to where the next period would cost about half the budget; a period without any
    collection (a stride raised by the first collection's one-time costs) brings it to 1."""
    b = _budget(0.06)
    b.stride = 8
    b.update(0.0, 0.06, 2.0, 0.0)  # 3%: held
    assert b.stride == 8
    b.update(0.0, 0.02, 2.0, 0.0)  # 1% at stride 8: 2 * 1.33 -> 4
    assert b.stride == 4
    b.stride = MAX_STRIDE
    b.update(0.0, 0.0, 1.0, 0.0)
    assert b.stride == 1


def test_a_window_spans_whole_intervals_between_collections() -> None:
    """Collections rarer than the period (wide at every 200th step: ~100 ms every 13 s): a
    window waits for two due collections, so one collection's cost is spread over the
    interval it belongs to (0.8%), not over one second (10%, which would skip every other)."""
    b = _budget(0.05)
    assert not b.observe(0.0, 0.0, 0.0, 0, 0.0)  # the window starts
    assert not b.observe(1.0, 2.0, 0.017, 1, 0.08)  # one collection in 1 s: 9.7% if it counted
    for t in range(2, 13):
        assert not b.observe(float(t), 2.0 * t, 0.017, 1, 0.08)
    assert b.observe(13.0, 26.0, 0.034, 2, 0.16)  # the second one: the window is whole
    assert b.stride == 1 and abs((b.last_overhead or 0) - 0.194 / 13.0) < 1e-9
    # ... or MAX_WINDOW_S without two: then it is judged on what it holds (nothing: stride 1).
    b.stride = 4
    assert b.observe(13.0 + MAX_WINDOW_S, 26.0 + 2 * MAX_WINDOW_S, 0.034, 2, 0.16) and b.stride == 1


def test_a_window_holds_at_least_one_stride_of_due_collections() -> None:
    """At stride 16 a window of two due collections may hold no taken one: it would read 0%
    and send the stride back to 1 (then every collection is taken until the next window).
    The window waits for 16 due collections, so it holds the one taken and its cost."""
    b = _budget(0.10)
    b.stride = 16
    assert not b.observe(0.0, 0.0, 0.0, 0, None)
    assert not b.observe(1.0, 2.0, 0.0, 15, None)  # 15 due, all skipped: not a whole window
    assert b.stride == 16
    assert b.observe(1.1, 2.2, 0.076, 16, None)  # the 16th due collection was taken: 76 ms in 1.1 s
    assert b.stride == 16 and abs((b.last_overhead or 0) - 0.076 / 1.1) < 1e-9  # 6.9%: held
