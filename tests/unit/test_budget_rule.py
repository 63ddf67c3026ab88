"""The overhead budget's rule: the stride doubles over budget, halves well under it, within bounds."""

from __future__ import annotations

from train_telemetry.budget import MAX_STRIDE, OverheadBudget


def _budget(limit: float) -> OverheadBudget:
    b = OverheadBudget(limit, lambda: None)
    b.close()  # the sampling thread is not what is tested here
    return b


def test_over_budget_doubles_the_stride_up_to_its_bound() -> None:
    """Hook time plus worker CPU weighted by the training's pressure over the budget: collect half as often."""
    b = _budget(0.05)
    b.update(hook_s=0.02, worker_cpu_s=0.5, wall_s=2.0, pressure=1.0)  # 1% + 25%
    assert b.stride == 2 and abs((b.last_overhead or 0) - 0.26) < 1e-9
    for _ in range(20):
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
