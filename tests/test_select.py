"""select on hand-made reports (pure)."""

from __future__ import annotations

import pytest

from export_lib.results import ValidationFailedError
from export_lib.select import fp_counterpart, select_variant


def _validation(**passed):
    return {"accuracy": {"metric": "top1_agreement"},
            "variants": {v: {"passed": ok, "reasons": [] if ok else [f"{v} output 'logits': 40% of elements exceed"],
                             "accuracy": {"value": 0.99}} for v, ok in passed.items()}}


def _benchmark(batch_sizes=(1, 8), **p50_at_8):
    results = {v: {str(b): {"p50_ms": p * b / 8} for b in batch_sizes} for v, p in p50_at_8.items()}
    return {"settings": {"batch_sizes": list(batch_sizes), "stability": 0.1}, "results": results}


def test_int8_slower_than_fp32_is_not_chosen_and_says_why():
    sel = select_variant(["onnx-fp32", "onnx-int8"], _validation(**{"onnx-fp32": True, "onnx-int8": True}),
                         _benchmark(**{"torch-eager": 4.0, "onnx-fp32": 2.0, "onnx-int8": 3.2}))
    assert sel["selected"] == "onnx-fp32" and sel["batch_size"] == 8
    reason = sel["decisions"]["onnx-int8"]["reason"]
    assert "INT8 is not faster than onnx-fp32 at batch 8" in reason and "3.200 ms vs 2.000 ms (0.62x)" in reason
    assert "2.00x torch eager" in sel["decisions"]["onnx-fp32"]["reason"]


def test_int8_within_the_noise_margin_is_not_chosen():
    sel = select_variant(["onnx-fp32", "onnx-int8"], _validation(**{"onnx-fp32": True, "onnx-int8": True}),
                         _benchmark(**{"torch-eager": 4.0, "onnx-fp32": 2.0, "onnx-int8": 1.9}))
    assert sel["selected"] == "onnx-fp32"
    assert "by more than the 10% noise margin" in sel["decisions"]["onnx-int8"]["reason"]


def test_faster_accurate_int8_is_chosen():
    sel = select_variant(["onnx-fp32", "onnx-int8"], _validation(**{"onnx-fp32": True, "onnx-int8": True}),
                         _benchmark(**{"torch-eager": 4.0, "onnx-fp32": 2.0, "onnx-int8": 1.2}))
    assert sel["selected"] == "onnx-int8"
    assert "slower than onnx-int8" in sel["decisions"]["onnx-fp32"]["reason"]


def test_failed_variant_is_not_chosen_even_if_fastest():
    sel = select_variant(["onnx-fp32", "onnx-int8"], _validation(**{"onnx-fp32": True, "onnx-int8": False}),
                         _benchmark(**{"torch-eager": 4.0, "onnx-fp32": 2.0}))
    assert sel["selected"] == "onnx-fp32"
    assert sel["decisions"]["onnx-int8"]["reason"].startswith("failed validation: onnx-int8 output 'logits'")


def test_fastest_passing_variant_is_chosen_at_the_given_batch():
    variants = ["onnx-fp32", "tensorrt-fp16"]
    bench = _benchmark(**{"torch-eager": 4.0, "onnx-fp32": 2.0, "tensorrt-fp16": 0.5})
    bench["results"]["onnx-fp32"]["1"]["p50_ms"] = 0.01  # fp32 wins at batch 1 only
    ok = _validation(**{"onnx-fp32": True, "tensorrt-fp16": True})
    assert select_variant(variants, ok, bench)["selected"] == "tensorrt-fp16"
    sel = select_variant(variants, ok, bench, batch_size=1)
    assert sel["selected"] == "onnx-fp32" and "given" in sel["criterion"]


def test_no_passing_variant_fails():
    with pytest.raises(ValidationFailedError, match="no variant can be served: onnx-fp32: failed validation"):
        select_variant(["onnx-fp32"], _validation(**{"onnx-fp32": False}), _benchmark(**{"torch-eager": 1.0}))


def test_tensorrt_int8_counterpart():
    assert fp_counterpart("tensorrt-int8", {"tensorrt-fp16", "onnx-fp32"}) == "tensorrt-fp16"
    assert fp_counterpart("tensorrt-int8", {"onnx-fp32"}) == "onnx-fp32"
    assert fp_counterpart("onnx-fp32", {"onnx-fp32"}) is None
