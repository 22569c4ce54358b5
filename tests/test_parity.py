"""The parity rule and its report, on hand-made arrays (pure numpy)."""

from __future__ import annotations

import numpy as np

from export_lib.config import Tolerance
from export_lib.parity import combine, compare, judge

FP32 = Tolerance(atol=1e-4, rtol=1e-3)


def _judge(ref, got, tol=FP32):
    return judge("onnx-fp32", "logits", compare(np.asarray(ref), np.asarray(got), tol), tol)


def test_element_fails_only_when_both_atol_and_rtol_are_exceeded():
    ref = np.array([1000.0, 0.0, 1.0, 1.0], dtype=np.float32)
    # 0.5 over atol but within rtol of 1000; 5e-5 within atol near 0; 1e-2 over both; 5e-4 over atol only.
    got = ref + np.array([0.5, 5e-5, 1e-2, 5e-4], dtype=np.float32)
    row = _judge(ref, got)
    assert row["mismatch_count"] == 1 and row["mismatch_fraction"] == 0.25
    assert not row["passed"]
    assert "onnx-fp32 output 'logits': 25% of elements (1/4) exceed atol=0.0001 AND rtol=0.001" in row["reasons"][0]
    assert "max abs err 0.5" in row["reasons"][0]


def test_max_mismatch_fraction_allows_a_few():
    ref = np.zeros(10)
    got = ref.copy()
    got[0] = 1.0
    assert not _judge(ref, got)["passed"]
    assert _judge(ref, got, Tolerance(atol=1e-4, rtol=1e-3, max_mismatch_fraction=0.1))["passed"]


def test_huge_logits_pass_on_relative_error():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(4, 10)) * 1e12
    got = ref * (1 + 4e-7)
    assert not np.allclose(got, ref, rtol=0, atol=1e-4)  # what a plain atol check would say
    row = _judge(ref, got)
    assert row["passed"] and row["max_abs_err"] > 1e4 and row["max_rel_err"] < 1e-6
    assert row["degenerate"] is None


def test_degenerate_reference_outputs_are_named():
    assert _judge(np.zeros((4, 3)), np.zeros((4, 3)))["degenerate"] == "all-zero reference output"
    assert "constant" in _judge(np.full((4, 3), 7.0), np.full((4, 3), 7.0))["degenerate"]
    same_rows = np.tile(np.arange(3.0), (4, 1))
    row = _judge(same_rows, same_rows)
    assert "identical for every sample" in row["degenerate"]
    assert row["passed"] and "proves nothing" in row["warnings"][0]


def test_nan_in_variant_fails_and_is_counted():
    ref = np.ones((2, 3), dtype=np.float32)
    got = ref.copy()
    got[0, 0], got[1, 1] = np.nan, np.inf
    row = _judge(ref, got)
    assert row["nan_count"] == 1 and row["inf_count"] == 1 and row["mismatch_count"] == 2
    assert row["max_abs_err"] == 0.0  # errors are measured where both sides are finite
    assert any("1 NaN and 1 Inf" in r for r in row["reasons"])


def test_nan_in_reference_fails_with_a_hint():
    ref = np.array([np.nan, 1.0])
    row = _judge(ref, ref.copy())
    assert not row["passed"] and "the torch reference itself has 1 NaN" in row["reasons"][0]


def test_shape_and_dtype_mismatch():
    row = _judge(np.ones((2, 3), dtype=np.float32), np.ones((2, 4), dtype=np.float32))
    assert not row["passed"] and "shape [2, 4] differs from the reference's [2, 3]" in row["reasons"][0]
    row = _judge(np.ones(3, dtype=np.float32), np.ones(3, dtype=np.float16))
    assert row["passed"] and "dtype float16 vs reference float32" in row["warnings"][0]


def test_combine_adds_counts_and_keeps_maxima():
    a = compare(np.zeros(4), np.array([0, 0, 0, 1.0]), FP32)
    b = compare(np.arange(1.0, 5.0), np.arange(1.0, 5.0) + 1e-6, FP32)
    merged = combine([a, b])
    assert merged["elements"] == 8 and merged["mismatch_count"] == 1 and merged["max_abs_err"] == 1.0
    assert merged["degenerate"] is None  # one informative batch is enough
    assert judge("onnx-fp32", "logits", merged, FP32)["mismatch_fraction"] == 0.125
