"""The prefill overhead benchmark's split of step times into a fixed and a per-layer part
(tests/gpu/engines_overhead.py runs on a GPU; its arithmetic is checked here)."""
import pytest

from tests.gpu.engines_overhead import MODEL_LAYERS, fit_line, step_fit_row


def test_a_line_through_step_times_separates_the_fixed_part():
    assert fit_line([(1, 3.0), (4, 9.0), (16, 33.0)]) == pytest.approx((1.0, 2.0))


def test_a_fixed_cost_per_step_shrinks_per_layer_with_the_model_depth():
    # plugin: 0.4 ms per step more than direct, same 1.5 ms per layer
    steps = [(n, 0.5 + 1.5 * n, 0.1 + 1.5 * n) for n in (1, 4, 16)]
    row = step_fit_row({"gpu": "test"}, steps)
    assert row["fixed_ms_plugin"] - row["fixed_ms_direct"] == pytest.approx(0.4)
    assert row["marginal_layer_overhead"] == pytest.approx(0.0, abs=1e-12)
    want = (0.5 + 1.5 * MODEL_LAYERS) / (0.1 + 1.5 * MODEL_LAYERS) - 1
    assert row["overhead"] == pytest.approx(want)
    assert row["within_target"]
    # a per-layer cost does not shrink: 10 % more per layer stays about 10 %
    row = step_fit_row({"gpu": "test"}, [(n, 1.65 * n, 1.5 * n) for n in (1, 4, 16)])
    assert row["marginal_layer_overhead"] == pytest.approx(0.1)
    assert not row["within_target"]
