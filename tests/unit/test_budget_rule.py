"""The overhead budget's rule: over budget the stride grows by the power of two that brings the
overhead under it, well under it the stride halves, within bounds."""

from __future__ import annotations

from train_telemetry.budget import MAX_STRIDE, OverheadBudget


def _budget(limit: float) -> OverheadBudget:
    b = OverheadBudget(limit, lambda: None)
    b.close()  # the sampling thread is not what is tested here
    return b


def test_over_budget_the_stride_grows_enough_in_one_step_up_to_its_bound() -> None:
    """Hook time plus worker CPU weighted by the training's pressure, over the budget: the
    stride jumps by the power of two that brings that under the budget (26% / 5% -> x8)."""
    b = _budget(0.05)
    b.update(hook_s=0.02, worker_cpu_s=0.5, wall_s=2.0, pressure=1.0)  # 1% + 25%
    assert b.stride == 8 and abs((b.last_overhead or 0) - 0.26) < 1e-9
    b.update(0.0, 0.11, 2.0, 1.0)  # 5.5%: just over, at least double
    assert b.stride == 16
    for _ in range(3):
        b.update(0.0, 2.0, 2.0, 1.0)
    assert b.stride == MAX_STRIDE


def test_an_idle_machine_makes_worker_cpu_free() -> None:
    """Worker CPU costs nothing when training leaves the cores idle (pressure 0): no skipping."""
    b = _budget(0.05)
    b.update(0.01, 1.9, 2.0, pressure=0.0)
    assert b.stride == 1


def test_well_under_budget_halves_the_stride_with_hysteresis() -> None:
    """Under a third of the budget the stride halves; between a third and the budget it holds."""
    b = _budget(0.06)
    b.stride = 8
    b.update(0.0, 0.06, 2.0, 1.0)  # 3%: held
    assert b.stride == 8
    b.update(0.0, 0.02, 2.0, 1.0)  # 1%: halved
    assert b.stride == 4
